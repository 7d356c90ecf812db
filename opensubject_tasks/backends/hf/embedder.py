"""Image embeddings (CLIP by default, DINOv2 or SigLIP work too) and a CLIP-based
aesthetic score: a linear or MLP head over the L2-normalised CLIP embedding, with
its weights from a local file (LAION's improved aesthetic predictor has this form)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from transformers import AutoConfig, AutoImageProcessor, AutoModel, CLIPVisionModelWithProjection
from transformers.utils import logging as hf_logging

from opensubject_tasks.backends.base import Image, QualityScore
from opensubject_tasks.backends.hf.common import HFBackend, move, to_pil
from opensubject_tasks.backends.registry import register
from opensubject_tasks.errors import ModelNotAvailable

DEFAULT_EMBEDDER = "openai/clip-vit-large-patch14"
AESTHETIC_HINT = (
    "LAION's improved-aesthetic-predictor head `sac+logos+ava1-l14-linearMSE.pth` "
    "(github.com/christophschuhmann/improved-aesthetic-predictor) fits "
    "openai/clip-vit-large-patch14"
)


class HFEmbedder(HFBackend):
    interface = "embedder"
    default_model = DEFAULT_EMBEDDER

    def __init__(self, model: str = DEFAULT_EMBEDDER, device: str = "cpu", dtype: str = "auto",
                 batch_size: int = 32, name: str | None = None) -> None:
        super().__init__(model, device, dtype, batch_size, name)
        self.processor = self.load(AutoImageProcessor.from_pretrained)
        self.model = self._load_model()
        self.model.to(self.device).eval()

    def _load_model(self) -> nn.Module:
        config = self.load(AutoConfig.from_pretrained)
        if config.model_type == "clip":  # the image tower and its projection only
            vision = config.vision_config
            vision.projection_dim = config.projection_dim
            # The checkpoint's text tower is skipped on purpose: keep its load report quiet.
            verbosity = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()
            try:
                return self.load(CLIPVisionModelWithProjection.from_pretrained, config=vision, dtype=self.dtype)
            finally:
                hf_logging.set_verbosity(verbosity)
        return self.load(AutoModel.from_pretrained, dtype=self.dtype)

    def embed(self, images: Sequence[Image]) -> np.ndarray:
        vectors = self.batcher.map(self._embed, list(images))
        if not vectors:
            return np.zeros((0, self.dim), np.float32)
        return np.stack(vectors).astype(np.float32)

    @property
    def dim(self) -> int:
        cfg = self.model.config
        return int(getattr(cfg, "projection_dim", None) or cfg.hidden_size)

    def _embed(self, chunk: list[Image]) -> list[np.ndarray]:
        inputs = self.processor(images=[to_pil(im) for im in chunk], return_tensors="pt")
        inputs = move(dict(inputs), self.device, self.dtype)
        with torch.inference_mode():
            if isinstance(self.model, CLIPVisionModelWithProjection):
                vec = self.model(pixel_values=inputs["pixel_values"]).image_embeds
            elif hasattr(self.model, "get_image_features"):
                vec = self.model.get_image_features(pixel_values=inputs["pixel_values"])
                vec = getattr(vec, "pooler_output", vec)
            else:  # DINOv2-style backbones: the pooled [CLS] token
                vec = self.model(pixel_values=inputs["pixel_values"]).pooler_output
        vec = torch.nn.functional.normalize(vec.float(), dim=-1)
        return list(vec.cpu().numpy())


def load_head(path: Path, in_dim: int, activation: str = "none") -> nn.Sequential:
    """A stack of linear layers from a state dict (.safetensors or a torch .pth/.pt),
    applied in the order of their key names (``layers.0``, ``layers.2``, ...)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise ModelNotAvailable(f"aesthetic head {path} holds no state dict")

    def order(key: str) -> list[Any]:
        return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]

    weights = sorted((k for k, v in state.items() if k.endswith("weight") and v.ndim == 2), key=order)
    if not weights:
        raise ModelNotAvailable(f"aesthetic head {path} holds no linear layer weights")
    acts = {"none": None, "relu": nn.ReLU, "gelu": nn.GELU}
    if activation not in acts:
        raise ValueError(f"activation must be one of {sorted(acts)}, got {activation!r}")
    layers: list[nn.Module] = []
    dim = in_dim
    for i, key in enumerate(weights):
        w = state[key].float()
        if w.shape[1] != dim:
            raise ModelNotAvailable(
                f"aesthetic head {path}: layer {key} takes {w.shape[1]} inputs but gets {dim} "
                f"(it was trained for another embedding model)")
        lin = nn.Linear(w.shape[1], w.shape[0], bias=key[:-6] + "bias" in state)
        with torch.no_grad():
            lin.weight.copy_(w)
            if lin.bias is not None:
                lin.bias.copy_(state[key[:-6] + "bias"].float())
        layers.append(lin)
        if acts[activation] is not None and i < len(weights) - 1:
            layers.append(acts[activation]())
        dim = w.shape[0]
    if dim != 1:
        raise ModelNotAvailable(f"aesthetic head {path} ends in {dim} outputs, expected 1")
    return nn.Sequential(*layers).eval()


class HFAestheticScorer:
    """Clip quality = mean aesthetic score of its frames, mapped from ``score_range``
    (LAION's predictor rates 1..10) onto 0..1."""

    def __init__(self, model: str = DEFAULT_EMBEDDER, head: str | None = None, device: str = "cpu",
                 dtype: str = "auto", batch_size: int = 32, activation: str = "none",
                 score_range: Sequence[float] = (1.0, 10.0), name: str | None = None) -> None:
        if not head:
            raise ModelNotAvailable(
                "the hf quality backend needs aesthetic head weights: set "
                "backends.options.quality.head to a local .safetensors or .pth file holding a "
                f"linear/MLP head over {model} image embeddings; {AESTHETIC_HINT}")
        head_path = Path(head).expanduser()
        if not head_path.is_file():
            raise ModelNotAvailable(f"aesthetic head weights {head_path} do not exist; {AESTHETIC_HINT}")
        self.embedder = HFEmbedder(model, device=device, dtype=dtype, batch_size=batch_size)
        self.head = load_head(head_path, self.embedder.dim, activation)
        self.lo, self.hi = float(score_range[0]), float(score_range[1])
        if self.hi <= self.lo:
            raise ValueError(f"score_range must rise, got {score_range}")
        self.name = name or f"hf:{self.embedder.model_id}+{head_path.name}"

    def frame_scores(self, frames: Sequence[Image]) -> np.ndarray:
        emb = torch.from_numpy(self.embedder.embed(frames))
        with torch.inference_mode():
            return self.head(emb).reshape(-1).numpy() if len(emb) else np.zeros(0, np.float32)

    def score(self, clips: Sequence[Sequence[Image]]) -> list[QualityScore]:
        flat = [f for clip in clips for f in clip]
        raw = self.frame_scores(flat)
        out, i = [], 0
        for clip in clips:
            vals = raw[i:i + len(clip)]
            i += len(clip)
            if not len(vals):
                out.append(QualityScore(0.0, {"frames": 0.0}))
                continue
            mean = float(vals.mean())
            out.append(QualityScore(
                score=float(np.clip((mean - self.lo) / (self.hi - self.lo), 0.0, 1.0)),
                metrics={"aesthetic": mean, "aesthetic_min": float(vals.min()),
                         "aesthetic_max": float(vals.max()), "frames": float(len(vals))}))
        return out


@register("embedder", "hf")
def make_hf_embedder(**options: Any) -> HFEmbedder:
    return HFEmbedder(**options)


@register("quality", "hf")
def make_hf_quality(**options: Any) -> HFAestheticScorer:
    return HFAestheticScorer(**options)
