"""gymtrl prepare-data, top to bottom:

  1. stream every source: parse, validate, route; good rows go to an on-disk spool, and only a
     hash, an offset and a few counts per row stay in memory (under 100 bytes a row at the peak,
     measured by bench/prepare_memory.py), never the rows themselves;
  2. dedupe by content across all sources (first occurrence wins);
  3. per source: seeded shuffle, hold out validation rows, sample its training share (mix.py);
  4. write train.jsonl and validation.jsonl (seeded order) and report.json, each atomically.

The same config and seed give byte-identical output.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import zlib
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gymtrl.config.schema import PrepareConfig, PrepareSource
from gymtrl.errors import DataError
from gymtrl.gym.discovery import GymTopology, topology_from_config
from gymtrl.prepare.mix import plan_train_counts, sample
from gymtrl.prepare.report import Report, SourceReport, row_features
from gymtrl.prepare.sources import OpenedSource, open_source, read_gym_config
from gymtrl.prepare.validate import infer_env, schema_problem, verifier_problem

log = logging.getLogger(__name__)
AGENT_TYPE = "responses_api_agents"
# Keys that name a row rather than describe it: two rows equal but for these are duplicates.
IDENTITY_KEYS = ("id", "uuid", "_ng_task_index", "_ng_rollout_id")


@dataclass
class Spool:
    """A source's good rows as written out, plus per-row index arrays."""
    path: Path
    offsets: array = field(default_factory=lambda: array("Q"))
    hashes: array = field(default_factory=lambda: array("Q"))
    envs: array = field(default_factory=lambda: array("H"))  # index into Report.env_names
    tools: array = field(default_factory=lambda: array("H"))
    turns: array = field(default_factory=lambda: array("H"))
    prompt_tokens: array = field(default_factory=lambda: array("I"))


def content_hash(row: dict) -> int:
    body = {k: v for k, v in row.items() if k not in IDENTITY_KEYS}
    digest = hashlib.blake2b(json.dumps(body, sort_keys=True, ensure_ascii=False).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def static_topology(gym_configs: list[str], gym_root: str | None) -> GymTopology:
    merged: dict = {}
    for path in gym_configs:
        merged.update(read_gym_config(path, gym_root))
    return topology_from_config(merged, require_address=False)


def route(row: dict, src: PrepareSource, opened: OpenedSource, topo: GymTopology) -> tuple[str | None, str | None]:
    """(agent, problem). The row's agent_ref, else the source's agent, else its task_source resolved
    with NeMo Gym's rule against prepare.gym_configs (a pin, the declaring agent, or the unique agent
    of the declaring resources server). A row whose own routing disagrees with the source's is an
    agent_conflict."""
    declared = src.agent or opened.agent
    ref = row.get("agent_ref")
    named = ref.get("name") if isinstance(ref, dict) else None
    if named:
        if declared and named != declared:
            return None, f"agent_conflict: row names agent '{named}', the source routes to '{declared}'"
        return str(named), None
    task_source = row.get("task_source") or opened.task_source
    resolved = topo.agent_for_task_source(str(task_source)) if task_source else None
    if declared:
        if resolved and resolved != declared:
            return None, (f"agent_conflict: the row's task_source '{task_source}' routes to '{resolved}', "
                          f"the source to '{declared}'")
        return declared, None
    if resolved:
        return resolved, None
    if task_source:
        return None, (f"unroutable: task_source '{task_source}' resolves to no agent in prepare.gym_configs"
                      " (set the source's agent, or list the config that declares it)")
    return None, "unroutable: no agent_ref or task_source, and the source names no agent"


def prepare(prep: PrepareConfig) -> Report:
    gym_root = prep.gym_root
    out_dir = Path(prep.output_dir).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    topo = static_topology(prep.gym_configs or [], gym_root)
    tokenizer = load_tokenizer(prep.tokenizer) if prep.tokenizer else None
    report = Report(seed=prep.seed, output_dir=str(out_dir))
    with tempfile.TemporaryDirectory(prefix=".prepare-", dir=out_dir) as tmp:
        spools = [read_source(i, src, topo, gym_root, Path(tmp), report, prep, tokenizer)
                  for i, src in enumerate(prep.sources)]
        keep = dedupe(spools, report) if prep.dedupe else [np.arange(len(s.offsets)) for s in spools]
        train, validation = select(prep, spools, keep, report)
        write_rows(out_dir / "train.jsonl", spools, train)
        write_rows(out_dir / "validation.jsonl", spools, validation)
        report.summarise(spools, train, validation)
    report.write(out_dir / "report.json")
    return report


def read_source(i: int, src: PrepareSource, topo: GymTopology, gym_root: str | None, tmp: Path,
                report: Report, prep: PrepareConfig, tokenizer) -> Spool:
    opened = open_source(i, src, gym_root)
    label = opened.label if all(s.label != opened.label for s in report.sources) else f"{opened.label}#{i}"
    stats = SourceReport(label)
    report.sources.append(stats)
    spool = Spool(tmp / f"{i}.jsonl")
    with spool.path.open("wb") as out, progress(prep, label) as bar:
        for raw in opened.rows:
            stats.read += 1
            bar.update(1)
            problem = raw.error or schema_problem(raw.row)
            agent = None
            if problem is None:
                agent, problem = route(raw.row, src, opened, topo)  # type: ignore[arg-type]
            env = src.env or infer_env(agent)
            if problem is None:
                problem = verifier_problem(raw.row, env)  # type: ignore[arg-type]
            if problem is not None:
                if prep.strict:
                    raise DataError(f"{raw.where}: {problem}", hint="fix the row, or drop --strict to skip and count bad rows")
                stats.skip(raw.where, problem)
                continue
            row = dict(raw.row)  # type: ignore[call-overload]
            if opened.task_source and "task_source" not in row:
                row["task_source"] = opened.task_source
            row["agent_ref"] = {"type": AGENT_TYPE, "name": agent}
            line = (json.dumps(row, ensure_ascii=False) + "\n").encode()
            spool.offsets.append(out.tell())
            out.write(line)
            spool.hashes.append(content_hash(row))
            spool.envs.append(report.env_index(str(agent)))
            tools, turns, tokens = row_features(row, tokenizer)
            spool.tools.append(min(tools, 65535))
            spool.turns.append(min(turns, 65535))
            spool.prompt_tokens.append(tokens)
    stats.good = len(spool.offsets)
    log.debug("source %s: %d rows read, %d good, %d skipped", label, stats.read, stats.good, stats.skipped)
    return spool


def dedupe(spools: list[Spool], report: Report) -> list[np.ndarray]:
    """Indices of each source's rows that are not a repeat of an earlier row (in any source)."""
    sizes = [len(s.hashes) for s in spools]
    hashes = np.concatenate([np.frombuffer(s.hashes, dtype=np.uint64) for s in spools]) if spools else np.array([], np.uint64)
    _, first = np.unique(hashes, return_index=True)  # index of each value's first occurrence
    unique = np.zeros(len(hashes), dtype=bool)
    unique[first] = True
    del hashes, first
    keep, start = [], 0
    for stats, n in zip(report.sources, sizes):
        mask = unique[start:start + n]
        stats.duplicates = int(n - mask.sum())
        keep.append(np.flatnonzero(mask).astype(np.int32))
        start += n
    return keep


def source_rng(seed: int, i: int, label: str) -> np.random.Generator:
    # Keyed by position and label: a source added at the end leaves the others' shuffles as they were.
    return np.random.default_rng([seed, i, zlib.crc32(label.encode())])


def select(prep: PrepareConfig, spools: list[Spool], keep: list[np.ndarray],
           report: Report) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation): rows as (source, row) pairs, each in a seeded order."""
    pools, held_out, rngs = [], [], []
    for i, (src, idx, stats) in enumerate(zip(prep.sources, keep, report.sources)):
        rng = source_rng(prep.seed, i, stats.label)
        shuffled = idx[rng.permutation(len(idx)).astype(np.int32)]
        n_val = src.validation_count if src.validation_count is not None else round(src.validation_fraction * len(idx))
        if n_val > len(idx):
            raise DataError(f"source '{stats.label}': validation_count={n_val} but only {len(idx)} rows are left")
        held_out.append(np.sort(shuffled[:n_val]))
        pools.append(shuffled[n_val:])
        rngs.append(rng)
    plan = plan_train_counts([len(p) for p in pools], [s.ratio for s in prep.sources],
                             [s.count for s in prep.sources], prep.max_rows, [s.label for s in report.sources])
    train_parts, val_parts = [], []
    for i, (pool, k, stats) in enumerate(zip(pools, plan, report.sources)):
        chosen = sample(pool, k, rngs[i])
        stats.train, stats.validation = len(chosen), len(held_out[i])
        stats.upsampled = k > len(pool)
        # (source, row) pairs as int32: 8 bytes per output row.
        train_parts.append(np.stack([np.full(len(chosen), i, np.int32), chosen.astype(np.int32)], axis=1))
        val_parts.append(np.stack([np.full(len(held_out[i]), i, np.int32), held_out[i].astype(np.int32)], axis=1))
    mixer = np.random.default_rng([prep.seed, 2**31 - 1])
    train = np.concatenate(train_parts) if train_parts else np.zeros((0, 2), np.int32)
    validation = np.concatenate(val_parts) if val_parts else np.zeros((0, 2), np.int32)
    return train[mixer.permutation(len(train))], validation[mixer.permutation(len(validation))]


def write_rows(path: Path, spools: list[Spool], order: np.ndarray) -> None:
    """The chosen rows, in order, read back from the spools; replaces `path` only once complete."""
    files = [s.path.open("rb") for s in spools]
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("wb") as out:
            for source, idx in order:
                f = files[source]
                f.seek(spools[source].offsets[idx])
                out.write(f.readline())
            out.flush()
            os.fsync(out.fileno())
        tmp.replace(path)
    finally:
        for f in files:
            f.close()
        tmp.unlink(missing_ok=True)


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise DataError(f"prepare.tokenizer: cannot load '{name}': {str(e).splitlines()[0]}") from None


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def progress(prep: PrepareConfig, label: str):
    if not prep.progress_bar:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(desc=label, unit=" rows", mininterval=0.5, leave=False)

