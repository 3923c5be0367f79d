"""Shared body of the Ray job entrypoints: parse the nncift CLI options, run up to one stage.

Inside a Ray job the driver connects to the cluster that runs the job (``ray.address`` = "auto" unless
given), so every Ray Data / Ray Train fan-out uses the whole cluster.
"""

from __future__ import annotations

import os
import sys


def main(stage: str, argv: list[str] | None = None) -> int:
    from nncift.cli import main as cli_main

    argv = list(sys.argv[1:] if argv is None else argv)
    if "RAY_ADDRESS" in os.environ or os.environ.get("RAY_JOB_ID"):
        argv += ["--set", "ray.address=auto"]
    return cli_main([stage, *argv])
