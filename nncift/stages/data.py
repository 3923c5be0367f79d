"""Stage ``data``: read, validate, deduplicate and split the inputs into D_F, D_T and the test split.

Reads: ``data.input`` (and ``data.target`` / ``data.test`` when set), any supported format.
Writes: ``data/pool.parquet`` (M rows), ``data/target.parquet`` (N rows), ``data/test.parquet``; each with
``id``, ``prompt``, ``response`` and ``idx`` (the row's index in K_FF / K_FT).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from nncift import data as data_mod
from nncift.stages.base import Context, Stage
from nncift.store import write_parquet


class DataStage(Stage):
    name = "data"
    sections = ("", "data")
    writes = ("data/pool.parquet", "data/target.parquet", "data/test.parquet")

    def validate(self, ctx: Context, **params: Any) -> None:
        """Read and check every input before anything is written (a bad input leaves no run directory)."""
        self._tables = data_mod.load_pool_target(ctx.cfg.data, ctx.cfg.seed)

    def run(self, ctx: Context, **params: Any) -> dict[str, Any]:
        pool, target, test = self._tables
        del self._tables
        for name, t in (("pool", pool), ("target", target), ("test", test)):
            t = t.append_column("idx", pa.array(np.arange(t.num_rows, dtype=np.int64)))
            write_parquet(ctx.path("data", f"{name}.parquet"), t, row_group_size=1024)
        return {"M": pool.num_rows, "N": target.num_rows, "test": test.num_rows}
