"""What a prepared set holds: rows per source and environment, skipped rows by reason, tools,
turns and prompt tokens per row. Printed as a table and written as report.json."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from gymtrl.atomic import write_text_atomic

EXAMPLES_PER_REASON = 5


@dataclass
class SourceReport:
    label: str
    read: int = 0
    good: int = 0
    duplicates: int = 0
    train: int = 0
    validation: int = 0
    upsampled: bool = False
    skipped_by_reason: Counter = field(default_factory=Counter)
    # The first few skipped rows of each reason: "file:line: reason".
    examples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def skipped(self) -> int:
        return sum(self.skipped_by_reason.values())

    def skip(self, where: str, problem: str) -> None:
        reason = problem.split(":", 1)[0]
        self.skipped_by_reason[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < EXAMPLES_PER_REASON:
            shown.append(f"{where}: {problem}")


@dataclass
class Report:
    seed: int
    output_dir: str
    sources: list[SourceReport] = field(default_factory=list)
    env_names: list[str] = field(default_factory=list)
    environments: dict[str, dict] = field(default_factory=dict)

    def env_index(self, agent: str) -> int:
        if agent not in self.env_names:
            self.env_names.append(agent)
        return self.env_names.index(agent)

    def summarise(self, spools, train: np.ndarray, validation: np.ndarray) -> None:
        """Per environment (agent): rows in each split and per-row features over the output rows."""
        def column(name: str, pairs: np.ndarray) -> np.ndarray:
            out = np.zeros(len(pairs), np.int32)
            for s, spool in enumerate(spools):
                mask = pairs[:, 0] == s
                values = getattr(spool, name)
                if mask.any():
                    out[mask] = np.frombuffer(values, dtype=values.typecode)[pairs[mask, 1]]
            return out

        for split, pairs in (("train", train), ("validation", validation)):
            if len(pairs) == 0:
                continue
            envs = column("envs", pairs)
            tools, turns, tokens = column("tools", pairs), column("turns", pairs), column("prompt_tokens", pairs)
            for e, name in enumerate(self.env_names):
                mask = envs == e
                if not mask.any():
                    continue
                stats = self.environments.setdefault(name, {})
                stats[f"{split}_rows"] = int(mask.sum())
                if split == "train":
                    stats["tools_per_row"] = _spread(tools[mask])
                    stats["turns_per_row"] = _spread(turns[mask])
                    if tokens[mask].any():
                        stats["prompt_tokens"] = _spread(tokens[mask], percentiles=True)

    @property
    def totals(self) -> dict[str, int]:
        return {k: sum(getattr(s, k) for s in self.sources)
                for k in ("read", "good", "skipped", "duplicates", "train", "validation")}

    def to_json(self) -> dict:
        sources = []
        for s in self.sources:
            d = asdict(s)
            d["skipped"] = s.skipped
            d["skipped_by_reason"] = dict(sorted(s.skipped_by_reason.items()))
            sources.append(d)
        return {"seed": self.seed, "output_dir": self.output_dir, "totals": self.totals,
                "sources": sources, "environments": self.environments}

    def write(self, path: Path) -> None:
        write_text_atomic(path, json.dumps(self.to_json(), indent=2) + "\n")

    def table(self) -> str:
        head = f"{'source':<36} {'read':>8} {'skipped':>8} {'dupes':>7} {'train':>8} {'valid':>7}"
        lines = [head, "-" * len(head)]
        for s in self.sources:
            up = " (up-sampled)" if s.upsampled else ""
            lines.append(f"{s.label[:36]:<36} {s.read:>8} {s.skipped:>8} {s.duplicates:>7} {s.train:>8} {s.validation:>7}{up}")
        t = self.totals
        lines.append(f"{'total':<36} {t['read']:>8} {t['skipped']:>8} {t['duplicates']:>7} {t['train']:>8} {t['validation']:>7}")
        lines.append("")
        head = f"{'environment (agent)':<40} {'train':>8} {'valid':>7} {'tools/row':>10} {'turns/row':>10} {'prompt tokens mean/p95/max':>27}"
        lines += [head, "-" * len(head)]
        for name, e in self.environments.items():
            tok = e.get("prompt_tokens")
            tok_s = f"{tok['mean']:.0f}/{tok['p95']:.0f}/{tok['max']}" if tok else "-"
            tools = f"{e['tools_per_row']['mean']:.1f}" if "tools_per_row" in e else "-"
            turns = f"{e['turns_per_row']['mean']:.1f}" if "turns_per_row" in e else "-"
            lines.append(f"{name[:40]:<40} {e.get('train_rows', 0):>8} {e.get('validation_rows', 0):>7} "
                         f"{tools:>10} {turns:>10} {tok_s:>27}")
        skipped = [(s.label, r, n, s.examples[r][0]) for s in self.sources for r, n in sorted(s.skipped_by_reason.items())]
        if skipped:
            lines += ["", "skipped rows (first of each reason; all in report.json):"]
            lines += [f"  {label}: {reason} x{n}, e.g. {example}" for label, reason, n, example in skipped]
        return "\n".join(lines)


def _spread(values: np.ndarray, percentiles: bool = False) -> dict:
    out = {"mean": round(float(values.mean()), 2), "max": int(values.max())}
    if percentiles:
        out["p50"] = float(np.percentile(values, 50))
        out["p95"] = float(np.percentile(values, 95))
    return out


def messages_of(row: dict) -> list[dict]:
    """The row's input as chat messages (for token counts): strings, and text parts joined."""
    value = row["responses_create_params"]["input"]
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    out = []
    for item in value:
        if item.get("type", "message") == "message":
            content = item.get("content")
            if isinstance(content, list):
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            out.append({"role": item["role"], "content": content})
        else:  # earlier tool calls and results: their JSON stands in for the template's rendering
            out.append({"role": "tool" if item.get("type") == "function_call_output" else "assistant",
                        "content": json.dumps(item, ensure_ascii=False)})
    return out


def row_features(row: dict, tokenizer) -> tuple[int, int, int]:
    """(tools offered, input turns, prompt tokens: 0 without a tokenizer)."""
    params = row["responses_create_params"]
    tools = params.get("tools") or []
    messages = messages_of(row)
    tokens = 0
    if tokenizer is not None:
        chat_tools = [{"type": "function", "function": {k: t.get(k) for k in ("name", "description", "parameters")}}
                      for t in tools]
        try:
            ids = tokenizer.apply_chat_template(messages, tools=chat_tools or None, add_generation_prompt=True,
                                                tokenize=True)
            tokens = len(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        except Exception:  # templates without tool support and the like: count the plain text
            tokens = len(tokenizer("\n".join(str(m["content"]) for m in messages))["input_ids"])
    return len(tools), len(messages), tokens
