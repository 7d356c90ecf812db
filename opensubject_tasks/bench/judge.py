"""The VLM judge: fixed, versioned rubric prompts and a strict score parser.

A reply that cannot be read as exactly one score from 0 to 10 is retried a bounded
number of times (with the rubric's format reminder, or the same prompt when it has
none); if it still cannot be read, the result is *unscored* and keeps the raw replies.
No score is ever invented.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import yaml

from opensubject_tasks.errors import ConfigError, TransientError

RUBRIC_FILE = Path(__file__).with_name("rubrics.yaml")
SCORE_MIN, SCORE_MAX = 0.0, 10.0

_NUM = r"[-+]?\d+(?:\.\d+)?"
_OUT_OF_TEN = r"(?:\s*(?:/|out\s+of)\s*10(?:\.0+)?\b)?"
# "Score: 7", "**Score:** 7/10", "score (0-10) = 7", "the score is 7 out of 10"
_LABELLED = re.compile(
    rf"\bscore\b\**\s*(?:\([^)]*\)\s*)?(?:[:=]|\bis\b|\bof\b)\s*\**\s*({_NUM}){_OUT_OF_TEN}", re.I)
# Any number not glued to a word; "7/10" counts as one number.
_ANY_NUMBER = re.compile(rf"(?<![\w.]){_NUM}{_OUT_OF_TEN}")
_REASON = re.compile(r"\b(?:reason|rationale|explanation)\b\**\s*[:=]\s*\**\s*(.+)", re.I | re.S)


@dataclass
class Parsed:
    score: float | None
    rationale: str
    error: str | None  # why the reply is unscored


def parse_reply(text: str | None) -> Parsed:
    """Read one 0-10 score and its rationale from a judge reply.

    Accepted: a JSON object with "score" (and "reason"/"rationale"), one labelled
    score ("Score: 7", "score is 7/10"), or a reply holding exactly one number.
    Unscored: empty replies, no number, several different scores, out of range.
    """
    raw = (text or "").strip()
    if not raw:
        return Parsed(None, "", "empty reply")
    as_json = _from_json(raw)
    if as_json is not None:
        return as_json
    labelled = [float(m.group(1)) for m in _LABELLED.finditer(raw)]
    if labelled:
        if len(set(labelled)) > 1:
            return Parsed(None, _rationale(raw), f"several scores in reply: {labelled}")
        value = labelled[0]
    else:
        numbers = [float(re.match(_NUM, m.group(0)).group(0)) for m in _ANY_NUMBER.finditer(raw)]
        if not numbers:
            return Parsed(None, _rationale(raw), "no score in reply")
        if len(numbers) > 1:
            return Parsed(None, _rationale(raw), f"several numbers and no labelled score: {numbers}")
        value = numbers[0]
    return _in_range(value, _rationale(raw))


def _from_json(raw: str) -> Parsed | None:
    start, end = raw.find("{"), raw.rfind("}")
    if start < 0 or end <= start:
        return None
    try:
        obj = json.loads(raw[start:end + 1])
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or "score" not in obj:
        return None
    reason = str(obj.get("reason") or obj.get("rationale") or "")
    value = obj["score"]
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return Parsed(None, reason, f"score is not a number: {value!r}")
    try:
        value = float(value)
    except ValueError:
        return Parsed(None, reason, f"score is not a number: {value!r}")
    return _in_range(value, reason)


def _in_range(value: float, rationale: str) -> Parsed:
    if not (SCORE_MIN <= value <= SCORE_MAX) or value != value:  # NaN fails too
        return Parsed(None, rationale, f"score {value:g} outside {SCORE_MIN:g}..{SCORE_MAX:g}")
    return Parsed(value, rationale, None)


def _rationale(raw: str) -> str:
    m = _REASON.search(raw)
    return (m.group(1) if m else raw).strip()[:1000]


# --- rubrics -----------------------------------------------------------------------
@dataclass(frozen=True)
class Axis:
    name: str
    images: tuple[str, ...]  # which case images go to the VLM, in order
    prompt: str


# How the judge's question goes to the VLM (`chat` in a rubric file); VLM.answer takes
# these as keywords. Unset: the backend's own defaults.
CHAT_SETTINGS = ("max_new_tokens", "system", "text_first")


@dataclass(frozen=True)
class Rubric:
    version: str
    format: str        # appended to every prompt ("" = nothing)
    retry: str         # appended instead on a retry ("" = the same prompt again)
    axes: dict[str, Axis]
    preamble: str = ""  # put before every axis's prompt, as written
    chat: dict[str, Any] = field(default_factory=dict)

    def render(self, axis: str, fields: dict[str, Any], *, retry: bool = False) -> str:
        body = fill_fields(self.preamble + self.axes[axis].prompt, fields)
        tail = (self.retry or self.format) if retry else self.format
        return f"{body.rstrip()}\n\n{tail.rstrip()}" if tail.strip() else body


# What a rubric's prompt may name in braces; every other brace is text (the released
# OSBench prompts show JSON replies such as {"score": ...} verbatim). The released
# prompts write the instruction's place as <instruction>: filled the same way.
RUBRIC_FIELDS = ("prompt", "category", "box", "instruction")
_FIELD = re.compile(r"\{(" + "|".join(RUBRIC_FIELDS) + r")\}|<(instruction)>")


def fill_fields(text: str, fields: dict[str, Any]) -> str:
    """``text`` with {prompt}, {category}, {box} and {instruction} (or <instruction>)
    filled in; any other brace left as written."""
    def value(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in fields:
            raise KeyError(f"rubric field {name!r} has no value for this case")
        return str(fields[name])
    return _FIELD.sub(value, text)


@lru_cache(maxsize=8)
def load_rubric(path: str | Path = RUBRIC_FILE) -> Rubric:
    """Load and check a rubric file (a version, a format, and one prompt per axis)."""
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read judge rubric {path}: {exc}") from exc
    if not isinstance(doc, dict) or not doc.get("version") or not isinstance(doc.get("axes"), dict):
        raise ConfigError(f"judge rubric {path} needs `version` and `axes`")
    axes = {}
    for name, spec in doc["axes"].items():
        if not isinstance(spec, dict) or not spec.get("prompt") or not spec.get("images"):
            raise ConfigError(f"judge rubric {path}: axis {name!r} needs `prompt` and `images`")
        axes[name] = Axis(name, tuple(spec["images"]), spec["prompt"])
    chat = doc.get("chat") or {}
    if not isinstance(chat, dict) or set(chat) - set(CHAT_SETTINGS):
        raise ConfigError(f"judge rubric {path}: `chat` may set only {', '.join(CHAT_SETTINGS)}")
    return Rubric(str(doc["version"]), str(doc.get("format") or ""), str(doc.get("retry") or ""), axes,
                  preamble=str(doc.get("preamble") or ""), chat=dict(chat))


# --- the judge ---------------------------------------------------------------------
def _images(item: JudgeItem, names: Sequence[str]) -> list[np.ndarray]:
    out: list[np.ndarray] = []
    for n in names:
        out += list(item.images[n]) if n == "inputs" else [item.images[n]]
    return out



@dataclass
class JudgeItem:
    images: dict[str, Any]               # name -> RGB uint8 ("inputs": a list); the axis picks which ones
    fields: dict[str, Any]               # prompt, category, box


@dataclass
class JudgeResult:
    axis: str
    score: float | None                  # None = unscored
    rationale: str = ""
    error: str | None = None             # why unscored
    raw: list[str] = field(default_factory=list)  # every reply, in order
    rubric_version: str = ""
    judge: str = ""

    @property
    def scored(self) -> bool:
        return self.score is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Judge:
    """Scores batches of items on one rubric axis with a VLM backend. An axis lists the
    item images it shows, in order; ``inputs`` stands for the item's list of input images."""

    def __init__(self, vlm: Any, rubric: Rubric | None = None, max_attempts: int = 3,
                 parse: Callable[[str | None], Parsed] | None = None) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.vlm = vlm
        self.rubric = rubric or load_rubric()
        self.max_attempts = max_attempts
        self.parse = parse or parse_reply
        self.name = getattr(vlm, "name", type(vlm).__name__)

    def score(self, axis: str, items: Sequence[JudgeItem]) -> list[JudgeResult]:
        if axis not in self.rubric.axes:
            raise KeyError(f"rubric {self.rubric.version} has no axis {axis!r}")
        spec = self.rubric.axes[axis]
        results = [JudgeResult(axis, None, rubric_version=self.rubric.version, judge=self.name)
                   for _ in items]
        todo = list(range(len(items)))
        for attempt in range(self.max_attempts):
            if not todo:
                break
            images = [_images(items[i], spec.images) for i in todo]
            prompts = [self.rubric.render(axis, items[i].fields, retry=attempt > 0) for i in todo]
            replies = self._ask(images, prompts)
            still = []
            for i, reply in zip(todo, replies, strict=True):
                parsed = self.parse(reply)
                r = results[i]
                r.raw.append(reply or "")
                r.score, r.rationale, r.error = parsed.score, parsed.rationale, parsed.error
                if parsed.score is None:
                    still.append(i)
            todo = still
        for i in todo:
            results[i].error = f"{results[i].error} (after {self.max_attempts} tries)"
        return results

    def _ask(self, images: list[list[np.ndarray]], prompts: list[str]) -> list[str]:
        """One batched call; a transient backend failure counts as an unreadable reply."""
        try:
            chat = self.rubric.chat
            replies = list(self.vlm.answer(images, prompts, **chat) if chat else self.vlm.answer(images, prompts))
        except TransientError as exc:
            return [f"<backend error: {exc}>"] * len(prompts)
        if len(replies) != len(prompts):
            raise RuntimeError(f"VLM {self.name} returned {len(replies)} replies for {len(prompts)} prompts")
        return [r if isinstance(r, str) else ("" if r is None else str(r)) for r in replies]
