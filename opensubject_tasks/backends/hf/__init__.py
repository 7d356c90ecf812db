"""Model backends on transformers and diffusers (``hf``), and the same classes on tiny
randomly initialised local models (``tiny``). Importing this package registers them."""
from opensubject_tasks.backends.hf import detector, embedder, inpainter, segmenter, tiny, vlm  # noqa: F401
