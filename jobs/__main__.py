"""Ray job entrypoint: ``python -m jobs <command> [nncift options]``, e.g.

    ray job submit --working-dir . -- python -m jobs run --config jobs/configs/delift_se_2000.yaml --run-dir /shared/run

``<command>`` is any ``nncift`` command (``run`` = the whole pipeline, a stage name, ``finetune``, ``evaluate``,
``compare``, ``export-table``, ``score``). Inside a Ray job the driver connects to the cluster that runs the job
(``ray.address=auto`` unless given), so every Ray Data / Ray Train fan-out uses the whole cluster.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None) -> int:
    from nncift.cli import main as cli_main

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        print("usage: python -m jobs <command> [nncift options]   (commands: nncift --help)", file=sys.stderr)
        return 2
    if ("RAY_ADDRESS" in os.environ or os.environ.get("RAY_JOB_ID")) and not any("ray.address" in a for a in argv):
        argv += ["--set", "ray.address=auto"]
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
