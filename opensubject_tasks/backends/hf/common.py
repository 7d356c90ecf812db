"""What every transformers/diffusers backend shares: where a model comes from, which
device and dtype it runs in, and batching that survives a CUDA out-of-memory error.

Models load only from a local directory or the Hugging Face cache
(``local_files_only=True``): nothing is fetched at run time, so a worker never stalls
on a download and a missing model fails at once with the command that fetches it.
"""
from __future__ import annotations

import gc
import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import numpy as np
import torch
from PIL import Image

from opensubject_tasks.errors import ConfigError, ModelNotAvailable

log = logging.getLogger(__name__)


def _quiet_library_progress() -> None:
    """Workers load models once and log; the libraries' own loading bars only add noise."""
    try:
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog

        tlog.disable_progress_bar()
        dlog.disable_progress_bar()
    except ImportError:  # diffusers is optional for image-only workers
        pass


_quiet_library_progress()

T = TypeVar("T")
R = TypeVar("R")

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present; anything else is given to torch as is."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"backends.device: {device!r} is not a torch device ({exc})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"backends.device is {device!r} but this machine has no usable CUDA device")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on a GPU that has it, else fp16 on a GPU, fp32 on a CPU
    (half precision on a CPU is slow and some kernels lack it)."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in _DTYPES:
        raise ConfigError(f"backends.dtype: {dtype!r} is not one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _looks_like_path(model: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else is meant as a directory.
    return model.startswith(("/", "./", "../", "~")) or model.count("/") > 1


def download_hint(repo_id: str, local_dir: str | None = None) -> str:
    target = f" --local-dir {local_dir}" if local_dir else ""
    return (f"`hf download {repo_id}{target}` (older clients: "
            f"`huggingface-cli download {repo_id}{target}`)")


def resolve_model(model: str | os.PathLike[str], default_id: str, interface: str) -> Path:
    """Local directory of a model given as a path or a Hub id, without any network access.

    Raises ModelNotAvailable naming the place looked at and the command that fetches it.
    """
    text = os.fspath(model)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    setting = f"backends.options.{interface}.model"
    if _looks_like_path(text) or path.exists():
        raise ModelNotAvailable(
            f"{interface} model directory {path} does not exist (or is not a directory). "
            f"Pre-download the model into it with {download_hint(default_id, str(path))}, "
            f"or set {setting} to another local directory or a Hub id in the local cache."
        )
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(text, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError) as exc:
        raise ModelNotAvailable(
            f"{interface} model {text!r} is not in the local Hugging Face cache "
            f"({constants.HF_HUB_CACHE}) and no local directory has that name; models are "
            f"never downloaded at run time. Pre-download it with {download_hint(text)}, or with "
            f"{download_hint(text, '/models/' + text.split('/')[-1])} and set {setting} to that "
            f"directory. ({type(exc).__name__})"
        ) from None


def load_pretrained(loader: Callable[..., T], path: Path, interface: str, repo_id: str = "<repo id>",
                    **kwargs: Any) -> T:
    """``loader(path, local_files_only=True, ...)`` with a missing or partial download
    turned into ModelNotAvailable."""
    try:
        return loader(str(path), local_files_only=True, **kwargs)
    except OSError as exc:
        raise ModelNotAvailable(
            f"{interface} model at {path} could not be loaded ({exc}). The directory is "
            f"incomplete or not a model of the expected kind; download it again with "
            f"{download_hint(repo_id, str(path))}."
        ) from exc


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


class Batcher:
    """Runs a function over fixed-size slices of its inputs. A CUDA out-of-memory error
    halves the slice and retries it, down to one item, instead of failing the video;
    the smaller size is kept for later calls since the same inputs would fail again."""

    def __init__(self, batch_size: int, what: str = "batch") -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        self.batch_size = batch_size
        self.what = what

    def map(self, fn: Callable[[list[T]], Sequence[R]], items: Sequence[T]) -> list[R]:
        items = list(items)
        out: list[R] = []
        i = 0
        while i < len(items):
            chunk = items[i:i + self.batch_size]
            try:
                results = fn(chunk)
            except Exception as exc:  # noqa: BLE001 - only out-of-memory is retried
                if not is_out_of_memory(exc) or len(chunk) == 1:
                    raise
                self.batch_size = max(1, len(chunk) // 2)
                log.warning("%s: out of memory with %d items, retrying with %d",
                            self.what, len(chunk), self.batch_size)
                del exc
                free_cuda_memory()
                continue
            if len(results) != len(chunk):
                raise RuntimeError(f"{self.what}: {len(results)} results for {len(chunk)} inputs")
            out.extend(results)
            i += len(chunk)
        return out


def free_cuda_memory() -> None:
    """Drop the failed attempt's tensors and hand cached blocks back to the driver."""
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def to_pil(image: np.ndarray) -> Image.Image:
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 image (H, W, 3), got {arr.dtype} {arr.shape}")
    return Image.fromarray(arr)


def fit_within(image: Image.Image, max_side: int | None) -> Image.Image:
    """Downscale so the longest side is at most max_side (never upscale)."""
    if not max_side or max(image.size) <= max_side:
        return image
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC)


def move(inputs: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Tensors to the device; floating ones (pixels) also to the model's dtype."""
    out = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, dtype) if v.is_floating_point() else v.to(device)
        out[k] = v
    return out


class HFBackend:
    """Device, dtype, batching and a recorded name for one loaded model."""

    interface = ""
    default_model = ""

    def __init__(self, model: str | None, device: str, dtype: str, batch_size: int,
                 name: str | None) -> None:
        self.model_id = str(model or self.default_model)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.path = resolve_model(self.model_id, self.default_model, self.interface)
        self.batcher = Batcher(batch_size, f"{self.interface} {self.model_id}")
        self.name = name or f"hf:{self.model_id}"

    @property
    def batch_size(self) -> int:
        return self.batcher.batch_size

    def load(self, loader: Callable[..., T], **kwargs: Any) -> T:
        repo_id = self.default_model if _looks_like_path(self.model_id) else self.model_id
        return load_pretrained(loader, self.path, self.interface, repo_id, **kwargs)
