"""Which torch device a worker runs on: ``device: auto`` (embed, label, estimate, eval) resolved where the work
runs, never on the driver.

A Ray actor asks for GPUs with the stage's ``num_gpus``; Ray gives it GPU ids (``ray.get_gpu_ids()``) and sets
its ``CUDA_VISIBLE_DEVICES`` to them, so ``cuda`` in that actor is its own GPU. ``auto`` therefore means: cuda
where the process was given GPUs and torch has CUDA, else cpu. A process given (logical) GPUs whose torch has no
CUDA falls back to cpu with one warning per process.

Which GPUs a process was given: in a Ray actor ``ray.get_gpu_ids()`` (:class:`nncift.exec.ray_executor.SharedArgsWorker`
passes them; Ray leaves ``CUDA_VISIBLE_DEVICES`` alone in an actor given no GPU, so it is not read there); in a
plain process (the local executor, driver-side work) :func:`local_gpu_ids`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)

AUTO = "auto"
_warned: set[str] = set()  # warnings already logged by this process


def cuda_available() -> bool:
    """Whether this process's torch can use CUDA (False without torch or without a CUDA build)."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def resolve_device(requested: str, gpu_ids: Sequence[Any] | None, cuda: bool | None = None) -> str:
    """The torch device a worker uses for a configured ``device``.

    Args:
        requested: the configured device; anything but ``auto`` (``cpu``, ``cuda``, ``cuda:N``) is returned
            unchanged.
        gpu_ids: the GPUs this process was given (Ray's ids of this actor, or :func:`local_gpu_ids`).
        cuda: whether torch has CUDA here (None = ask torch).

    Returns:
        ``cuda`` when ``auto`` and GPUs were given and CUDA works (the first visible one: an actor's own GPU);
        else ``cpu``; given GPUs without CUDA (logical GPUs of a CPU test cluster, a CPU-only torch build) log a
        warning once per process.
    """
    if requested != AUTO:
        return requested
    if not gpu_ids:
        return "cpu"
    if cuda is None:
        cuda = cuda_available()
    if cuda:
        return "cuda"
    msg = "device=auto: this process was given GPUs %s but torch has no CUDA; running on cpu"
    if msg not in _warned:
        _warned.add(msg)
        log.warning(msg, [str(g) for g in gpu_ids])
    return "cpu"


def local_gpu_ids() -> list[str]:
    """The GPUs a plain (non-Ray-actor) process was given: those ``CUDA_VISIBLE_DEVICES`` lists when it is set
    (empty: none), else every device torch sees."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        ids = []
        for part in (p.strip() for p in env.split(",")):
            if not part or part.startswith("-") or part == "NoDevFiles":  # CUDA stops at an invalid entry
                break
            ids.append(part)
        return ids
    if not cuda_available():
        return []
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def resolve_worker_kwargs(kwargs: dict[str, Any], gpu_ids: Sequence[Any] | None) -> dict[str, Any]:
    """A worker's constructor arguments with ``device: auto`` resolved (:func:`resolve_device`): its own
    ``device`` and a label worker's teacher's (``function_kwargs.device``). Returns a copy when anything
    changed, else ``kwargs`` itself."""
    out = kwargs
    if out.get("device") == AUTO:
        out = {**out, "device": resolve_device(AUTO, gpu_ids)}
    fk = out.get("function_kwargs")
    if isinstance(fk, dict) and fk.get("device") == AUTO:
        out = {**out, "function_kwargs": {**fk, "device": resolve_device(AUTO, gpu_ids)}}
    return out


def local_device(requested: str) -> str:
    """:func:`resolve_device` for work in this (non-actor) process, e.g. driver-side model features."""
    return resolve_device(requested, local_gpu_ids()) if requested == AUTO else requested
