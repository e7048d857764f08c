"""docs/configuration.md is generated from schema.py (gymtrl.config.reference); it must be current
and list every field of every schema dataclass. No servers."""

import dataclasses
import subprocess
import sys
from pathlib import Path

from gymtrl.config import reference, schema

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "configuration.md"


def test_configuration_doc_is_generated_from_the_schema():
    assert DOC.read_text() == reference.generate(), (
        "docs/configuration.md is stale: run `python -m gymtrl.config.reference > docs/configuration.md`")


def test_every_schema_field_appears_with_its_default():
    text = DOC.read_text()
    classes = [c for c in vars(schema).values()
               if isinstance(c, type) and dataclasses.is_dataclass(c) and c.__module__ == schema.__name__]
    assert schema.Config in classes and len(classes) > 10
    for cls in classes:
        for f in dataclasses.fields(cls):
            assert f"{f.name}` |" in text, f"{cls.__name__}.{f.name} missing from docs/configuration.md"
    # Nested sections get their dotted path.
    for key in ("vllm.launch.extra_args", "gym.launch.copies", "judge.launch.venv", "data.train[].agent",
                "prepare.sources[].hf.repo", "rewards.functions[].weight", "sync.strategy", "grpo"):
        assert f"`{key}`" in text, key


def test_parser_reads_comments_types_and_defaults():
    src = '''
from dataclasses import dataclass, field
from typing import Any, Optional

@dataclass
class Inner:
    # Where it goes.
    # Second line | with a pipe.
    url: Optional[str] = None
    tags: list[str] = field(default_factory=lambda: ["a", "b"])
    mode: str = "fast"  # fast | slow

@dataclass
class Item:
    name: str = MISSING

@dataclass
class Config:
    # The inner part.
    inner: Inner = field(default_factory=Inner)
    items: list[Item] = field(default_factory=list)
    maybe: "Item | None" = None
    extra: dict[str, Any] = field(default_factory=dict)
'''
    text = reference.render(src)
    assert "| `inner.url` | `str` or `null` | `null` | Where it goes. Second line \\| with a pipe. |" in text
    assert "| `inner.tags` | `list[str]` | `[a, b]` |" in text
    assert "| `inner.mode` | `str` | `fast` | fast \\| slow |" in text
    assert "## items[]" in text and "| `items[].name` | `str` | *required* |" in text
    assert "| `maybe` | `Item \\| None` or `null`" not in text and "`maybe`" in text
    assert "| `extra` | `dict[str, Any]` | `{}` |" in text


def test_check_flag(tmp_path):
    stale = tmp_path / "configuration.md"
    stale.write_text("old\n")
    run = [sys.executable, "-m", "gymtrl.config.reference", "--check"]
    assert subprocess.run(run + [str(stale)], capture_output=True).returncode == 1
    assert subprocess.run(run + [str(DOC)], capture_output=True).returncode == 0
