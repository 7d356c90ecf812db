"""The one instruction vocabulary: how a sample's task is worded, for the training
records (OmniGen2 layout) and the benchmark cases alike.

Images are named by their position in the record's ``input_images`` ("image 1", ...),
as OmniGen2's in-context and edit records do. A manipulation region is named by
where it lies in the scene image (a 3x3 grid: "top left" ... "bottom right"), computed
from the stored manipulation region, so a training record and a benchmark case with
the same region say the same words; nothing has to be drawn into the image.
"""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np
from opensubject_tasks.geometry import mask_box

# OmniGen2's task types: in-context generation (subject images -> new image) and edit.
TASK_GENERATION = "ic"
TASK_MANIPULATION = "edit"
MAX_SUBJECTS = 4   # OSBench's multi-subject cases give 2-4 references

_ARTICLE = re.compile(r"^(a|an|the)\s+", re.IGNORECASE)


def subject_phrase(caption_short: str | None, category: str | None) -> str:
    """'A brown cat.' -> 'brown cat': the words after "the" in an instruction."""
    text = (caption_short or "").strip().rstrip(".").strip() or (category or "").strip()
    return _ARTICLE.sub("", text) or "subject"


def _description(text: str | None) -> str:
    text = " ".join((text or "").split())
    if text and text[-1] not in ".!?":
        text += "."
    return text


def _join(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def generation_instruction(subjects: Sequence[str], description: str | None = None) -> str:
    """In-context generation from one image per subject, in order.

    One subject: "Generate an image of the brown cat from image 1. <description>"
    Several: "Generate an image of the brown cat from image 1 and the red car from
    image 2 together. <description>"
    """
    if not subjects:
        raise ValueError("a generation instruction needs at least one subject")
    named = [f"the {s} from image {i}" for i, s in enumerate(subjects, 1)]
    together = " together" if len(subjects) > 1 else ""
    return f"Generate an image of {_join(named)}{together}. {_description(description)}".strip()


def region_phrase(box: Sequence[float], width: int, height: int) -> str:
    """Where a box lies in an image, in words, from the cell of a 3x3 grid holding its
    centre: "in the top left", "on the left side", "at the bottom", "in the centre"."""
    cx = (box[0] + box[2]) / 2 / max(width, 1)
    cy = (box[1] + box[3]) / 2 / max(height, 1)
    col = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else ""
    row = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else ""
    if row and col:
        return f"in the {row} {col}"
    if col:
        return f"on the {col} side"
    return f"at the {row}" if row else "in the centre"


def region_box(mask: np.ndarray) -> list[float] | None:
    """The manipulation region of a stored mask: the bounding box of its True pixels, or
    None for an empty mask. Training records and benchmark cases both take it from here."""
    return mask_box(mask)


def manipulation_instruction(subject: str, box: Sequence[float], size: Sequence[int],
                             replaced: str | None = None, description: str | None = None) -> str:
    """Replace what fills the region of the scene (image 1) with the subject of image 2.

    ``replaced`` names what the synthesis put into the region when it is known (an
    object the inpainter was asked for); otherwise the region's content is unnamed."""
    what = f"the {_ARTICLE.sub('', replaced.strip())}" if replaced and replaced.strip() else "the content"
    where = region_phrase(box, int(size[0]), int(size[1]))
    return (f"Replace {what} {where} of image 1 with the {subject} from image 2. "
            f"{_description(description)}").strip()
