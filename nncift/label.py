"""Seed labeling: the expensive influence function on planned pair blocks (callable-class worker)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nncift.influence import Items, build_influence_function
from nncift.pairs import LabelPlan, ranges
from nncift.store import write_parquet

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


def plan_blocks(plan: LabelPlan, block_size: int) -> list[dict]:
    """Tile every label rectangle of ``plan`` into blocks of at most block_size x block_size.

    Blocks are ordered column-block-major within a rectangle, so the blocks of one worker call share
    their in-context examples (what model-based functions reuse).
    """
    specs = []
    for set_id, s in enumerate(plan.sets):
        for c0, c1 in ranges(len(s.cols), block_size):
            for r0, r1 in ranges(len(s.rows), block_size):
                specs.append({"block_id": len(specs), "set_id": set_id, "r0": r0, "r1": r1, "c0": c0, "c1": c1})
    return specs


class LabelWorker:
    """Callable class: block specs -> Parquet label blocks (``<out_dir>/<block_id>.parquet``).

    Args:
        function: influence function name. function_kwargs: its constructor arguments.
        pool, target: dicts with ``ids``, ``prompts``, ``responses`` (lists) and ``embeddings`` (M|N, d).
        sets: the plan's rectangles as dicts (kernel, quadrant, rows, cols).
        out_dir: block folder.
    """

    def __init__(self, function: str, function_kwargs: dict, pool: dict, target: dict, sets: list[dict], out_dir: str):
        self.fn = build_influence_function(function, **function_kwargs)
        self.items = {
            "pool": Items(pool["prompts"], pool["responses"], np.asarray(pool["embeddings"], np.float32)),
            "target": Items(target["prompts"], target["responses"], np.asarray(target["embeddings"], np.float32)),
        }
        self.ids = {
            "pool": np.asarray(pool["ids"], dtype=object),
            "target": np.asarray(target["ids"], dtype=object),
        }
        self.sets = sets
        self.out_dir = Path(out_dir)

    def run_block(self, spec: dict) -> int:
        s = self.sets[spec["set_id"]]
        rows = np.asarray(s["rows"][spec["r0"] : spec["r1"]], dtype=np.int64)
        cols = np.asarray(s["cols"][spec["c0"] : spec["c1"]], dtype=np.int64)
        col_side = "pool" if s["kernel"] == "ff" else "target"
        vals = self.fn.kernel_block(s["kernel"], self.items["pool"].take(rows), self.items[col_side].take(cols))
        rr, cc = np.repeat(rows, len(cols)), np.tile(cols, len(rows))
        table = pa.table(
            {
                "kernel": pa.array([s["kernel"]] * len(rr), pa.string()),
                "quadrant": pa.array([s["quadrant"]] * len(rr), pa.string()),
                "row_id": pa.array(self.ids["pool"][rr].tolist(), pa.string()),
                "col_id": pa.array(self.ids[col_side][cc].tolist(), pa.string()),
                "row": pa.array(rr),
                "col": pa.array(cc),
                "value": pa.array(vals.reshape(-1).astype(np.float32)),
            },
            schema=LABEL_SCHEMA,
        )
        write_parquet(self.out_dir / f"{int(spec['block_id']):06d}.parquet", table)
        return len(rr)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = [self.run_block({k: int(v[i]) for k, v in batch.items()}) for i in range(len(batch["block_id"]))]
        return {"block_id": np.asarray(batch["block_id"]), "pairs": np.asarray(n, dtype=np.int64)}


def gather_labels(block_dir: Path, n_blocks: int) -> pa.Table:
    """Concatenate the label blocks in block order, checking that all ``n_blocks`` are present."""
    paths = [block_dir / f"{i:06d}.parquet" for i in range(n_blocks)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise RuntimeError(f"{block_dir}: {len(missing)} label blocks missing (first: {missing[0]})")
    return pa.concat_tables([pq.read_table(p) for p in paths]) if paths else LABEL_SCHEMA.empty_table()
