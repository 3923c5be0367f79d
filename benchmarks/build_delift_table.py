"""Build a full DELIFT ICL matrix (every pair) with the embedded SmolLM2 on real ShareGPT pairs.

Runs the pipeline's label stage with ``label.fraction=1.0`` (local executor: one progress bar, every block
lands as soon as it finishes, so an interrupted build resumes where it stopped), then exports the labels as
a table teacher file with its provenance (model, token caps, template, data configuration and ids, seconds):

    benchmarks/data/delift_icl_smollm2.parquet   example_id, target_id, value = U(example -> target)
    benchmarks/data/delift_icl_smollm2.json      provenance (also in the Parquet metadata)

Default size (benchmarks/configs/delift_table.yaml): 120 pool x (120 pool + 30 target) = 18,000 teacher
pairs, 48/48 tokens; about an hour on 2 CPU cores.

    .venv/bin/python benchmarks/build_delift_table.py [--run-dir runs/delift_table] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "benchmarks" / "configs" / "delift_table.yaml"))
    ap.add_argument("--run-dir", default=str(ROOT / "runs" / "delift_table"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "data" / "delift_icl_smollm2.parquet"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from nncift.config import load_config
    from nncift.runner import Runner

    cfg = load_config(args.config, args.overrides)
    if cfg.label.fraction < 1.0:
        raise SystemExit("build_delift_table: label.fraction must be 1.0 (every pair)")
    pipe = Runner(cfg, args.run_dir)
    pipe.run("label")
    prov = pipe.export_table(args.out)
    secs = prov["label_seconds"] or 0.0
    print(
        f"table: {args.out}: {prov['pairs']:,} pairs (M={prov['M']}, N={prov['N']}), teacher "
        f"{prov['function']} in {secs:.0f} s ({prov['teacher_pairs_per_second'] or 0:.2f} pairs/s)"
    )


if __name__ == "__main__":
    main()
