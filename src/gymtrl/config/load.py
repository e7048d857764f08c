"""Load a config: YAML file, then `key=value` overrides, merged over the typed schema.

Every mistake becomes one ConfigError that names the file (and line, where there is one), the key,
and what to do: a missing file, invalid YAML, an unknown key (with the closest valid one), a value
of the wrong type, a required key left unset, a GRPOConfig field that does not exist.
"""

from __future__ import annotations

import dataclasses
import glob
import difflib
import os
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gymtrl.atomic import write_text_atomic
from gymtrl.config.checks import check_prepare, check_values
from gymtrl.config.grpo_values import (YAML11_BOOL_WORDS, grpo_field_kinds, grpo_field_names, normalise_grpo,
                                       typed_grpo_value)
from gymtrl.config.schema import Config, PrepareConfig
from gymtrl.net import server_root
from gymtrl.errors import ConfigError

# GRPOConfig fields gymtrl sets itself, and the gymtrl key to use instead.
GRPO_FIELDS_OWNED = {
    "output_dir": "output.dir",
    "use_vllm": "sync.strategy",
    "vllm_mode": "sync.strategy",
    "vllm_server_base_url": "vllm.base_url",
    "vllm_server_host": "vllm.base_url",
    "vllm_server_port": "vllm.base_url",
    "reward_weights": "rewards.env_weight and rewards.functions[].weight",
}


def _closest(name: str, choices: list[str]) -> str:
    match = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _key_line(source: str, yaml_text: str | None, path: list[str]) -> str:
    """`file:line` of a key path in the YAML text, or just the source name."""
    if yaml_text is None:
        return source
    try:
        node = yaml.compose(yaml_text)
        for part in path:
            if not isinstance(node, yaml.MappingNode):
                return source
            for k, v in node.value:
                if k.value == part:
                    line = k.start_mark.line + 1
                    node = v
                    break
            else:
                return source
        return f"{source}:{line}"
    except yaml.YAMLError:
        return source


def _check_keys(data: Any, schema: type, path: list[str], source: str, text: str | None) -> None:
    if not isinstance(data, dict):
        return
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in data.items():
        key = str(key)
        here = path + [key]
        if key not in fields:
            raise ConfigError(
                f"{_key_line(source, text, here)}: unknown key '{'.'.join(here)}'{_closest(key, list(fields))}",
                hint=f"valid keys in '{'.'.join(path) or 'the top level'}': {', '.join(fields)}",
            )
        sub = _schema_type(schema, key)
        expects_mapping = sub is not None or (key == "grpo" and not path)
        if expects_mapping and value is not None and not isinstance(value, dict):
            raise ConfigError(f"{_key_line(source, text, here)}: '{'.'.join(here)}' must be a mapping of keys to "
                              f"values, got {type(value).__name__} {value!r:.60}")
        if sub is not None:
            _check_keys(value, sub, here, source, text)
        elif key == "grpo" and not path and isinstance(value, dict):
            _check_grpo_keys(value, source, text)


def _schema_type(schema: type, key: str) -> type | None:
    """The dataclass type of a nested section, if `key` is one."""
    f = next(f for f in dataclasses.fields(schema) if f.name == key)
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
        if dataclasses.is_dataclass(value):
            return type(value)
    return None


def _check_grpo_keys(grpo: dict, source: str, text: str | None) -> None:
    names = grpo_field_names()
    kinds = grpo_field_kinds()
    for key in grpo:
        where = _key_line(source, text, ["grpo", str(key)])
        if key in GRPO_FIELDS_OWNED:
            raise ConfigError(
                f"{where}: 'grpo.{key}' is set by gymtrl; use '{GRPO_FIELDS_OWNED[key]}' instead",
            )
        if key not in names:
            raise ConfigError(
                f"{where}: unknown key 'grpo.{key}': not a field of trl.GRPOConfig{_closest(str(key), names)}",
                hint="the grpo section is passed to TRL's GRPOConfig; see its documentation for the fields",
            )
        if key in kinds:
            typed_grpo_value(str(key), grpo[key], *kinds[key], where)


class DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key: str, line: int, first_line: int):
        super().__init__(f"duplicate key {key!r}")
        self.key, self.line, self.first_line = key, line, first_line


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error, not a silent overwrite."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise DuplicateKeyError(str(key), line, seen[key])
                seen[key] = line
            except TypeError:  # an unhashable key: let the base class say so
                continue
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> tuple[dict, str]:
    if not path.exists():
        raise ConfigError(f"config file not found: {path}", hint="pass an existing YAML file to --config")
    if path.is_dir():
        raise ConfigError(f"config path is a directory, not a file: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text: byte {e.start} is 0x{raw[e.start]:02x}",
                          hint="save the file as UTF-8") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except DuplicateKeyError as e:
        raise ConfigError(f"{path}:{e.line}: duplicate key '{e.key}' (first at line {e.first_line})",
                          hint="keep one of them: YAML would silently keep the last") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, data:, ...)")
    return data, text


def _parse_overrides(overrides: list[str]) -> dict:
    dotlist = []
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override '{item}' is not of the form key=value (for example grpo.max_steps=10)")
        key, value = item.split("=", 1)
        dotlist.append(f"{key}='{value}'" if value.lower() in YAML11_BOOL_WORDS else item)
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(dotlist), resolve=False)  # type: ignore[return-value]
    except (OmegaConfBaseException, yaml.YAMLError) as e:  # OmegaConf parses values as YAML
        raise ConfigError(f"cannot parse overrides {overrides}: {str(e).splitlines()[0]}") from None


def _missing_keys(cfg: Any, prefix: str = "") -> list[str]:
    out = []
    for key in cfg:
        full = f"{prefix}{key}"
        if OmegaConf.is_missing(cfg, key):
            out.append(full)
        elif OmegaConf.is_dict(cfg[key]):
            out += _missing_keys(cfg[key], full + ".")
    return out


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, (str, dict)) else value


def _as_sources(value: Any) -> Any:
    """data.train / data.eval: a path, {path, agent}, or a list of either -> list of {path, agent}."""
    value = _as_list(value)
    if isinstance(value, list):
        return [{"path": v} if isinstance(v, str) else v for v in value]
    return value


def _merge(path: str | os.PathLike, overrides: list[str] | None) -> tuple[Any, Path, str]:
    """The file and overrides, checked for unknown keys and merged over the defaults (unresolved)."""
    path = Path(path)
    data, text = _read_yaml(path)
    override_data = _parse_overrides(overrides or [])
    _check_keys(data, Config, [], str(path), text)
    _check_keys(override_data, Config, [], "command-line override", None)
    # A single path is accepted where a list of paths is expected.
    for section in (data, override_data):
        for key in ("train", "eval"):
            if isinstance(section.get("data"), dict) and key in section["data"]:
                section["data"][key] = _as_sources(section["data"][key])
        launch = (section.get("gym") or {}).get("launch") if isinstance(section.get("gym"), dict) else None
        if isinstance(launch, dict) and isinstance(launch.get("config_paths"), str):
            launch["config_paths"] = [launch["config_paths"]]
    env_yaml = ((override_data.get("gym") or {}).get("env_yaml") if isinstance(override_data.get("gym"), dict) else None) \
        or ((data.get("gym") or {}).get("env_yaml") if isinstance(data.get("gym"), dict) else None)
    from_env_yaml = _vllm_from_env_yaml(str(env_yaml)) if env_yaml else {}
    try:
        # Precedence: defaults < NeMo Gym env.yaml < the config file < command-line overrides.
        merged = OmegaConf.merge(OmegaConf.structured(Config), from_env_yaml, data, override_data)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        msg = str(e).splitlines()[0]
        raise ConfigError(
            f"{_key_line(str(path), text, str(key).split('.'))}: bad value for '{key}': {msg}"
        ) from None
    except (TypeError, ValueError) as e:  # shapes OmegaConf cannot merge at all (a list for a mapping...)
        raise ConfigError(f"{path}: the config's structure does not match gymtrl's: {e}") from None
    return merged, path, text


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> Config:
    """Read `path`, apply `overrides`, validate, and return the typed Config (for training)."""
    merged, path, text = _merge(path, overrides)
    missing = _missing_keys(merged)
    if missing:
        raise ConfigError(
            f"{path}: required key(s) not set: {', '.join(missing)}",
            hint="set them in the file or on the command line, e.g. model.name_or_path=Qwen/Qwen2.5-0.5B-Instruct",
        )
    cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    cfg.grpo = normalise_grpo(cfg.grpo)
    check_values(cfg, str(path))
    return cfg


def load_prepare_config(path: str | os.PathLike, overrides: list[str] | None = None) -> PrepareConfig:
    """The `prepare` section only (for `gymtrl prepare-data`): the training sections may be
    incomplete in a data-only file. Its gym_configs default to gym.launch.config_paths."""
    merged, path, text = _merge(path, overrides)
    try:
        prep: PrepareConfig = OmegaConf.to_object(merged.prepare)  # type: ignore[assignment]
        gym_configs = OmegaConf.to_object(merged.gym.launch.config_paths)
        gym_venv = merged.gym.launch.venv
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise ConfigError(f"{_key_line(str(path), text, str(key).split('.'))}: '{key}': "
                          f"{str(e).splitlines()[0]}") from None
    if prep.gym_configs is None:
        prep.gym_configs = list(gym_configs)  # type: ignore[arg-type]
    if prep.gym_root is None:
        prep.gym_root = gym_site_of(gym_venv)
    check_prepare(prep, str(path), _key_line(str(path), text, ["prepare", "sources"]))
    return prep


def read_env_yaml(path: str) -> dict:
    """A NeMo Gym env.yaml (the file `gym env start` reads its policy_* values from)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"gym.env_yaml: file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"gym.env_yaml: {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"gym.env_yaml: {p} must be a mapping (policy_base_url: ..., policy_model_name: ...)")
    return data


def _vllm_from_env_yaml(path: str) -> dict:
    env = read_env_yaml(path)
    vllm: dict = {}
    if env.get("policy_base_url"):
        # NeMo Gym's policy_base_url is the OpenAI base (".../v1"); gymtrl wants the server root.
        vllm["base_url"] = server_root(str(env["policy_base_url"]))
    if env.get("policy_model_name"):
        vllm["served_model_name"] = str(env["policy_model_name"])
    return {"vllm": vllm} if vllm else {}


def export_env_yaml_api_key(cfg: Config) -> None:
    """Make env.yaml's policy_api_key the vLLM API key (in this process's environment, under
    vllm.api_key_env, unless that is already set), so it never lands in a config or a log."""
    if not cfg.gym.env_yaml:
        return
    key = read_env_yaml(cfg.gym.env_yaml).get("policy_api_key")
    if key and str(key) != "EMPTY" and not os.environ.get(cfg.vllm.api_key_env):
        os.environ[cfg.vllm.api_key_env] = str(key)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def write_resolved_config(cfg: Config, out_dir: str | os.PathLike) -> Path:
    """Write the config as resolved (defaults filled in) to <out_dir>/config.yaml, atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(out / "config.yaml", to_yaml(cfg))


__all__ = ["load_config", "write_resolved_config", "to_yaml"]


def gym_site_of(venv: str | None) -> str | None:
    """A venv's site-packages: where NeMo Gym's config and data paths resolve."""
    if not venv:
        return None
    found = sorted(glob.glob(str(Path(venv).expanduser() / "lib" / "python3*" / "site-packages")))
    return found[-1] if found else None
