"""Command line: ``nncift run|data|embed|label|fit|estimate|select|report``.

Each subcommand runs the pipeline up to and including its stage, skipping finished stages.
User errors (bad input, bad config, refused resume) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from nncift.store import STAGES


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nncift", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", *STAGES[:-1], "report"):
        p = sub.add_parser(name, help="the whole pipeline" if name == "run" else f"pipeline up to '{name}'")
        p.add_argument("--config", help="YAML config file")
        p.add_argument("--input", help="pool corpus (sets data.input)")
        p.add_argument("--target", help="target corpus (sets data.target)")
        p.add_argument("--run-dir", default="runs/default", help="run directory (default: runs/default)")
        p.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config field, e.g. --set label.fraction=0.1 (repeatable)",
        )
        p.add_argument("--overwrite", action="store_true", help="recompute finished stages whose configuration changed")
        p.add_argument("-q", "--quiet", action="store_true", help="warnings only")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from nncift.config import load_config
    from nncift.errors import NncifError
    from nncift.pipeline import Pipeline

    overrides = list(args.overrides)
    if args.input:
        overrides.append(f"data.input={args.input}")
    if args.target:
        overrides.append(f"data.target={args.target}")
    try:
        cfg = load_config(args.config, overrides)
        until = "report" if args.command == "run" else args.command
        Pipeline(cfg, args.run_dir, overwrite=args.overwrite).run(until)
    except NncifError as exc:
        print(f"nncift: error: {exc}", file=sys.stderr)
        return 2
    except NotImplementedError as exc:
        print(f"nncift: not implemented: {exc}", file=sys.stderr)
        return 3
    if args.command in ("run", "report"):
        print(f"report: {os.path.join(args.run_dir, 'report', 'report.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
