"""Typed configuration: schema.py says what can be set, load.py reads YAML + overrides into it,
checks.py holds the rules its values must follow."""

from gymtrl.config.load import load_config, write_resolved_config
from gymtrl.config.schema import Config

__all__ = ["Config", "load_config", "write_resolved_config"]
