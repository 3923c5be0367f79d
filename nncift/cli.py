"""Command line: ``nncift run|data|embed|label|fit|choose|estimate|select|report|finetune|evaluate|compare|score``.

Each pipeline subcommand runs the pipeline up to and including its stage, skipping finished stages.
``score`` scores new rows (``--input``) against a finished run without relabeling; ``select --scored NAME``
selects from the pool plus those rows (both default to the run's own ``config.yaml``).
``finetune`` / ``evaluate`` train and score a model on one subset (``--subset``); ``compare`` does both for
every subset of ``eval.subsets`` and writes the comparison table and plot.
User errors (bad input, bad config, refused resume) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nncift", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    helps = {
        "run": "the whole pipeline",
        "finetune": "DeepSpeed fine-tune (Ray Train) on a subset",
        "evaluate": "evaluate a subset's model on the held-out test split",
        "compare": "fine-tune + evaluate every subset of eval.subsets; table and plot",
    }
    helps["export-table"] = "write the run's teacher labels as a table file (label.function=table)"
    helps["score"] = "score new rows against a finished run (no relabeling): score/<name>/"
    from nncift.stages import PIPELINE

    names = ("run", *(s.name for s in PIPELINE), "finetune", "evaluate", "compare", "export-table", "score")
    for name in names:
        p = sub.add_parser(name, help=helps.get(name, f"pipeline up to '{name}'"))
        if name == "score":
            p.add_argument("--name", help="folder under <run>/score/ (default: the input file's stem)")
        if name == "select":
            p.add_argument("--scored", metavar="NAME", help="select from the pool plus the rows scored as NAME")
        if name == "export-table":
            p.add_argument("--out", required=True, help="Parquet file to write (example_id, target_id, value)")
        if name in ("finetune", "evaluate"):
            p.add_argument("--subset", default="nncift", help="base | random | nncift | exact | full (default nncift)")
        if name == "compare":
            p.add_argument("--subsets", help="comma-separated subsets (sets eval.subsets)")
        p.add_argument(
            "--config",
            help="YAML config file" + (" (default: <run-dir>/config.yaml)" if name in ("score", "select") else ""),
        )
        if name == "score":
            p.add_argument("--input", required=True, help="new rows to score (read with the run's data config)")
        else:
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
        p.add_argument(
            "-v", "--verbose", action="store_true",
            help="every log line, Ray Data's progress and the workers' logs on the console (always in logs/run.log)",
        )  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = make_parser().parse_args(argv)
    from nncift import console

    console.setup(-1 if args.quiet else (1 if args.verbose else 0))  # a fresh console handler on each call
    run_log = console.attach_run_log(args.run_dir)
    try:
        return _main(args, argv)
    finally:
        console.detach(run_log)


def _main(args: argparse.Namespace, argv: list[str]) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from nncift.config import load_config
    from nncift.errors import NnciftError
    from nncift.runner import Runner

    overrides = list(args.overrides)
    scoring = args.command == "score" or bool(getattr(args, "scored", None))
    if scoring and args.config is None and os.path.isfile(os.path.join(args.run_dir, "config.yaml")):
        args.config = os.path.join(args.run_dir, "config.yaml")  # the run's own configuration
    if args.input and args.command != "score":
        overrides.append(f"data.input={args.input}")
    if args.target:
        overrides.append(f"data.target={args.target}")
    if getattr(args, "subsets", None):
        overrides.append(f"eval.subsets={args.subsets}")
    try:
        cfg = load_config(args.config, overrides)
        runner = Runner(cfg, args.run_dir, overwrite=args.overwrite)
        if args.command in ("finetune", "evaluate", "compare"):
            return _subset_command(args, runner, argv)
        if args.command == "export-table":
            prov = runner.export_table(args.out)
            print(f"table: {args.out} ({prov['pairs']:,} pairs)")
            return 0
        if scoring:
            return _score_command(args, runner)
        runner.run("report" if args.command == "run" else args.command)
    except NnciftError as exc:
        print(f"nncift: error: {exc}", file=sys.stderr)
        return 2
    except NotImplementedError as exc:
        print(f"nncift: not implemented: {exc}", file=sys.stderr)
        return 3
    if args.command in ("run", "report"):
        print(f"report: {os.path.join(args.run_dir, 'report', 'report.md')}")
        _print_versus(args.run_dir)
    return 0


def _print_versus(run_dir: str) -> None:
    """End the console with NN-CIFT against the full teacher, when the run's report can say it."""
    import json

    from nncift.stages.report import versus_lines

    path = os.path.join(run_dir, "report", "report.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            for line in versus_lines(json.load(fh)):
                print(line)


def _score_command(args: argparse.Namespace, runner) -> int:
    from nncift.stages.score import score, select_scored

    if args.command == "score":
        out = score(runner, args.input, args.name)
        how = "already scored, skipped" if out["skipped"] else f"{out['new']} new rows, layout {out['layout']}"
        print(f"scored: {out['folder']} ({how})")
    else:
        out = select_scored(runner, args.scored)
        print(f"selection: {os.path.join(out['folder'], 'selection.parquet')}")
    return 0


def _subset_command(args: argparse.Namespace, runner, argv: list[str]) -> int:
    import json
    import shlex

    from nncift.selection.subsets import check_subset
    from nncift.stages.finetune import finetune

    if args.command == "finetune":
        check_subset(args.subset)
        out = finetune(runner.ctx, args.subset)
        print(json.dumps({k: out.get(k) for k in ("rows", "steps", "first_loss", "last_loss", "wall_seconds")}))
        print(f"model: {os.path.join(args.run_dir, 'finetune', args.subset, 'model')}")
    elif args.command == "evaluate":
        out = runner.run_stage("evaluate", subset=args.subset)
        print(json.dumps({k: out.get(k) for k in ("rows", "rouge_l", "embedding_similarity", "heldout_loss")}))
        print(f"eval: {os.path.join(args.run_dir, 'finetune', args.subset, 'eval', 'eval.json')}")
    else:
        runner.run_stage("compare", command="nncift " + shlex.join(argv))
        print(f"comparison: {os.path.join(args.run_dir, 'compare', 'compare.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
