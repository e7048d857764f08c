"""Where prepare-data reads rows from, one generator per kind of source, all streaming.

Each yields RawRow(where, row, error): `where` is "file:line" (or "repo/file:row" / "task#i"), and a
row that cannot even be parsed comes with `error` instead of `row`. A source that cannot be opened
at all (missing file, unknown repo, corrupt Parquet) raises DataError naming it.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import yaml

from gymtrl.config.schema import GymDatasetSource, HFSource, PrepareSource, ReasoningGymSource
from gymtrl.data.read import iter_jsonl
from gymtrl.errors import DataError

AGENT_TYPE = "responses_api_agents"


@dataclass
class RawRow:
    where: str
    row: object = None
    error: str | None = None  # "<kind>: <detail>" when the row could not be parsed


@dataclass
class OpenedSource:
    """A source ready to stream, with what it says about routing."""
    label: str
    rows: Iterator[RawRow]
    task_source: str | None = None  # stamped on rows that have none (NeMo Gym datasets)
    agent: str | None = None  # the agent a NeMo Gym dataset declaration routes to


def source_label(i: int, src: PrepareSource) -> str:
    if src.name:
        return src.name
    if src.path:
        return "/".join(Path(src.path).parts[-3:])  # e.g. mcqa/data/example.jsonl
    if src.hf:
        return f"{src.hf.repo}:{src.hf.file or src.hf.split}"
    if src.gym_dataset:
        return f"{Path(src.gym_dataset.config).stem}:{src.gym_dataset.dataset}"
    if src.reasoning_gym:
        return "reasoning_gym:" + "+".join(src.reasoning_gym.tasks)
    return f"source{i}"


def open_source(i: int, src: PrepareSource, gym_root: str | None) -> OpenedSource:
    label = source_label(i, src)
    if src.path:
        return OpenedSource(label, file_rows(Path(src.path).expanduser(), label))
    if src.hf:
        return OpenedSource(label, hf_rows(src.hf, label))
    if src.gym_dataset:
        return gym_dataset_source(src.gym_dataset, label, gym_root)
    assert src.reasoning_gym is not None
    return OpenedSource(label, reasoning_gym_rows(src.reasoning_gym, label))


# --- local files ------------------------------------------------------------------------------
def file_rows(path: Path, label: str) -> Iterator[RawRow]:
    if not path.is_file():
        raise DataError(f"source '{label}': file not found: {path}", hint="check prepare.sources[*].path")
    if path.suffix == ".parquet":
        yield from parquet_rows(path, label)
        return
    for where, obj, error in iter_jsonl(path):
        yield RawRow(where, obj, f"malformed_json: {error}" if error else None)


def parquet_rows(path: Path, label: str) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        raise DataError(f"source '{label}': {path} is not a readable Parquet file: {e}") from None
    n = 0
    for batch in pf.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            n += 1
            yield RawRow(f"{path}:row {n}", row)


# --- the Hugging Face hub ---------------------------------------------------------------------
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


def hf_rows(hf: HFSource, label: str) -> Iterator[RawRow]:
    """Through huggingface_hub's own download and cache (HF_HOME, HF_HUB_OFFLINE apply as usual)."""
    for path in hf_files(hf, label):
        yield from file_rows(path, label)


def hf_files(hf: HFSource, label: str) -> list[Path]:
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    token = os.environ.get(hf.token_env) or None
    try:
        if hf.file:
            return [Path(hf_hub_download(hf.repo, hf.file, repo_type="dataset", revision=hf.revision, token=token))]
        root = Path(snapshot_download(hf.repo, repo_type="dataset", revision=hf.revision, token=token,
                                      allow_patterns=[f"*{s}" for s in DATA_SUFFIXES]))
    except LocalEntryNotFoundError:
        raise DataError(
            f"source '{label}': {hf.repo} is not in the local Hugging Face cache and cannot be downloaded",
            hint="connect to the hub (unset HF_HUB_OFFLINE), or download it once with `hf download --repo-type dataset "
            f"{hf.repo}`",
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise DataError(f"source '{label}': cannot fetch {hf.repo} from the Hugging Face hub: "
                        f"{type(e).__name__}: {str(e).splitlines()[0]}",
                        hint=f"check the repo id and file; a private repo needs a token in ${hf.token_env}") from None
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in DATA_SUFFIXES)
    split = re.compile(rf"(^|[/_.-]){re.escape(hf.split)}([/_.-]|$)")
    chosen = [p for p in files if split.search(p.relative_to(root).as_posix())]
    if not chosen:
        names = ", ".join(p.relative_to(root).as_posix() for p in files[:20]) or "none"
        raise DataError(f"source '{label}': no data file of split '{hf.split}' in {hf.repo} (files: {names})",
                        hint="name one with hf.file, or choose another hf.split")
    return chosen


# --- datasets declared in a NeMo Gym server config --------------------------------------------
def resolve_gym_path(path: str, gym_root: str | None) -> Path:
    """As NeMo Gym resolves config and data paths: as given, else under its install."""
    candidates = [Path(path).expanduser()]
    if gym_root:
        candidates.append(Path(gym_root) / path)
    from gymtrl.servers.gym import ENVS_ROOT  # gymtrl's own environments, in NeMo Gym's layout

    candidates.append(ENVS_ROOT / path)
    return next((c for c in candidates if c.exists()), candidates[0])


def read_gym_config(path: str, gym_root: str | None) -> dict:
    resolved = resolve_gym_path(path, gym_root)
    if not resolved.is_file():
        raise DataError(f"NeMo Gym config not found: {path} (looked under {gym_root or 'the working directory'})",
                        hint="give a path, or set prepare.gym_root to the NeMo Gym install")
    try:
        data = yaml.safe_load(resolved.read_text())
    except yaml.YAMLError as e:
        raise DataError(f"{resolved}: invalid YAML: {e}") from None
    return data if isinstance(data, dict) else {}


def declared_datasets(config: dict) -> Iterator[tuple[str, str, dict]]:
    """(declaring instance, its server type, dataset declaration) for every `datasets:` entry."""
    for name, instance in config.items():
        if not isinstance(instance, dict):
            continue
        for server_type, impls in instance.items():
            if not isinstance(impls, dict):
                continue
            for block in impls.values():
                if isinstance(block, dict):
                    for ds in block.get("datasets") or []:
                        if isinstance(ds, dict):
                            yield str(name), str(server_type), ds


def gym_dataset_source(gd: GymDatasetSource, label: str, gym_root: str | None) -> OpenedSource:
    from gymtrl.gym.discovery import topology_from_config

    config = read_gym_config(gd.config, gym_root)
    found = [(n, t, ds) for n, t, ds in declared_datasets(config) if gd.dataset in (ds.get("name"), ds.get("type"))]
    if not found:
        names = sorted({f"{ds.get('name')} ({ds.get('type')})" for _, _, ds in declared_datasets(config)})
        raise DataError(f"source '{label}': {gd.config} declares no dataset '{gd.dataset}'",
                        hint=f"it declares: {', '.join(names) or 'none'}")
    instance, _, ds = found[0]
    agent = topology_from_config(config, require_address=False).agent_for_task_source(instance)
    local = resolve_gym_path(str(ds.get("jsonl_fpath", "")), gym_root)
    if local.is_file():
        return OpenedSource(label, file_rows(local, label), task_source=instance, agent=agent)
    hub = hub_identifier(ds)
    if not (gd.download and hub):
        raise DataError(f"source '{label}': {ds.get('jsonl_fpath')} is not on disk"
                        + ("" if hub else " and the declaration names no Hugging Face source"),
                        hint="download it (gym dataset collate --download), or set gym_dataset.download=true")
    return OpenedSource(label, hf_rows(hub, label), task_source=instance, agent=agent)


def hub_identifier(ds: dict) -> HFSource | None:
    """The Hugging Face location in a NeMo Gym dataset declaration (new `source:` or older form)."""
    src = ds.get("source")
    if isinstance(src, dict) and src.get("type") == "huggingface" and src.get("repo_id"):
        ident = src
    elif isinstance(ds.get("huggingface_identifier"), dict):
        ident = ds["huggingface_identifier"]
    else:
        return None
    return HFSource(repo=ident["repo_id"], file=ident.get("artifact_fpath"), split=str(ds.get("type", "train")))


# --- reasoning-gym ----------------------------------------------------------------------------
def reasoning_gym_rows(rg: ReasoningGymSource, label: str) -> Iterator[RawRow]:
    """Rows as NeMo Gym's reasoning_gym server verifies them: the question as the user message (after
    the source's system prompt, if any), and the generator's question, answer and metadata (metadata.source_dataset names the scorer)."""
    try:
        import reasoning_gym
    except ImportError:
        raise DataError(f"source '{label}': the reasoning-gym package is not installed",
                        hint="pip install reasoning-gym==0.1.25 (the version NeMo Gym 0.7.0's verifier uses)") from None
    try:
        if len(rg.tasks) == 1:
            dataset = reasoning_gym.create_dataset(rg.tasks[0], size=rg.size, seed=rg.seed, **rg.config.get(rg.tasks[0], {}))
        else:
            from reasoning_gym.composite import DatasetSpec

            specs = [DatasetSpec(name=t, weight=1.0, config=dict(rg.config.get(t, {}))) for t in rg.tasks]
            dataset = reasoning_gym.create_dataset("composite", size=rg.size, seed=rg.seed, datasets=specs)
    except Exception as e:  # unknown task names and bad settings surface as various types
        raise DataError(f"source '{label}': reasoning-gym cannot build {rg.tasks}: {type(e).__name__}: {e}",
                        hint="task names are reasoning-gym's (e.g. mini_sudoku, basic_arithmetic)") from None
    system = reasoning_gym_system_prompt(rg.system_prompt)
    for i in range(rg.size):
        where = f"{label}#{i}"
        try:
            entry = dataset[i]
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": entry["question"]}]
            row = {"responses_create_params": {"input": messages}, **entry}
            # JSON types only, as a file would hold: metadata values JSON has no type for (a
            # Fraction in gsm_symbolic's) are written as their text.
            yield RawRow(where, json.loads(json.dumps(row, default=str)))
        except Exception as e:
            yield RawRow(where, error=f"generator_error: {type(e).__name__}: {e}")


def reasoning_gym_system_prompt(value: str | None) -> str | None:
    """reasoning-gym's prompt of that name (default, simple, direct, DeepSeekZero), else the text itself."""
    if not value:
        return None
    from reasoning_gym.utils import SYSTEM_PROMPTS

    return SYSTEM_PROMPTS.get(value, value)


