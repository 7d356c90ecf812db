"""What a stage needs from the outside world, built once per process."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Any, Literal, overload

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from opensubject_tasks.backends.base import VLM, Detector, Embedder, Inpainter, QualityScorer, Segmenter, Verifier
from opensubject_tasks.backends.registry import get_backend
from opensubject_tasks.config import Settings
from opensubject_tasks.db.engine import make_engine, make_session_factory
from opensubject_tasks.storage import ObjectStore, make_store
from opensubject_tasks.weights import local_model_options


@dataclass
class Context:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    store: ObjectStore
    worker: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")

    @classmethod
    def from_settings(cls, settings: Settings) -> Context:
        db = settings.db
        engine = make_engine(settings.database_url, db.pool_size, db.max_overflow, db.pool_timeout_s)
        return cls(settings, engine, make_session_factory(engine), make_store(settings.store))

    # The interface type of each backend (backends/base.py), for readers and type checkers.
    @overload
    def backend(self, interface: Literal["vlm"]) -> VLM: ...
    @overload
    def backend(self, interface: Literal["detector"]) -> Detector: ...
    @overload
    def backend(self, interface: Literal["segmenter"]) -> Segmenter: ...
    @overload
    def backend(self, interface: Literal["inpainter"]) -> Inpainter: ...
    @overload
    def backend(self, interface: Literal["embedder"]) -> Embedder: ...
    @overload
    def backend(self, interface: Literal["quality"]) -> QualityScorer: ...
    @overload
    def backend(self, interface: Literal["verifier"]) -> Verifier: ...

    def backend(self, interface: str) -> Any:
        """The configured backend for an interface (loaded once per process, then warm)."""
        b = self.settings.backends
        name = getattr(b, interface)
        options: dict[str, Any] = {"device": b.device, "dtype": b.dtype, "batch_size": b.batch_size}
        options.update(b.options.get(interface, {}))
        options.update(local_model_options(self.settings, interface))  # weights fetched into models_dir
        return get_backend(interface, name, **options)
