"""One registry of backends by (interface, name).

A backend is registered with a factory taking keyword options; configuration keys
under ``backends.options.<interface>`` are exactly those keyword arguments.
``get_backend`` caches instances per process, so a long-lived worker loads each
model once and keeps it warm.
"""
from __future__ import annotations

import importlib
import threading
from typing import Any, Callable

INTERFACES = ("vlm", "detector", "segmenter", "inpainter", "embedder", "quality", "verifier")

_FACTORIES: dict[tuple[str, str], Callable[..., Any]] = {}
_INSTANCES: dict[tuple[str, str, str], Any] = {}
_LOCK = threading.RLock()  # re-entrant: a factory may ask for the backends it builds on

# Modules that register backends when imported; imported lazily so that heavy
# libraries (torch, transformers) load only when an `hf`/`tiny` backend is asked for.
_PROVIDERS = {
    "classical": "opensubject_tasks.backends.classical",
    "none": "opensubject_tasks.backends.classical",
    "vlm": "opensubject_tasks.backends.verifier_vlm",
    "hf": "opensubject_tasks.backends.hf",
    "tiny": "opensubject_tasks.backends.hf",
    "florence": "opensubject_tasks.backends.hf",
}


def register(interface: str, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    if interface not in INTERFACES:
        raise ValueError(f"unknown backend interface {interface!r}")

    def deco(factory: Callable[..., Any]) -> Callable[..., Any]:
        known = _FACTORIES.get((interface, name))
        # the same function again (a module reloaded) is no clash; another one is a mistake
        if known is not None and (known.__module__, known.__qualname__) != (factory.__module__, factory.__qualname__):
            raise ValueError(f"a {interface} backend named {name!r} is registered already "
                             f"({known.__module__}.{known.__qualname__})")
        _FACTORIES[(interface, name)] = factory
        return factory

    return deco


def _load_provider(module: str, interface: str) -> None:
    """Import what registers ``module``'s backends of ``interface``: its submodule named
    after the interface when it has one (classical/quality.py), and the module itself."""
    try:
        importlib.import_module(f"{module}.{interface}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{module}.{interface}":
            raise  # a library the backend needs is missing: say which
    importlib.import_module(module)


def available(interface: str) -> list[str]:
    for module in set(_PROVIDERS.values()):
        try:
            _load_provider(module, interface)
        except ImportError:
            pass
    return sorted(n for (i, n) in _FACTORIES if i == interface)


def get_backend(interface: str, name: str, /, **options: Any) -> Any:
    """Return the process-wide instance of a backend, creating it on first use."""
    key = (interface, name, repr(sorted(options.items())))
    with _LOCK:
        if key in _INSTANCES:
            return _INSTANCES[key]
        if (interface, name) not in _FACTORIES and name in _PROVIDERS:
            _load_provider(_PROVIDERS[name], interface)
        factory = _FACTORIES.get((interface, name))
        if factory is None:
            raise KeyError(
                f"no {interface} backend named {name!r}; available: {available(interface)}"
            )
        instance = factory(**options)
        _INSTANCES[key] = instance
        return instance


def clear_cache() -> None:
    with _LOCK:
        _INSTANCES.clear()
