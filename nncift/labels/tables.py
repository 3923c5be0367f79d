"""The label table format: the teacher's labels of a stage (``kernel, quadrant, row_id, col_id, row, col,
value``) read back as kernels or scores, and exported as a table teacher (``example_id, target_id, value``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nncift.errors import NnciftError
from nncift.store import write_parquet

if TYPE_CHECKING:
    from nncift.stages.base import Context

LABELS = ("label", "labels.parquet")  # the label stage's gathered table, in the run directory


def block_path(block_dir: str | Path, block_id: int) -> Path:
    """The file of label block ``block_id`` in ``block_dir``."""
    return Path(block_dir) / f"{int(block_id):06d}.parquet"


def block_key(spec: dict) -> tuple[str, int]:
    """(file name, rows) of a label block spec, for :func:`nncift.store.todo_blocks`."""
    return block_path("", spec["block_id"]).name, spec["pairs"]


def write_block(block_dir: str | Path, block_id: int, table: pa.Table) -> None:
    """Land one finished label block (a :data:`LABEL_SCHEMA` table), atomically."""
    write_parquet(block_path(block_dir, block_id), table)


def write_labels(store, table: pa.Table) -> None:
    """Write the label stage's gathered table (``label/labels.parquet``)."""
    write_parquet(store.path(*LABELS), table)


def read_labels(store) -> pa.Table:
    """The label stage's gathered table (``label/labels.parquet``)."""
    return pq.read_table(store.path(*LABELS))


def split_labels(t: pa.Table, kind, exclude_self_pairs: bool) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Per kernel and quadrant (q1..q4, and "diag" / "probe" for K_FF): ((2, P) row/col indices, (P,) raw values).

    ``kind``: the teacher's :class:`~nncift.labels.kinds.TeacherKind` (its kernels). K_FF self pairs are dropped
    from q1..q4 when ``exclude_self_pairs``. Pointwise labels are kernel ``item``
    with quadrants q1 (training) and q2 (held out); their col index is 0.
    """
    kern = np.asarray(t.column("kernel").to_pylist())
    quad = np.asarray(t.column("quadrant").to_pylist())
    rows, cols = t.column("row").to_numpy(), t.column("col").to_numpy()
    vals = t.column("value").to_numpy()
    out: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    self_pair = (kern == "ff") & (rows == cols) & exclude_self_pairs
    for k in kind.kernels:
        for q in ("q1", "q2", "q3", "q4", "diag", "probe"):
            sel = (kern == k) & (quad == q) & (~self_pair if q != "diag" else True)
            out.setdefault(k, {})[q] = np.stack([rows[sel], cols[sel]]), vals[sel]
    return out


def _exact_table(ctx: Context, n_blocks: int | None = None):

    if n_blocks is None:
        n_blocks = int(ctx.store.done_info("exact")["blocks"])
    return gather_labels(ctx.path("exact", "blocks"), n_blocks)


def exact_kernels(ctx: Context, n_blocks: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The teacher's full K_FF (M, M) and K_FT (M, N) float32 from the exact stage's labels."""
    m, n = ctx.size()
    t = _exact_table(ctx, n_blocks)
    kern = np.asarray(t.column("kernel").to_pylist())
    r, col, v = t.column("row").to_numpy(), t.column("col").to_numpy(), t.column("value").to_numpy()
    k_ff = np.zeros((m, m), np.float32)
    k_ft = np.zeros((m, n), np.float32)
    ff = kern == "ff"
    k_ff[r[ff], col[ff]] = v[ff]
    k_ft[r[~ff], col[~ff]] = v[~ff]
    return k_ff, k_ft


def exact_scores(ctx: Context, n_blocks: int | None = None) -> np.ndarray:
    """(M,) float32 teacher score of every item of a pointwise run (the exact stage's labels)."""
    m, _ = ctx.size()
    t = _exact_table(ctx, n_blocks)
    out = np.full(m, np.nan, np.float32)
    out[t.column("row").to_numpy()] = t.column("value").to_numpy()
    return out


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


def gather_labels(block_dir: Path, n_blocks: int) -> pa.Table:
    """Concatenate the label blocks in block order, checking that all ``n_blocks`` are present."""
    paths = [block_dir / f"{i:06d}.parquet" for i in range(n_blocks)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise RuntimeError(f"{block_dir}: {len(missing)} label blocks missing (first: {missing[0]})")
    return pa.concat_tables([pq.read_table(p) for p in paths]) if paths else LABEL_SCHEMA.empty_table()


def export_table(ctx: Context, out: str | Path) -> dict:
    """Write the run's teacher labels as a table file (``example_id, target_id, value``) for
    ``label.function=table`` / ``fidelity.truth_table``, with its provenance in ``<out>.json``.

    Returns:
        the provenance dict (pairs, teacher, its settings, data config, label seconds).
    """
    from nncift.influence.table import write_table_file

    done = ctx.store.done_info("label")
    if done is None:
        raise NnciftError(f"{ctx.store.root}: the label stage is not finished; run `nncift label` first")
    if done.get("kind") == "pointwise":
        raise NnciftError(f"{ctx.store.root}: a pointwise teacher's labels are item scores, not a pair table")
    labels = read_labels(ctx.store)
    recorded = done["provenance"]  # the configuration the labels were computed with
    lab, data = recorded["label"], recorded["data"]
    m, n = ctx.size()
    prov = {
        "function": lab["function"],
        "label_config": lab,
        "teacher_config": _teacher_provenance(recorded, lab),
        "data_config": data,
        "data_overrides": {
            "seed": recorded["root"]["seed"],
            **{f"data.{k}": v for k, v in data.items() if v is not None},
        },
        "M": m,
        "N": n,
        "label_seconds": done.get("seconds"),
        "teacher_pairs_per_second": labels.num_rows / done["seconds"] if done.get("seconds") else None,
        "source_run": str(ctx.store.root),
    }
    if lab["function"] == "delift_icl":
        from nncift.influence import delift_icl as icl
        from nncift.lm.models import EMBEDDED_LM

        prov["template"] = {k: getattr(icl, k) for k in ("HEAD_NOICL", "HEAD_ICL", "SEP_ICL", "MID_ICL", "TAIL")}
        pkg = EMBEDDED_LM[2].split()[0]
        model = prov["teacher_config"].get("model")
        prov["model"] = model or f"embedded SmolLM2-135M-Instruct ({EMBEDDED_LM[1]} of {pkg})"
    pairs = write_table_file(out, labels, prov)
    return {"pairs": pairs, **prov}


def _teacher_provenance(recorded: dict, lab: dict) -> dict:
    """The teacher's settings a finished label stage recorded: its own section, or (runs from before teacher
    sections) the fields of that section that the label section then held."""
    import dataclasses

    from nncift.influence import teacher_class

    if lab["function"] in recorded:
        return recorded[lab["function"]]
    cls = teacher_class(lab["function"])
    names = {f.name for f in dataclasses.fields(cls.config)} if cls.config is not None else set()
    return {k: v for k, v in lab.items() if k in names}
