"""The grpo section against TRL's GRPOConfig: its field names, the type of each scalar field, and a
value written for it as GRPOConfig takes it (YAML 1.1 booleans and numbers written as strings)."""

from __future__ import annotations

import dataclasses
from typing import Any

from gymtrl.errors import ConfigError

# YAML 1.1 reads these words as booleans; on the command line they stay words (save_strategy=no),
# and typed boolean keys still accept them (OmegaConf and normalise_grpo convert).
YAML11_BOOL_WORDS = {"yes", "no", "on", "off", "y", "n"}


def grpo_field_names() -> list[str]:
    from trl import GRPOConfig  # imported late: trl pulls in torch (seconds)

    return [f.name for f in dataclasses.fields(GRPOConfig) if f.init]


def grpo_field_kinds() -> dict[str, tuple[str, bool]]:
    """GRPOConfig's scalar fields: name -> (int | float | bool, accepts None). Fields of any other
    type (enums, unions with str, lists) are left to TRL."""
    from trl import GRPOConfig

    kinds = {}
    for f in dataclasses.fields(GRPOConfig):
        spelled = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        parts = {p.strip() for p in spelled.replace("Optional[", "").replace("]", "").split("|")}
        optional = "None" in parts
        parts.discard("None")
        if len(parts) == 1 and (kind := parts.pop()) in ("int", "float", "bool"):
            kinds[f.name] = (kind, optional)
    return kinds


KIND_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false"}


def typed_grpo_value(key: str, value: Any, kind: str, optional: bool, where: str) -> Any:
    """`value` as GRPOConfig's field `key` takes it (a number written as a string, such as YAML 1.1's
    `1e-5`, becomes one), or a ConfigError naming the key, the type and the value."""
    if value is None and optional:
        return None
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in YAML11_BOOL_WORDS | {"true", "false"}:
            return value.lower() in ("yes", "on", "y", "true")
    elif isinstance(value, bool):
        pass
    elif kind == "int" and isinstance(value, int):
        return value
    elif kind == "float" and isinstance(value, (int, float)):
        return value
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
        if number is not None and kind == "float":
            return number
        if number is not None and kind == "int" and number.is_integer() and "." not in value:
            return int(number)
    raise ConfigError(f"{where}: grpo.{key}: expected {KIND_WORDS[kind]}{' (or null)' if optional else ''}, "
                      f"got {value!r:.60}", hint=f"grpo.{key} is TRL GRPOConfig's {kind} field {key}")


def normalise_grpo(grpo: dict) -> dict:
    """YAML 1.1 booleans against GRPOConfig's field types: `save_strategy: no` reads as False, which
    TRL rejects (it means the word "no"); `bf16: "no"` means False."""
    from trl import GRPOConfig

    types = {f.name: str(f.type) for f in dataclasses.fields(GRPOConfig)}
    out = dict(grpo)
    for key, value in grpo.items():
        kind = types.get(key, "")
        takes_bool = "bool" in kind
        if value is False and not takes_bool:
            out[key] = "no"
        elif isinstance(value, str) and takes_bool and "str" not in kind and value.lower() in YAML11_BOOL_WORDS | {"true", "false"}:
            out[key] = value.lower() in ("yes", "on", "y", "true")
    for key, (kind, optional) in grpo_field_kinds().items():  # "1e-5" (YAML 1.1 reads it as a string) -> 1e-05
        if key in out:
            out[key] = typed_grpo_value(key, out[key], kind, optional, "grpo")
    return out
