"""Loads the one versioned prompt file (prompts.yaml beside this module).

Prompts use ``$name`` placeholders (string.Template), so JSON braces in a prompt
need no escaping.
"""
from __future__ import annotations

import functools
from pathlib import Path
from string import Template
from typing import Any

import yaml

from opensubject_tasks.errors import ConfigError

PROMPTS_FILE = Path(__file__).with_name("prompts.yaml")


@functools.lru_cache(maxsize=8)
def load_prompts(path: Path = PROMPTS_FILE) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"prompt file {path} cannot be read: {exc}") from exc
    if not isinstance(data, dict) or "version" not in data:
        raise ConfigError(f"prompt file {path} must be a mapping with a `version:` key")
    return data


def prompts_version(path: Path = PROMPTS_FILE) -> str:
    return str(load_prompts(path)["version"])


def prompt_text(key: str, field: str = "prompt", path: Path = PROMPTS_FILE, **values: Any) -> str:
    """The prompt at ``key.field`` (or ``key`` when it is a plain string) with values filled in."""
    entry = load_prompts(path).get(key)
    text = entry.get(field) if isinstance(entry, dict) else entry
    if not isinstance(text, str):
        raise ConfigError(f"prompt file {path} has no text at {key}.{field}")
    try:
        return Template(text).substitute(values)
    except KeyError as exc:
        raise ConfigError(f"prompt {key}.{field} needs a value for {exc}") from None
