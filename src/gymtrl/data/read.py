"""Read NeMo Gym JSONL rows, each checked at the boundary and remembered with its file:line."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from gymtrl.errors import DataError


@dataclass
class DatasetRow:
    data: dict  # the row exactly as written: sent whole to the agent's /run
    where: str  # "file:line", for every message about this row


def check_row(row: object, where: str) -> dict:
    """The minimum every NeMo Gym row needs before it can be routed and run."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    params = row.get("responses_create_params")
    if not isinstance(params, dict):
        raise DataError(
            f"{where}: row has no 'responses_create_params' object",
            hint="each NeMo Gym row carries responses_create_params with at least 'input'",
        )
    if "input" not in params:
        raise DataError(f"{where}: responses_create_params has no 'input'")
    return row


def assign_agent(row: dict, agent: str, where: str) -> dict:
    """Route a row to `agent` unless it already names one; naming a different one is an error."""
    ref = row.get("agent_ref")
    if isinstance(ref, dict) and ref.get("name"):
        if ref["name"] != agent:
            raise DataError(f"{where}: row's agent_ref.name '{ref['name']}' conflicts with the source's agent '{agent}'")
        return row
    if row.get("task_source"):
        return row  # routed by NeMo Gym's rule; checked against the running agents later
    return {**row, "agent_ref": {"type": "responses_api_agents", "name": agent}}


def iter_jsonl(path: Path) -> Iterator[tuple[str, object, str | None]]:
    """(where, parsed object, None) or (where, None, error) for each non-blank line of a JSONL file."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                yield where, None, "line is not valid UTF-8"
                continue
            if not line:
                continue
            try:
                yield where, json.loads(line), None
            except json.JSONDecodeError as e:
                yield where, None, f"malformed JSON: {e.msg} (column {e.colno})"


def read_jsonl(path: str | Path, max_rows: int | None = None, agent: str | None = None) -> list[DatasetRow]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"dataset file not found: {path}", hint="check data.train / data.eval in the config")
    rows: list[DatasetRow] = []
    for where, obj, error in iter_jsonl(path):
        if error is not None:
            raise DataError(f"{where}: {error}")
        row = check_row(obj, where)
        rows.append(DatasetRow(assign_agent(row, agent, where) if agent else row, where))
        if max_rows is not None and len(rows) >= max_rows:
            break
    if not rows:
        raise DataError(f"{path}: no rows", hint="the file is empty or holds only blank lines")
    return rows


def read_split(sources: list, max_rows: int | None = None) -> list[DatasetRow]:
    """All rows of a split's sources (DataSource: .path, .agent), in order."""
    rows: list[DatasetRow] = []
    for source in sources:
        rows += read_jsonl(source.path, agent=source.agent)
    return rows[:max_rows] if max_rows is not None else rows
