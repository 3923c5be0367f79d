"""Benchmark: a teacher the repository does not know, run the way a user runs it: a full-label table through the
``nncift`` command line (``label.function=table``, defaults otherwise), its own held-out choice, and the
report's selection fidelity under the same table (``fidelity.truth_table``).

``benchmarks/bench_fidelity.py`` runs the pipeline's pieces in one process over many seeds; this runs the real
CLI once per teacher, so what it prints is what ``report/report.md`` says to a user:
gap closed of the run's selection, of every candidate, and of the free baselines (zero-label embedding cosine,
the exact diagonal with a constant or calibrated-cosine off-diagonal, the calibrated lexical view).

Teachers:
  textsim, charsim, char24   TF-IDF cosines (``bench_fidelity.text_kernels``) of the run's own ShareGPT items
                             (``--pool`` x ``--target``, default 800 x 200): the table is built from the run's
                             ``data/`` ids, so a fresh run directory per teacher
  bm25                       BM25 of each target's text as the query against each example's (asymmetric), the same
                             items
  icl, icl2, icl3            the shipped full DELIFT ICL tables, read *without* their provenance (a user's own table
                             file: no teacher-LM features, ``label.probes=auto`` decided on the run's labels), with
                             the data settings their ``.json`` records

    .venv/bin/python benchmarks/bench_table_cli.py --teacher char24,icl2
    .venv/bin/python benchmarks/bench_table_cli.py --teacher textsim --set label.fraction=0.2

Writes ``<work>/<teacher>[_<pool>x<target>]/`` (the run directory and the table) and ``<work>/results.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fidelity import TABLES, TEXT_TEACHERS, text_kernels

from nncift.store import write_parquet

ROOT = Path(__file__).resolve().parents[1]
NNCIFT = [sys.executable, "-m", "nncift.cli"]
log = logging.getLogger("bench_table_cli")


def _cli(command: str, run_dir: Path, overrides: list[str]) -> None:
    """``nncift <command> --run-dir RUN --set ... --overwrite`` (a rerun with other overrides recomputes the stages
    they change); a failure stops the benchmark with the command's output."""
    args = [*NNCIFT, command, "--run-dir", str(run_dir), "-q", "--overwrite"]
    for o in overrides:
        args += ["--set", o]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")


def write_table(path: Path, pool_ids: list[str], target_ids: list[str], ff: np.ndarray, ft: np.ndarray) -> None:
    """A full-label table (``example_id``, ``target_id``, ``value``): ``K_FF[i, j] = U(pool j -> pool i)``,
    ``K_FT[i, j] = U(pool i -> target j)``; no provenance (a table of unknown nature)."""
    import pyarrow as pa

    pid, tid = np.asarray(pool_ids, object), np.asarray(target_ids, object)
    m, n = len(pid), len(tid)
    ex = np.concatenate([np.tile(pid, m), np.repeat(pid, n)])
    tg = np.concatenate([np.repeat(pid, m), np.tile(tid, m)])
    val = np.concatenate([ff.reshape(-1), ft.reshape(-1)]).astype(np.float32)
    write_parquet(path, pa.table({"example_id": pa.array(ex.tolist(), pa.string()),
                                  "target_id": pa.array(tg.tolist(), pa.string()), "value": pa.array(val)}))  # fmt: skip


def run_dir_of(name: str, work: Path, pool: int, target: int) -> Path:
    """The teacher's folder: one per size for the text teachers (their table is built over the run's own items)."""
    return work / name if name in TABLES else work / f"{name}_{pool}x{target}"


def prepare(name: str, work: Path, pool: int, target: int) -> tuple[Path, list[str]]:
    """The teacher's table file and the data overrides a run over its ids needs."""
    import pyarrow.parquet as pq

    run_dir = run_dir_of(name, work, pool, target) / "run"
    table = run_dir.parent / "teacher.parquet"
    if name in TABLES:  # a shipped DELIFT table, its provenance dropped
        meta = json.loads(TABLES[name].with_suffix(".json").read_text())
        data = [f"{k}={v}" for k, v in meta["data_overrides"].items()]
        if not table.is_file():
            table.parent.mkdir(parents=True, exist_ok=True)
            write_parquet(table, pq.read_table(TABLES[name]).replace_schema_metadata(None))
        return table, data
    if name not in TEXT_TEACHERS:
        sys.exit(f"unknown teacher {name!r}: one of {', '.join([*TEXT_TEACHERS, *TABLES])}")
    data = [f"data.pool_size={pool}", f"data.target_size={target}"]
    if not table.is_file():
        _cli("data", run_dir, data)
        p = pq.read_table(run_dir / "data" / "pool.parquet").to_pydict()
        t = pq.read_table(run_dir / "data" / "target.parquet").to_pydict()
        texts = lambda d: [a + "\n" + b for a, b in zip(d["prompt"], d["response"], strict=True)]  # noqa: E731
        ff, ft = text_kernels(name, texts(p), texts(t))
        write_table(table, p["id"], t["id"], ff, ft)
    return table, data


def run_teacher(name: str, work: Path, fraction: float, pool: int, target: int, extra: list[str]) -> dict:
    """One CLI run on the teacher's table; the report's figures."""
    from nncift.surrogate.candidates import FREE

    table, data = prepare(name, work, pool, target)
    run_dir = run_dir_of(name, work, pool, target) / "run"
    _cli("report", run_dir, [*data, "label.function=table", f"table.path={table}", f"label.fraction={fraction}",
                             f"fidelity.truth_table={table}", *extra])  # fmt: skip
    fid = json.loads((run_dir / "report" / "fidelity.json").read_text())
    choice = json.loads((run_dir / "choose" / "choice.json").read_text())
    cands = {k: v["gap_closed"] for k, v in fid["candidates"].items()}
    free = {k: v for k, v in cands.items() if k in FREE}
    free["zero_label"] = fid["zero_label"]["gap_closed"]
    best_free = max(free, key=free.get)
    return {"teacher": name, "fraction": fraction, "gap_closed": fid["gap_closed"], "chosen": choice["chosen"],
            "candidates": cands, "free": free, "best_free": best_free, "margin": fid["gap_closed"] - free[best_free],
            "choose_pairs": choice["teacher_pairs"]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="char24,charsim,textsim,bm25,icl2", help="comma-separated, of: "
                    + ", ".join([*TEXT_TEACHERS, *TABLES]))  # fmt: skip
    ap.add_argument("--fraction", type=float, default=0.3, help="label.fraction")
    ap.add_argument("--pool", type=int, default=800, help="pool items of the text teachers")
    ap.add_argument("--target", type=int, default=200, help="target items of the text teachers")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for every run")  # fmt: skip
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench_table_cli"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    work = Path(args.work)
    rows = []
    for name in [x for x in args.teacher.split(",") if x]:
        r = run_teacher(name, work, args.fraction, args.pool, args.target, args.overrides)
        rows.append(r)
        log.info("[%s] gap closed %+.3f (chosen %s); best free %s %+.3f; margin %+.3f", name, r["gap_closed"],
                 r["chosen"], r["best_free"], r["free"][r["best_free"]], r["margin"])  # fmt: skip
    log.info("\n| teacher | the run (chosen) | zero-label cosine | diag + const | diag + cosine | diag + lexical | "
             "best free | margin |\n|---|---|---|---|---|---|---|---|")  # fmt: skip
    for r in rows:
        f = r["free"]
        cell = {
            k: f"{f[k]:+.3f}" if k in f else "–" for k in ("zero_label", "diag_const", "diag_cosine", "diag_lexical")
        }
        log.info("| %s | **%+.3f** (%s) | %s | %s | %s | %s | %s %+.3f | %+.3f |", r["teacher"], r["gap_closed"],
                 r["chosen"], cell["zero_label"], cell["diag_const"], cell["diag_cosine"], cell["diag_lexical"],
                 r["best_free"], f[r["best_free"]], r["margin"])  # fmt: skip
    out = work / "results.json"
    out.write_text(json.dumps({"overrides": args.overrides, "fraction": args.fraction, "runs": rows}, indent=1))
    log.info("results: %s", out)


if __name__ == "__main__":
    main()
