"""How the stages' fan-outs run: the local executor, the Ray executor, the stall watchdog and device resolution."""

from __future__ import annotations

from typing import Any

from nncift.config import RayConfig


def make_executor(cfg: RayConfig) -> Any:
    """The run's executor: :class:`LocalExecutor`, or :class:`nncift.exec.ray_executor.RayExecutor` (Ray starts on
    its first fan-out)."""
    if cfg.executor == "local":
        from nncift.exec.local import LocalExecutor

        return LocalExecutor()
    from nncift.exec.ray_executor import RayExecutor

    return RayExecutor(cfg)
