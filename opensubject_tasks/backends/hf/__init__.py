"""Model backends on transformers and diffusers (``hf``, and ``florence`` for Florence-2),
and the same classes on tiny randomly initialised local models (``tiny``). Importing
this package registers them."""
from opensubject_tasks.backends.hf import detector, embedder, florence, inpainter, segmenter, tiny, vlm  # noqa: F401
