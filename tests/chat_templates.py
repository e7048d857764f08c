"""A chat template that renders tool calls differently from how the model writes them.

Models trained on one tool-call format are often served with a template that re-renders the calls
from parsed JSON in another (key order, spacing, escaping). This variant of the Qwen2.5 template
(the one the tiny test model carries) writes `{"arguments": ..., "name": ...}` where the model
generates `{"name": ..., "arguments": ...}`, so a re-rendered history never matches the sampled
tokens of a tool-calling turn: the prefix mismatch multi-turn training must survive.
"""

from pathlib import Path

QWEN_TOOL_CALL = """            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}"""
REORDERED_TOOL_CALL = """            {{- '\\n<tool_call>\\n{"arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- ', "name": "' }}
            {{- tool_call.name }}
            {{- '"}\\n</tool_call>' }}"""


def write_reordered_template(model_dir: Path, out: Path) -> Path:
    template = (Path(model_dir) / "chat_template.jinja").read_text()
    if QWEN_TOOL_CALL not in template:
        raise ValueError(f"{model_dir}: the chat template has no Qwen2.5 tool-call block to reorder")
    out.write_text(template.replace(QWEN_TOOL_CALL, REORDERED_TOOL_CALL))
    return out
