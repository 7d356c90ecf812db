"""Model backends behind small interfaces, chosen by name in config."""
from opensubject_tasks.backends.base import (
    VLM, Caption, CategoryList, Detection, Detector, Embedder, Inpainter, QualityScore,
    QualityScorer, Segmenter, Verdict, Verifier, YesNo,
)
from opensubject_tasks.backends.registry import available, get_backend, register

__all__ = [
    "VLM", "Caption", "CategoryList", "Detection", "Detector", "Embedder", "Inpainter",
    "QualityScore", "QualityScorer", "Segmenter", "Verdict", "Verifier", "YesNo",
    "available", "get_backend", "register",
]
