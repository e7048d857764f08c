"""A verified GGUF into a plain Hugging Face directory: transformers dequantizes it; the directory
gets safetensors weights, the tokenizer with its chat template, a generation config whose stop ids
include the chat turn's end, and is checked before it is called ready."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

from gymtrl.models.cache import ModelFetchError
from gymtrl.models.registry import ModelSpec

DTYPES = ("bfloat16", "float32")
GGUF_PIN = "gguf==0.19.0"  # requirements/trainer.txt


def require_gguf_package() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModelFetchError(
            f"the `gguf` package is not installed in {sys.prefix}; transformers needs it to read GGUF files",
            hint=f"{sys.executable} -m pip install '{GGUF_PIN}' (or rebuild the trainer venv with "
                 "scripts/setup_venvs.sh, whose requirements/trainer.txt pins it)")


def convert(spec: ModelSpec, gguf: Path, out: Path, dtype: str) -> dict:
    """Dequantize the GGUF with transformers into a plain safetensors checkpoint in `out`, with the
    tokenizer, its chat template (also inside tokenizer_config.json) and a generation config."""
    require_gguf_package()
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    t0 = time.monotonic()
    kwargs = {}
    try:  # newer transformers can keep GGUF blocks packed; a checkpoint needs every weight unpacked
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                 dtype=getattr(torch, dtype), **kwargs)
    load_s = time.monotonic() - t0
    packed = sorted({type(m).__name__ for m in model.modules() if "gguf" in type(m).__name__.lower()})
    if packed:
        raise ModelFetchError(f"transformers {transformers.__version__} kept GGUF-packed modules ({packed}); "
                              "they cannot be saved as a plain checkpoint",
                              hint="report this; a transformers that honours GgufConfig(dequantize=True) avoids it")
    from gguf import GGUFReader

    tensor_names = {t.name for t in GGUFReader(str(gguf)).tensors}
    tied = "output.weight" not in tensor_names
    shares = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    if tied != shares or bool(model.config.tie_word_embeddings) != tied:
        raise ModelFetchError(
            f"{spec.name}: the GGUF {'has no' if tied else 'has a'} separate output.weight but transformers loaded "
            f"tie_word_embeddings={model.config.tie_word_embeddings} (lm_head shares the embedding: {shares})",
            hint="report this with the transformers version")
    # Plain checkpoint: transformers refuses to save a model that still carries the GGUF quantizer.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.tie_word_embeddings = tied
    gen = model.generation_config
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    eos = [e for e in eos if e is not None]
    vocab = tok.get_vocab()
    for token in ("<|im_end|>", *spec.extra_eos):  # chat turns end at <|im_end|>
        if token in vocab and vocab[token] not in eos:
            eos.append(vocab[token])
    gen.eos_token_id = eos[0] if len(eos) == 1 else eos
    max_len = getattr(model.config, "max_position_embeddings", None)
    if max_len:
        tok.model_max_length = max_len
    nparams = sum(p.numel() for p in model.parameters())
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    del model
    _finish_files(spec, out, tok.chat_template)
    return {"num_parameters": nparams, "tie_word_embeddings": tied, "load_seconds": round(load_s, 1),
            "converted_with": {"transformers": transformers.__version__, "gguf": _version("gguf"),
                               "torch": torch.__version__}}


def _version(dist: str) -> str | None:
    import importlib.metadata as md

    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _finish_files(spec: ModelSpec, out: Path, chat_template: str | None) -> None:
    """Make the directory plain for every reader (vLLM included) and check it."""
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("quantization_config", None)
    cfg.pop("_model_name_or_path", None)  # the GGUF's general.name, not a path
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tc_path = out / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    for k in ("is_local", "local_files_only"):
        tc.pop(k, None)
    jinja = out / "chat_template.jinja"
    template = jinja.read_text() if jinja.is_file() else chat_template
    if not template:
        raise ModelFetchError(f"{spec.name}: the GGUF carries no chat template", hint="report this")
    tc["chat_template"] = template  # older readers look here; newer ones read chat_template.jinja
    tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")
    problems = []
    if not (out / "generation_config.json").is_file():
        problems.append("no generation_config.json")
    if not any(out.glob("*.safetensors")):
        problems.append("no safetensors weights")
    if spec.tool_calling and "tools" not in template:
        problems.append("the chat template does not render tools")
    if problems:
        raise ModelFetchError(f"{spec.name}: the converted directory is incomplete: {'; '.join(problems)}",
                              hint="report this with the transformers version")
