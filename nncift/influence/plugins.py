"""The registry of teachers: built-in modules and the ``nncift.teachers`` entry-point group, by name."""

from __future__ import annotations

import importlib
import logging
from typing import Any

from nncift.influence.interface import InfluenceFunction

log = logging.getLogger(__name__)

_REGISTRY: dict[str, type[InfluenceFunction]] = {}
BUILTIN = (
    "nncift.influence.delift_se",
    "nncift.influence.delift_icl",
    "nncift.influence.table",
    "nncift.influence.selectit",
    "nncift.influence.less",
)
_loaded = False


def register(cls: type[InfluenceFunction]) -> type[InfluenceFunction]:
    """Class decorator: make ``cls`` available as ``label.function=<cls.name>``."""
    if not (isinstance(cls, type) and issubclass(cls, InfluenceFunction)):
        raise TypeError(f"register: {cls!r} is not an InfluenceFunction subclass")
    if cls.kind not in ("pairwise", "pointwise"):
        raise TypeError(f"register: {cls.__name__}.kind must be 'pairwise' or 'pointwise', got {cls.kind!r}")
    old = _REGISTRY.get(cls.name)
    if old is not None and old is not cls and old.__qualname__ != cls.__qualname__:
        raise ValueError(f"register: teacher name {cls.name!r} is taken by {old.__module__}.{old.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in BUILTIN:
        importlib.import_module(mod)
    from importlib.metadata import entry_points

    for ep in entry_points(group="nncift.teachers"):
        try:
            ep.load()
        except Exception as exc:  # a broken third-party plugin must not break the built-in teachers
            log.warning("teacher plugin %s (%s) failed to load: %s", ep.name, ep.value, exc)


def teachers() -> dict[str, type[InfluenceFunction]]:
    """Every registered teacher class by name."""
    _load()
    return dict(_REGISTRY)


def teacher_class(name: str) -> type[InfluenceFunction]:
    """The registered class of ``name``; ValueError listing the known names otherwise."""
    _load()
    if name not in _REGISTRY:
        raise ValueError(f"unknown influence function {name!r} (known: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[name]


def build_influence_function(name: str, **kwargs: Any) -> InfluenceFunction:
    """Instantiate teacher ``name`` from constructor keyword arguments (see :meth:`InfluenceFunction.resolve`)."""
    return teacher_class(name).build(**kwargs)


def function_traits(name: str) -> dict[str, Any]:
    """Class-level traits of a teacher without building it (no model is loaded): ``kind``, ``symmetric``,
    ``exact_is_cheap``, ``pairs_per_second``."""
    cls = teacher_class(name)
    return {
        "kind": cls.kind,
        "symmetric": cls.symmetric,
        "exact_is_cheap": cls.exact_is_cheap,
        "pairs_per_second": cls.pairs_per_second,
    }
