"""Seed labeling: the expensive influence function on planned pair blocks (callable-class worker)."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from nncift.errors import TeacherError, run_worker_batch
from nncift.influence import Items, build_influence_function
from nncift.labels.plan import LabelPlan, ranges
from nncift.labels.tables import LABEL_SCHEMA, write_block

log = logging.getLogger(__name__)


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
        pool, target: dicts with ``ids``, ``prompts``, ``responses`` (Arrow string arrays, or lists) and
            ``embeddings`` (M|N, d); each block takes only its own rows (no per-item Python objects are kept).
        sets: the plan's sets as dicts (kernel, quadrant, rows, cols, paired).
        out_dir: block folder.
    """

    def __init__(self, function: str, function_kwargs: dict, pool: dict, target: dict, sets: list[dict], out_dir: str):
        self.fn = build_influence_function(function, **function_kwargs)
        self.cols = {
            side: {k: _arrow(d[k]) for k in ("ids", "prompts", "responses")}
            for side, d in (("pool", pool), ("target", target))
        }
        self.emb = {side: np.asarray(d["embeddings"], np.float32) for side, d in (("pool", pool), ("target", target))}
        self.sets = sets
        self.out_dir = Path(out_dir)

    def _take(self, side: str, idx: np.ndarray) -> Items:
        """The rows ``idx`` of one side as :class:`Items` (strings materialised for these rows only)."""
        c, idx = self.cols[side], pa.array(np.asarray(idx, np.int64))
        return Items(
            c["prompts"].take(idx).to_pylist(),
            c["responses"].take(idx).to_pylist(),
            self.emb[side][idx.to_numpy()],
            c["ids"].take(idx).to_pylist(),
        )

    def _id(self, side: str, i: int) -> str:
        return self.cols[side]["ids"][int(i)].as_py()

    def _label_set(self, s: dict, r0: int, r1: int, c0: int, c1: int) -> pa.Table:
        col_side = "pool" if s["kernel"] == "ff" else "target"
        rows = np.asarray(s["rows"][r0:r1], dtype=np.int64)
        if s["kernel"] == "item":  # a pointwise teacher: one score per pool item (col 0)
            rr, cc = rows, np.zeros(len(rows), np.int64)
            vals = self.fn.score(self._take("pool", rr))
        elif s.get("paired"):
            rr = rows
            cc = np.asarray(s["cols"][r0:r1], dtype=np.int64)
            vals = self.fn.kernel_pairs(s["kernel"], self._take("pool", rr), self._take(col_side, cc))
        else:
            cols = np.asarray(s["cols"][c0:c1], dtype=np.int64)
            vals = self.fn.kernel_block(s["kernel"], self._take("pool", rows), self._take(col_side, cols))
            rr, cc = np.repeat(rows, len(cols)), np.tile(cols, len(rows))
        vals = np.asarray(vals, np.float32).reshape(-1)
        bad = np.flatnonzero(~np.isfinite(vals))
        if len(bad):
            i = int(bad[0])
            what = (
                f"the item {self._id('pool', rr[i])!r}"
                if s["kernel"] == "item"
                else f"the pair (row {self._id('pool', rr[i])!r}, col {self._id(col_side, cc[i])!r})"
            )
            raise TeacherError(
                f"teacher {self.fn.name} returned {len(bad)} non-finite values in a {s['kernel']} block, first "
                f"{vals[i]} for {what}; nothing of this block was written"
            )
        n = len(rr)
        return pa.table(
            {
                "kernel": pa.array(np.full(n, s["kernel"]), pa.string()),
                "quadrant": pa.array(np.full(n, s["quadrant"]), pa.string()),
                "row_id": self.cols["pool"]["ids"].take(pa.array(rr)),
                "col_id": pa.array(np.full(n, ""), pa.string())
                if s["kernel"] == "item"
                else self.cols[col_side]["ids"].take(pa.array(cc)),
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
        write_block(self.out_dir, spec["block_id"], table)
        return table.num_rows

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Label each block of the batch; a user-fixable error (a bad table, a non-finite teacher value) is
        returned in ``error`` rather than raised, so the driver reports it as one line
        (:func:`nncift.errors.raise_worker_errors`)."""
        return run_worker_batch(batch, self.run_block, "pairs")


def _arrow(x) -> pa.Array:
    """A string column as one Arrow array (a list, a chunked array or an array)."""
    if isinstance(x, pa.ChunkedArray):
        x = x.combine_chunks()
    return (x if isinstance(x, pa.Array) else pa.array(list(x), pa.string())).cast(pa.string())
