"""Loads synthesis_prompts.yaml: the prompts, negative prompts and per-model defaults
(steps, guidance, strength) that stage 3 uses with each inpainting model family."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Any

import numpy as np
import yaml

from opensubject_tasks.errors import ConfigError

SYNTHESIS_PROMPTS_FILE = Path(__file__).with_name("synthesis_prompts.yaml")
REQUESTS = ("outpaint", "replace", "remove")


@dataclass(frozen=True)
class SynthesisPrompt:
    request: str                 # outpaint | replace | remove
    prompt: str
    negative: str                # "" where the family takes no negative prompt
    replacement: str | None = None


@functools.lru_cache(maxsize=4)
def load(path: Path = SYNTHESIS_PROMPTS_FILE) -> dict[str, Any]:
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"synthesis prompt file {path} cannot be read: {exc}") from exc
    if not isinstance(doc, dict) or "version" not in doc or not isinstance(doc.get("families"), dict):
        raise ConfigError(f"synthesis prompt file {path} needs `version` and `families`")
    for name, fam in doc["families"].items():
        if "outpaint" not in fam or not ({"replace", "remove"} & set(fam)):
            raise ConfigError(f"synthesis prompt family {name!r} needs `outpaint` and `replace` or `remove`")
    return doc


def version() -> str:
    return str(load()["version"])


def family_for(pipeline_class: str) -> str:
    """The family of a diffusers pipeline class name (SD inpainting when none matches)."""
    for name, fam in load()["families"].items():
        if pipeline_class in (fam.get("match") or []):
            return name
    return "sd"


def family(name: str) -> dict[str, Any]:
    fams = load()["families"]
    if name not in fams:
        raise ConfigError(f"no synthesis prompt family {name!r}; known: {', '.join(fams)}")
    return fams[name]


def defaults(name: str) -> dict[str, Any]:
    """steps, guidance_scale, strength documented for the family's models."""
    return dict(family(name).get("defaults") or {})


def paints_objects(name: str) -> bool:
    return bool(family(name).get("paints_objects"))


def _words(text: str) -> set[str]:
    from opensubject_tasks.backends.categories import singular

    return {singular(w) for w in text.lower().replace("-", " ").split() if w.isalpha() and w not in ("of", "a", "an")}


def same_kind(category: str, replacement: str) -> bool:
    """Is ``replacement`` the subject's own kind: a word in common (singular forms: "book"
    and "stack of books"), or the category one of the kinds the replacement is
    (``replacement_kinds``: a backpack is a bag)? Whole words only: a car is not a
    cardboard box."""
    cat = _words(category)
    kinds = (load().get("replacement_kinds") or {}).get(replacement, [])
    if cat & _words(replacement):
        return True
    phrase = " ".join(sorted(cat))
    return any(cat & _words(k) and (len(_words(k)) == 1 or " ".join(sorted(_words(k))) == phrase) for k in kinds)


def pick_replacement(rng: np.random.Generator, category: str) -> str:
    """A replacement object that is not the subject's kind (seeded)."""
    options = [r for r in load()["replacements"] if not same_kind(category, r)]
    if not options:
        raise ConfigError(f"no replacement in synthesis_prompts.yaml differs from the category {category!r}")
    return options[int(rng.integers(len(options)))]


def synthesis_prompt(name: str, request: str, category: str, replacement: str | None = None) -> SynthesisPrompt:
    """The prompt and negative prompt of one request for one family."""
    fam = family(name)
    if request not in REQUESTS or request not in fam:
        raise ConfigError(f"synthesis prompt family {name!r} has no {request!r} request")
    values = {"category": category, "replacement": replacement or ""}
    entry = fam[request]
    prompt = Template(entry.get("prompt", "")).substitute(values)
    negative = "" if fam.get("negatives") is False else Template(entry.get("negative", "")).substitute(values)
    return SynthesisPrompt(request, prompt, negative, replacement if request == "replace" else None)
