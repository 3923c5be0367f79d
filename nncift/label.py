"""Seed labeling: the expensive influence function on planned pair blocks (callable-class worker)."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nncift.errors import TeacherError, run_worker_batch
from nncift.influence import Items, build_influence_function
from nncift.pairs import LabelPlan, ranges
from nncift.store import write_parquet

log = logging.getLogger(__name__)

LABEL_SCHEMA = pa.schema(
    [
        ("kernel", pa.string()),
        ("quadrant", pa.string()),
        ("row_id", pa.string()),
        ("col_id", pa.string()),
        ("row", pa.int64()),
        ("col", pa.int64()),
        ("value", pa.float32()),
    ]
)


def block_side(block_size: int, block_seconds: float, pairs_per_second: float) -> int:
    """Side of a label block: ``block_seconds`` of teacher work at ``pairs_per_second``, at most ``block_size``.

    An expensive teacher gets small blocks (each lands within minutes and shows progress); a cheap one keeps
    ``block_size``.
    """
    return int(max(1, min(block_size, math.isqrt(max(1, int(block_seconds * pairs_per_second))))))


def plan_blocks(plan: LabelPlan, block_size: int) -> list[dict]:
    """Split the sets of ``plan`` into label blocks of about ``block_size**2`` pairs.

    A block spec is ``{block_id, set_id, set_end, r0, r1, c0, c1}``:

    - a large dense set is tiled into ``block_size x block_size`` blocks (``set_end = set_id + 1``), ordered
      column-block-major within the set, so the blocks of one worker call share their in-context examples;
    - consecutive small dense sets (the rectangles of the spread design) are packed whole into one block
      (``set_end > set_id + 1``; the ranges are unused);
    - a paired set (the K_FF diagonal) is cut into chunks ``[r0, r1)`` of its pair list.
    """
    target = block_size * block_size
    specs: list[dict] = []

    def add(set_id: int, set_end: int, r0: int = 0, r1: int = 0, c0: int = 0, c1: int = 0) -> None:
        if set_end > set_id + 1:
            pairs = sum(plan.sets[i].num_pairs for i in range(set_id, set_end))
        else:
            pairs = (r1 - r0) if plan.sets[set_id].paired else (r1 - r0) * (c1 - c0)
        specs.append({"block_id": len(specs), "set_id": set_id, "set_end": set_end, "r0": r0, "r1": r1, "c0": c0,
                      "c1": c1, "pairs": pairs})  # fmt: skip

    pack: list[int] = []
    pack_pairs = 0
    for set_id, s in enumerate(plan.sets):
        small = not s.paired and len(s.rows) <= block_size and len(s.cols) <= block_size
        if pack and (not small or pack_pairs + s.num_pairs > target or plan.sets[pack[0]].kernel != s.kernel):
            add(pack[0], pack[-1] + 1, 0, len(plan.sets[pack[0]].rows), 0, len(plan.sets[pack[0]].cols))
            pack, pack_pairs = [], 0
        if small:
            pack.append(set_id)
            pack_pairs += s.num_pairs
        elif s.paired:
            for r0, r1 in ranges(s.num_pairs, target):
                add(set_id, set_id + 1, r0, r1, r0, r1)
        else:
            for c0, c1 in ranges(len(s.cols), block_size):
                for r0, r1 in ranges(len(s.rows), block_size):
                    add(set_id, set_id + 1, r0, r1, c0, c1)
    if pack:
        add(pack[0], pack[-1] + 1, 0, len(plan.sets[pack[0]].rows), 0, len(plan.sets[pack[0]].cols))
    return specs


class LabelWorker:
    """Callable class: block specs -> Parquet label blocks (``<out_dir>/<block_id>.parquet``).

    Args:
        function: influence function name. function_kwargs: its constructor arguments.
        pool, target: dicts with ``ids``, ``prompts``, ``responses`` (lists) and ``embeddings`` (M|N, d).
        sets: the plan's sets as dicts (kernel, quadrant, rows, cols, paired).
        out_dir: block folder.
    """

    def __init__(self, function: str, function_kwargs: dict, pool: dict, target: dict, sets: list[dict], out_dir: str):
        self.fn = build_influence_function(function, **function_kwargs)
        self.ids = {
            "pool": np.asarray(pool["ids"], dtype=object),
            "target": np.asarray(target["ids"], dtype=object),
        }
        self.items = {
            side: Items(d["prompts"], d["responses"], np.asarray(d["embeddings"], np.float32), list(d["ids"]))
            for side, d in (("pool", pool), ("target", target))
        }
        self.sets = sets
        self.out_dir = Path(out_dir)

    def _label_set(self, s: dict, r0: int, r1: int, c0: int, c1: int) -> pa.Table:
        col_side = "pool" if s["kernel"] == "ff" else "target"
        rows = np.asarray(s["rows"][r0:r1], dtype=np.int64)
        if s["kernel"] == "item":  # a pointwise teacher: one score per pool item (col 0)
            rr, cc = rows, np.zeros(len(rows), np.int64)
            vals = self.fn.score(self.items["pool"].take(rr))
        elif s.get("paired"):
            rr = rows
            cc = np.asarray(s["cols"][r0:r1], dtype=np.int64)
            vals = self.fn.kernel_pairs(s["kernel"], self.items["pool"].take(rr), self.items[col_side].take(cc))
        else:
            cols = np.asarray(s["cols"][c0:c1], dtype=np.int64)
            vals = self.fn.kernel_block(s["kernel"], self.items["pool"].take(rows), self.items[col_side].take(cols))
            rr, cc = np.repeat(rows, len(cols)), np.tile(cols, len(rows))
        vals = np.asarray(vals, np.float32).reshape(-1)
        bad = np.flatnonzero(~np.isfinite(vals))
        if len(bad):
            i = int(bad[0])
            what = (
                f"the item {self.ids['pool'][rr[i]]!r}"
                if s["kernel"] == "item"
                else f"the pair (row {self.ids['pool'][rr[i]]!r}, col {self.ids[col_side][cc[i]]!r})"
            )
            raise TeacherError(
                f"teacher {self.fn.name} returned {len(bad)} non-finite values in a {s['kernel']} block, first "
                f"{vals[i]} for {what}; nothing of this block was written"
            )
        return pa.table(
            {
                "kernel": pa.array([s["kernel"]] * len(rr), pa.string()),
                "quadrant": pa.array([s["quadrant"]] * len(rr), pa.string()),
                "row_id": pa.array(self.ids["pool"][rr].tolist(), pa.string()),
                "col_id": pa.array(
                    [""] * len(cc) if s["kernel"] == "item" else self.ids[col_side][cc].tolist(), pa.string()
                ),
                "row": pa.array(rr),
                "col": pa.array(cc),
                "value": pa.array(vals),
            },
            schema=LABEL_SCHEMA,
        )

    def run_block(self, spec: dict) -> int:
        t0 = time.perf_counter()
        try:
            n = self._run_block(spec)
        except TeacherError as exc:
            raise TeacherError(f"label block {int(spec['block_id']):06d}: {exc}") from None
        dt = time.perf_counter() - t0
        log.info("label block %06d: %d pairs in %.1f s (%.1f pairs/s)", int(spec["block_id"]), n, dt, n / max(dt, 1e-9))
        return n

    def _run_block(self, spec: dict) -> int:
        first, end = int(spec["set_id"]), int(spec.get("set_end", int(spec["set_id"]) + 1))
        if end > first + 1:  # packed small rectangles, each labeled whole
            parts = [self._label_set(self.sets[i], 0, len(self.sets[i]["rows"]), 0, len(self.sets[i]["cols"]))
                     for i in range(first, end)]  # fmt: skip
            table = pa.concat_tables(parts)
        else:
            table = self._label_set(self.sets[first], spec["r0"], spec["r1"], spec["c0"], spec["c1"])
        write_parquet(self.out_dir / f"{int(spec['block_id']):06d}.parquet", table)
        return table.num_rows

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Label each block of the batch; a user-fixable error (a bad table, a non-finite teacher value) is
        returned in ``error`` rather than raised, so the driver reports it as one line
        (:func:`nncift.errors.raise_worker_errors`)."""
        return run_worker_batch(batch, self.run_block, "pairs")


def gather_labels(block_dir: Path, n_blocks: int) -> pa.Table:
    """Concatenate the label blocks in block order, checking that all ``n_blocks`` are present."""
    paths = [block_dir / f"{i:06d}.parquet" for i in range(n_blocks)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise RuntimeError(f"{block_dir}: {len(missing)} label blocks missing (first: {missing[0]})")
    return pa.concat_tables([pq.read_table(p) for p in paths]) if paths else LABEL_SCHEMA.empty_table()
