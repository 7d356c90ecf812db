"""Stage 3, synthesize (pure): the two training inputs of one pair.

* Generation input (segmentation-map-guided outpainting): the subject is segmented
  in the reference frame, moved by a random geometry-aware augmentation (flip, scale,
  rotation, translation; the same transform for pixels and mask, kept inside the
  canvas), its mask edge is eroded irregularly so the boundary is no clean cut-out,
  and everything outside the eroded mask is synthesized by the inpainter. Pixels
  under the eroded mask are the augmented reference, untouched.
* Manipulation input (box-guided inpainting): the target frame with the subject's
  box filled by the inpainter with *something else*: a different object where the
  model family can be asked for one (the sample then teaches "replace it with the
  reference subject"), plausible background where it cannot (OpenCV). A detector's box
  may hold only part of the subject (the front wheel of a motorcycle): the subject is
  segmented in the target with the box grown by ``target_context`` as the prompt, and
  the filled box is grown to cover that mask (dilated, for soft edges) so the input never
  shows the subject it asks for. Everything outside the box is the target frame,
  untouched; the subject's mask in the target is kept (``target_mask``) for the verifier.

What each model family is asked (prompts, negative prompts) is in
backends/synthesis_prompts.yaml; outpainting never names the subject, whose category
goes into the negative prompt instead.

The same (seed, attempt) gives the same images, bit for bit. Every random choice is
returned in ``augment`` so the transform can be replayed (``apply_augmentation``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from opensubject_tasks.backends import synthesis_prompts as sp
from opensubject_tasks.backends.base import Box, Image, Inpainter, Mask, Segmenter
from opensubject_tasks.config import SynthSettings
from opensubject_tasks.errors import Rejected



@dataclass
class SynthResult:
    images: dict[str, np.ndarray]      # SAMPLE_IMAGES -> RGB uint8, or bool for SAMPLE_MASKS
    augment: dict[str, Any]            # geometry, erosion and inpainting parameters
    backends: dict[str, str] = field(default_factory=dict)


def int_box(box: Box, width: int, height: int) -> tuple[int, int, int, int]:
    """The pixel box covering ``box``, clipped to the image."""
    x0, y0 = max(0, math.floor(box[0])), max(0, math.floor(box[1]))
    x1, y1 = min(width, math.ceil(box[2])), min(height, math.ceil(box[3]))
    return int(x0), int(y0), int(x1), int(y1)


# --------------------------------------------------------------- augmentation

def draw_augmentation(crop_size: tuple[int, int], mask: Mask, frame_size: tuple[int, int],
                      rng: np.random.Generator, s: SynthSettings) -> dict[str, Any]:
    """Random flip/scale/rotation/translation placing the subject inside the canvas.

    ``crop_size``/``frame_size`` are (width, height). The canvas has the reference
    frame's aspect ratio with its longest side the frame's, at most ``output_size`` (never
    upscaled); the subject keeps its relative size up to the drawn scale, shrunk if it
    would not fit."""
    cw0, ch0 = crop_size
    fw, fh = frame_size
    base = min(s.output_size, max(fw, fh)) / max(fw, fh)
    canvas = (max(1, round(fw * base)), max(1, round(fh * base)))
    flip = bool(rng.random() < s.flip_probability)
    scale = float(rng.uniform(*sorted(s.scale_range)))
    rotation = float(rng.uniform(-s.max_rotation_deg, s.max_rotation_deg))
    ys, xs = np.nonzero(mask)
    # the mask's corners bound where subject pixels can land
    corners = np.array([[xs.min(), ys.min()], [xs.max() + 1, ys.min()],
                        [xs.min(), ys.max() + 1], [xs.max() + 1, ys.max() + 1]], np.float64)
    for _ in range(8):
        m = _matrix(cw0, ch0, flip, base * scale, rotation, 0.0, 0.0)
        pts = corners @ m[:, :2].T + m[:, 2]
        fit = min(0.98 * canvas[0] / max(float(np.ptp(pts[:, 0])), 1e-6),
                  0.98 * canvas[1] / max(float(np.ptp(pts[:, 1])), 1e-6))
        if fit >= 1.0:
            break
        scale *= fit  # too large for the canvas: shrink, keep the drawn flip and angle
    m = _matrix(cw0, ch0, flip, base * scale, rotation, 0.0, 0.0)
    pts = corners @ m[:, :2].T + m[:, 2]
    lo_x, hi_x = -pts[:, 0].min(), canvas[0] - pts[:, 0].max()
    lo_y, hi_y = -pts[:, 1].min(), canvas[1] - pts[:, 1].max()
    tx = float(rng.uniform(lo_x, hi_x)) if hi_x > lo_x else float((lo_x + hi_x) / 2)
    ty = float(rng.uniform(lo_y, hi_y)) if hi_y > lo_y else float((lo_y + hi_y) / 2)
    matrix = _matrix(cw0, ch0, flip, base * scale, rotation, tx, ty)
    return {"flip": flip, "scale": round(scale, 6), "base_scale": round(base, 6),
            "rotation_deg": round(rotation, 6), "translation": [round(tx, 4), round(ty, 4)],
            "canvas": [int(canvas[0]), int(canvas[1])], "crop_size": [int(cw0), int(ch0)],
            "matrix": [[float(v) for v in row] for row in matrix]}


def _matrix(w: int, h: int, flip: bool, scale: float, rotation_deg: float, tx: float, ty: float) -> np.ndarray:
    """2x3 affine: mirror about the crop's centre, rotate and scale about it, then put
    the centre at (tx, ty) (plus the offset that keeps it at the origin when tx=ty=0)."""
    c = np.array([w / 2.0, h / 2.0])
    a = math.radians(rotation_deg)
    rot = scale * np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    mirror = np.diag([-1.0 if flip else 1.0, 1.0])
    lin = rot @ mirror
    return np.hstack([lin, (np.array([tx, ty]) - lin @ c)[:, None]])


def apply_augmentation(crop: Image, mask: Mask, augment: dict[str, Any]) -> tuple[Image, Mask]:
    """Replay a recorded transform: (augmented subject on a black canvas, its mask)."""
    m = np.array(augment["matrix"], np.float64)
    size = tuple(augment["canvas"])
    pixels = cv2.warpAffine(np.ascontiguousarray(crop), m, size, flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))
    warped = cv2.warpAffine(mask.astype(np.float32), m, size, flags=cv2.INTER_LINEAR) > 0.5
    return pixels, warped


# ------------------------------------------------------------------- erosion

def irregular_erosion(mask: Mask, rng: np.random.Generator, s: SynthSettings) -> tuple[Mask, dict[str, Any]]:
    """Erode the mask edge by a depth that varies smoothly along it, between
    (1 - variation) and (1 + variation) times ``erosion_px`` (at least one pixel, which
    also drops the interpolated fringe of the warp)."""
    h, w = mask.shape
    inside = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 5)
    field_ = cv2.resize(rng.uniform(-1.0, 1.0, (6, 6)).astype(np.float32), (w, h),
                        interpolation=cv2.INTER_CUBIC)
    field_ = np.clip(field_, -1.0, 1.0)
    depth = np.maximum(1.0, s.erosion_px * (1.0 + s.erosion_variation * field_))
    area = int(mask.sum())
    shrink = 1.0
    eroded = inside > depth
    # a thin subject must not vanish: keep at least half of it
    while area and eroded.sum() < 0.5 * area and shrink > 0.1:
        shrink *= 0.5
        eroded = inside > np.maximum(1.0, depth * shrink)
    if not eroded.any():
        eroded = inside > 0
    used = np.maximum(1.0, depth * shrink)[mask] if area else np.array([0.0])
    return eroded, {"erosion_px": s.erosion_px, "variation": s.erosion_variation,
                    "depth_min": round(float(used.min()), 3), "depth_max": round(float(used.max()), 3),
                    "kept_share": round(float(eroded.sum()) / max(area, 1), 4)}


def grow_box(box: Box, margin: float, width: int, height: int) -> tuple[int, int, int, int]:
    bw, bh = box[2] - box[0], box[3] - box[1]
    dx, dy = margin * bw + 1, margin * bh + 1
    return int_box([box[0] - dx, box[1] - dy, box[2] + dx, box[3] + dy], width, height)


# ------------------------------------------------------------------- the stage

@dataclass
class PairInput:
    """One pair to synthesize: the frames (RGB), the subject's boxes in their pixels, the
    seed and attempt that fix every random choice, and the subject's category."""
    ref_image: Image
    ref_box: Box
    tgt_image: Image
    tgt_box: Box
    seed: int
    attempt: int
    category: str = "object"


@dataclass
class _Plan:   # a pair's geometry and prompts, before the inpainter fills anything
    crop: Image
    mask: Mask
    crop_box: tuple[int, int, int, int]
    canvas: Image
    eroded: Mask
    box_mask: Mask
    target_mask: Mask
    outpaint: Any
    fill: Any
    seeds: tuple[int, int]
    augment: dict[str, Any]


def synthesize_pair(ref_image: Image, ref_box: Box, tgt_image: Image, tgt_box: Box, *, seed: int,
                    attempt: int, segmenter: Segmenter, inpainter: Inpainter, settings: SynthSettings,
                    category: str = "object") -> SynthResult:
    """Reference crop and mask, generation input and mask, manipulation input and mask,
    and the target, for one (reference frame, target frame) pair."""
    out = synthesize_pairs([PairInput(ref_image, ref_box, tgt_image, tgt_box, seed, attempt, category)],
                           segmenter=segmenter, inpainter=inpainter, settings=settings)[0]
    if isinstance(out, Rejected):
        raise out
    return out


def synthesize_pairs(items: list[PairInput], *, segmenter: Segmenter, inpainter: Inpainter,
                     settings: SynthSettings) -> list[SynthResult | Rejected]:
    """``synthesize_pair`` for a batch, each model called once for all of it: the segmenter
    on every reference, the inpainter on every generation canvas and manipulation frame.
    A pair that cannot be synthesized gets its ``Rejected`` in its place; the others are
    bit for bit what they would be alone (each pair draws from its own (seed, attempt))."""
    out: list[SynthResult | Rejected | None] = [None] * len(items)
    crops: dict[int, tuple[int, int, int, int]] = {}
    for i, it in enumerate(items):
        rh, rw = it.ref_image.shape[:2]
        x0, y0, x1, y1 = int_box(it.ref_box, rw, rh)
        if x1 - x0 < 4 or y1 - y0 < 4:
            out[i] = Rejected(f"reference box {list(it.ref_box)} is smaller than 4x4 pixels")
        else:
            crops[i] = (x0, y0, x1, y1)
    live = sorted(crops)
    # one segmenter call: the subject in every reference and in every target
    prompts = {i: target_prompt(items[i].tgt_box, settings.target_context, items[i].tgt_image.shape) for i in live}
    masks = segment_distinct(segmenter, [items[i].ref_image for i in live] + [items[i].tgt_image for i in live],
                             [[float(v) for v in crops[i]] for i in live]
                             + [[float(v) for v in prompts[i]] for i in live]) if live else []
    tgt_masks = {i: target_subject(masks[len(live) + k], items[i].tgt_box, prompts[i]) for k, i in enumerate(live)}
    # A subject that reaches the edge of its prompt may go on beyond it: prompt again around
    # what was found (one batched call per round).
    for _ in range(settings.target_rounds - 1):
        again = {i: grown for i in live
                 if (grown := regrown_prompt(tgt_masks[i], prompts[i], settings.target_context)) is not None}
        if not again:
            break
        order = sorted(again)
        more = segment_distinct(segmenter, [items[i].tgt_image for i in order],
                                [[float(v) for v in again[i]] for i in order])
        for i, m in zip(order, more, strict=True):
            found = target_subject(m, items[i].tgt_box, again[i])
            px0, py0, px1, py1 = again[i]
            if found.sum() > LEAK_SHARE * (px1 - px0) * (py1 - py0):
                continue   # the mask fills its whole prompt: a leak into the scene, not the subject
            prompts[i], tgt_masks[i] = again[i], found
    plans: dict[int, _Plan] = {}
    for k, i in enumerate(live):
        try:
            plans[i] = _plan(items[i], crops[i], masks[k], tgt_masks[i], inpainter.family, settings)
        except Rejected as exc:
            out[i] = exc
    order = sorted(plans)
    n = len(order)
    ps = [plans[i] for i in order]
    painted = inpainter.inpaint(
        [p.canvas for p in ps] + [items[i].tgt_image for i in order],
        [~p.eroded for p in ps] + [p.box_mask for p in ps],
        [p.outpaint.prompt for p in ps] + [p.fill.prompt for p in ps],
        [p.seeds[0] for p in ps] + [p.seeds[1] for p in ps],
        [p.outpaint.negative for p in ps] + [p.fill.negative for p in ps]) if order else []
    backends = {"segmenter": segmenter.name, "inpainter": inpainter.name}
    for k, i in enumerate(order):
        p = plans[i]
        images = {"reference": p.crop, "mask": p.mask, "generation_input": painted[k],
                  "generation_mask": p.eroded, "manipulation_input": painted[n + k],
                  "manipulation_mask": p.box_mask, "target": np.ascontiguousarray(items[i].tgt_image),
                  "target_mask": p.target_mask}
        out[i] = SynthResult(images, p.augment, dict(backends))
    return out  # type: ignore[return-value]


def segment_distinct(segmenter: Segmenter, images: list[Image], boxes: list[list[float]]) -> list[Mask]:
    """``segmenter.segment`` asked once per distinct (frame, box): the pairs of a batch share
    frames (a subject's reference in several pairs, a clip's shared target), and the same
    frame with the same box gives the same mask. Frames are told apart by identity (the
    service decodes each frame of a batch once); repeats get copies."""
    keys = [(id(img), tuple(box)) for img, box in zip(images, boxes, strict=True)]
    first: dict[tuple, int] = {}
    for i, k in enumerate(keys):
        first.setdefault(k, i)
    asked = sorted(first.values())
    found = dict(zip(asked, segmenter.segment([images[i] for i in asked], [boxes[i] for i in asked]), strict=True))
    return [found[i] if first[k] == i else found[first[k]].copy() for i, k in enumerate(keys)]


# A target mask that fills this share of its prompt box found no boundary there: the
# segmenter leaked into the scene, and the last round's mask stands.
LEAK_SHARE = 0.85


def target_prompt(box: Box, context: float, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """The box the target's subject is segmented in: its box grown by ``context`` of its
    size on every side, so that a subject the box holds only part of is found whole."""
    h, w = shape[:2]
    bw, bh = box[2] - box[0], box[3] - box[1]
    return int_box([box[0] - context * bw, box[1] - context * bh, box[2] + context * bw, box[3] + context * bh], w, h)


def target_subject(mask: Mask, box: Box, prompt: tuple[int, int, int, int]) -> Mask:
    """The subject's mask in the target: the parts of the segmenter's mask (kept inside
    the prompt box) that touch the subject's box; the box itself where it found none."""
    mask = np.asarray(mask, bool)
    h, w = mask.shape[:2]
    inside = np.zeros((h, w), bool)
    px0, py0, px1, py1 = prompt
    inside[py0:py1, px0:px1] = mask[py0:py1, px0:px1]
    n, labels = cv2.connectedComponents(inside.astype(np.uint8), connectivity=8)
    x0, y0, x1, y1 = int_box(box, w, h)
    keep = np.unique(labels[y0:y1, x0:x1])
    keep = keep[keep > 0]
    out = np.isin(labels, keep) if len(keep) else np.zeros((h, w), bool)
    if out.sum() < 16:
        out = np.zeros((h, w), bool)
        out[y0:y1, x0:x1] = True
    return out


def regrown_prompt(subject: Mask, prompt: tuple[int, int, int, int],
                   context: float) -> tuple[int, int, int, int] | None:
    """A larger prompt around ``subject`` when it touches an edge of ``prompt`` that is not
    the image's (it may go on beyond); None when it lies inside."""
    h, w = subject.shape[:2]
    ys, xs = np.nonzero(subject)
    if not len(xs):
        return None
    x0, y0, x1, y1 = prompt
    # near the edge: within 5 % of the prompt's size (segmenters keep off its very border)
    tx, ty = max(2, round(0.05 * (x1 - x0))), max(2, round(0.05 * (y1 - y0)))
    touches = ((xs.min() < x0 + tx and x0 > 0) or (xs.max() >= x1 - tx and x1 < w)
               or (ys.min() < y0 + ty and y0 > 0) or (ys.max() >= y1 - ty and y1 < h))
    if not touches:
        return None
    grown = target_prompt([float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)], context,
                          subject.shape)
    return grown if grown != prompt else None


def covering_box(box: Box, subject: Mask, margin: float) -> tuple[int, int, int, int]:
    """The manipulation box: the subject's box and its mask in the target, dilated by
    ``margin`` of the mask's size (soft edges), in one box."""
    h, w = subject.shape[:2]
    bx0, by0, bx1, by1 = grow_box(box, margin, w, h)
    ys, xs = np.nonzero(subject)
    if len(xs):
        mx0, my0, mx1, my1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        gx0, gy0, gx1, gy1 = grow_box([float(mx0), float(my0), float(mx1), float(my1)], margin, w, h)
        bx0, by0, bx1, by1 = min(bx0, gx0), min(by0, gy0), max(bx1, gx1), max(by1, gy1)
    return bx0, by0, bx1, by1


def _plan(it: PairInput, crop_box: tuple[int, int, int, int], full_mask: Mask, tgt_mask: Mask, family: str,
          s: SynthSettings) -> _Plan:
    """Everything of one pair before inpainting: mask, augmentation, erosion, the
    manipulation box and both prompts, drawn from the pair's own (seed, attempt)."""
    rng = np.random.default_rng([int(it.seed) & 0xFFFF_FFFF_FFFF_FFFF, int(it.attempt)])
    rh, rw = it.ref_image.shape[:2]
    x0, y0, x1, y1 = crop_box
    crop = np.ascontiguousarray(it.ref_image[y0:y1, x0:x1])
    mask = np.ascontiguousarray(full_mask[y0:y1, x0:x1]).astype(bool)
    if mask.sum() < 16:
        raise Rejected("empty subject mask: the segmenter found no subject in the reference box")

    # generation input: augmented, eroded subject, the rest outpainted
    geometry = draw_augmentation((x1 - x0, y1 - y0), mask, (rw, rh), rng, s)
    subject, warped_mask = apply_augmentation(crop, mask, geometry)
    eroded, erosion = irregular_erosion(warped_mask, rng, s)
    if eroded.sum() < 16:
        raise Rejected("subject too thin: nothing left after boundary erosion")
    gen_seed, man_seed = (int(v) for v in rng.integers(0, 2**31 - 1, size=2))
    canvas = np.zeros_like(subject)
    canvas[eroded] = subject[eroded]
    outpaint = sp.synthesis_prompt(family, "outpaint", it.category)

    # manipulation input: the target with the subject's box, grown to its mask there,
    # filled by something else
    th, tw = it.tgt_image.shape[:2]
    bx0, by0, bx1, by1 = covering_box(it.tgt_box, tgt_mask, s.box_margin)
    box_mask = np.zeros((th, tw), bool)
    box_mask[by0:by1, bx0:bx1] = True
    if sp.paints_objects(family):
        fill = sp.synthesis_prompt(family, "replace", it.category,
                                   sp.pick_replacement(np.random.default_rng(man_seed), it.category))
    else:
        fill = sp.synthesis_prompt(family, "remove", it.category)

    augment = {"seed": int(it.seed), "attempt": int(it.attempt), "reference_crop": [x0, y0, x1, y1],
               "geometry": geometry, "erosion": erosion,
               "manipulation_box": [bx0, by0, bx1, by1],
               "inpaint_seeds": {"generation": gen_seed, "manipulation": man_seed},
               "prompts": {"version": sp.version(), "family": family,
                           "generation": {"prompt": outpaint.prompt, "negative": outpaint.negative},
                           "manipulation": {"request": fill.request, "prompt": fill.prompt,
                                            "negative": fill.negative}},
               # what now fills the subject's box (None: background), named by instructions
               "replacement": {"object": fill.replacement}}
    return _Plan(crop, mask, crop_box, canvas, eroded, box_mask, tgt_mask, outpaint, fill, (gen_seed, man_seed),
                 augment)
