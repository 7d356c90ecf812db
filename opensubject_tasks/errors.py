"""Error kinds that decide what happens next: reject, retry, or stop."""


class OpenSubjectError(Exception):
    """Base class for the product's own errors."""


class ConfigError(OpenSubjectError):
    """Settings are invalid; the message names the field."""


class BadInput(OpenSubjectError):
    """The input itself is unusable (corrupt video, absurd metadata...).

    Never retried: the entity is marked failed/rejected with this reason and the
    build goes on.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Rejected(BadInput):
    """The input is valid but does not meet a quality filter (recorded, not an error)."""


class TransientError(OpenSubjectError):
    """A store, database or broker hiccup: retried with backoff."""


class UnsafeKey(OpenSubjectError, ValueError):
    """An object key would escape its prefix or holds forbidden characters."""


class ModelNotAvailable(OpenSubjectError):
    """A configured model is not present locally; the message says how to get it."""
