"""Database: models, engine and schema upgrade. Knows tables, not stages."""
from opensubject_tasks.db.engine import make_engine, make_session_factory, session_scope, upgrade
from opensubject_tasks.db.models import (
    Base,
    Build,
    Clip,
    Pair,
    Sample,
    StageAttempt,
    Subject,
    Video,
)

__all__ = [
    "Base", "Build", "Clip", "Pair", "Sample", "StageAttempt", "Subject", "Video",
    "make_engine", "make_session_factory", "session_scope", "upgrade",
]
