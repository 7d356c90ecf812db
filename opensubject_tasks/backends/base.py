"""Model backend interfaces. Images are RGB ``uint8`` numpy arrays (H, W, 3);
masks are ``bool`` arrays (H, W); boxes are ``[x0, y0, x1, y1]`` pixel floats.

Every method takes a batch and returns one result per input, so GPU backends can
batch and classical ones simply loop. Every backend has a ``name`` recorded next
to whatever field it filled.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, Sequence, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from opensubject_tasks.config import VerifySettings

Image = np.ndarray  # (H, W, 3) uint8 RGB
Mask = np.ndarray   # (H, W) bool
Box = list[float]   # [x0, y0, x1, y1]


@dataclass
class Detection:
    box: Box
    score: float
    category: str
    track: int | None = None  # identity id when the detector links across frames


@dataclass
class YesNo:
    answer: bool | None        # None: the reply could not be parsed
    p_yes: float | None        # model probability of "yes" where available
    raw: str = ""


@dataclass
class Caption:
    short: str
    long: str
    source: str                # backend name; "template" for classical captions


@dataclass
class CategoryList:
    """One frame's answer. ``error`` means the frame gave no usable answer (a reply that
    is not the asked-for list); entries the parser refused are in ``rejected`` and do
    not void the valid ones. An empty list without error: the frame holds no subject."""
    categories: list[str]
    raw: str = ""
    error: str | None = None
    rejected: list[str] = field(default_factory=list)  # refused entries, "word (why)"


@dataclass
class QualityScore:
    score: float                              # 0..1, higher is better
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Verdict:
    passed: bool
    scores: dict[str, float]
    reasons: list[str]
    source: str


@runtime_checkable
class VLM(Protocol):
    name: str
    def list_categories(self, images: Sequence[Image]) -> list[CategoryList]: ...
    def ask_yes_no(self, images: Sequence[Sequence[Image]], questions: Sequence[str]) -> list[YesNo]: ...
    def answer(self, images: Sequence[Sequence[Image]], prompts: Sequence[str], *,
               max_new_tokens: int | None = None, system: bool = True, text_first: bool = False) -> list[str]:
        """Free-form replies. ``system``: with the backend's system line; ``text_first``:
        the prompt before the images in the message; ``max_new_tokens``: the reply cap."""
        ...
    def caption(self, images: Sequence[Image], hints: Sequence[dict[str, Any]]) -> list[Caption]: ...


@runtime_checkable
class Detector(Protocol):
    """Boxes for named categories. ``frames`` are keyframes of ONE clip in time order,
    so motion-based detectors can use them together; categories may be empty
    (class-agnostic proposals, labelled ``object``)."""
    name: str
    def detect(self, frames: Sequence[Image], categories: Sequence[str]) -> list[list[Detection]]: ...


@runtime_checkable
class Segmenter(Protocol):
    name: str
    def segment(self, images: Sequence[Image], boxes: Sequence[Box]) -> list[Mask]: ...


@runtime_checkable
class Inpainter(Protocol):
    """Fill the True pixels of each mask; keep the rest. Seeds make it deterministic.
    ``family`` names its entry in synthesis_prompts.yaml (what to ask it, and how)."""
    name: str
    family: str
    def inpaint(self, images: Sequence[Image], masks: Sequence[Mask], prompts: Sequence[str],
                seeds: Sequence[int], negative_prompts: Sequence[str] | None = None) -> list[Image]: ...


@runtime_checkable
class Embedder(Protocol):
    """L2-normalised vectors; cosine similarity = dot product."""
    name: str
    def embed(self, images: Sequence[Image]) -> np.ndarray: ...


@runtime_checkable
class QualityScorer(Protocol):
    """Scores a clip from a few of its (downscaled) frames."""
    name: str
    def score(self, clips: Sequence[Sequence[Image]]) -> list[QualityScore]: ...


@runtime_checkable
class Verifier(Protocol):
    name: str
    def verify(self, samples: Sequence[dict[str, Any]], thresholds: VerifySettings,
               embedder: Embedder | None = None, vlm: VLM | None = None) -> list[Verdict]:
        """One verdict per sample. ``embedder``/``vlm``: the worker's warm models, for the
        verifiers that use them (others ignore them); None: the verifier loads its own."""
        ...
