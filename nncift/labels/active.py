"""The second round of the ``active`` label design: label where the selection is decided.

Facility location reads the maximum of each row of K_FF (and FLMI the maxima of K_FT rows): an item is
covered by its best candidate. A surrogate fitted on the first (spread) round predicts, for every labeled row,
which labeled columns it ranks highest; those pairs are exactly the ones whose errors change the subset
(a falsely high "hub" column, a missed best candidate), so the second round labels the top predicted columns
of each labeled row that the first round did not label. Pure numpy over explicit index arrays.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute
import pyarrow.parquet as pq

from nncift.store import write_parquet
from nncift.surrogate.numba_kernels import TopK
from nncift.surrogate.predict import predict_factors

if TYPE_CHECKING:
    from nncift.stages.base import Context


def top_predicted_pairs(
    factors: dict,
    rows: np.ndarray,
    cols: np.ndarray,
    labeled: tuple[np.ndarray, np.ndarray],
    per_row: int,
    exclude_self: bool,
    row_chunk: int = 1024,
    col_chunk: int = 8192,
) -> tuple[np.ndarray, np.ndarray]:
    """For each row of ``rows``, the ``per_row`` columns of ``cols`` with the highest predicted score that are
    not labeled yet (and not the row itself when ``exclude_self``).

    Args:
        factors: the round-1 surrogate's factors over all items (:meth:`Surrogate.estimator` of every row
            and column item), indexed by item index.
        rows: (R,) int64 candidate rows (labeled items). cols: (C,) int64 candidate columns (labeled items).
        labeled: (row indices, col indices) of pairs already labeled, excluded from the result.
        per_row: pairs chosen per row.
        exclude_self: skip (i, i) pairs (K_FF).

    Returns:
        (rows (P,), cols (P,)) int64, sorted by column then row (pairs of one in-context example together).
    """
    rows, cols = np.asarray(rows, np.int64), np.asarray(cols, np.int64)
    ncol = int(max(cols.max(initial=0), np.max(labeled[1], initial=0))) + 1
    done = np.unique(np.asarray(labeled[0], np.int64) * ncol + np.asarray(labeled[1], np.int64))
    # room for every already-labeled column of a row plus the row itself, so per_row new ones survive
    per_row_done = np.bincount(np.asarray(labeled[0], np.int64), minlength=int(rows.max(initial=0)) + 1)
    k = min(len(cols), per_row + int(per_row_done[rows].max(initial=0)) + 1)
    sub = {n: (v[cols] if n == "q" else v) for n, v in factors.items()}
    out_r, out_c = [], []
    for r0 in range(0, len(rows), row_chunk):
        r = rows[r0 : r0 + row_chunk]
        head = dict(sub, p=factors["p"][r])
        tk = TopK(len(r), k)
        for c0 in range(0, len(cols), col_chunk):
            tk.update(predict_factors(head, 0, len(r), c0, min(len(cols), c0 + col_chunk)), c0)
        top_cols, _ = tk.result()  # (len(r), k) positions into ``cols``, best first
        cand_r = np.repeat(r, k)
        cand_c = cols[top_cols.reshape(-1)]
        ok = ~np.isin(cand_r * ncol + cand_c, done)
        if exclude_self:
            ok &= cand_r != cand_c
        cand_r, cand_c = cand_r[ok], cand_c[ok]
        # keep the first per_row of each row (candidates are in best-first order within a row)
        first = np.concatenate([[0], np.flatnonzero(np.diff(cand_r)) + 1]) if len(cand_r) else np.zeros(0, int)
        start = np.repeat(first, np.diff(np.concatenate([first, [len(cand_r)]])))
        rank = np.arange(len(cand_r)) - start
        keep = rank < per_row
        out_r.append(cand_r[keep])
        out_c.append(cand_c[keep])
    rr = np.concatenate(out_r) if out_r else np.zeros(0, np.int64)
    cc = np.concatenate(out_c) if out_c else np.zeros(0, np.int64)
    order = np.lexsort((rr, cc))
    return rr[order], cc[order]


def second_round(
    fit_cfg: dict,
    e_rows: np.ndarray,
    e_cols: np.ndarray,
    q1: tuple[np.ndarray, np.ndarray, np.ndarray],
    rows: np.ndarray,
    cols: np.ndarray,
    labeled: tuple[np.ndarray, np.ndarray],
    per_row: int,
    exclude_self: bool,
    val_fraction: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Fit a round-1 surrogate (the local fit loop) on ``q1`` and return the second round's pairs.

    Args:
        fit_cfg: :func:`nncift.surrogate.fitting.fit_loop` configuration (its ``seed`` seeds the split too).
        e_rows: (M, d) row embeddings; e_cols: (C, d) column embeddings.
        q1: round-1 training pairs (rows, cols, raw values), self pairs already removed.
        rows, cols: labeled items eligible as rows / columns.
        labeled: every pair labeled so far (rows, cols), never chosen again.
        per_row, exclude_self: see :func:`top_predicted_pairs`.

    Returns:
        (rows (P,), cols (P,)) int64.
    """
    import torch

    from nncift.surrogate.fitting import PairLabels, fit_loop, split_train_val
    from nncift.surrogate.network import Scaler, network_from_config

    r, c, y = q1
    scaler = Scaler.fit(y)
    labels = PairLabels(np.asarray(r), np.asarray(c), scaler.transform(y))
    tr, va = split_train_val(len(labels), val_fraction, fit_cfg.get("seed", 0))
    state, _ = fit_loop(fit_cfg, e_rows, e_cols, labels.take(tr), labels.take(va))
    net = network_from_config(fit_cfg, e_rows.shape[1])
    net.load_state_dict(state)
    net.eval()
    factors = net.estimator(torch.as_tensor(e_rows), torch.as_tensor(e_cols))
    return top_predicted_pairs(factors, rows, cols, labeled, per_row, exclude_self)


def active_round(ctx: Context, plan, labels: pa.Table) -> list:
    """Second round of ``label.design=active``: fit a surrogate on round 1 (the local fit loop, the run's fit
    configuration), then choose, for every labeled row, the ``partners - partners // 2`` labeled columns it
    predicts highest that round 1 did not label (:func:`nncift.labels.active.top_predicted_pairs`).

    The chosen pairs are saved in ``label/active_pairs.parquet`` before any is labeled, so a resumed run
    labels the same pairs. Returns paired :class:`~nncift.labels.plan.LabelSet` (quadrant q1), one per kernel.
    """
    from nncift.labels.plan import LabelSet
    from nncift.surrogate.fitting import fit_config

    path = ctx.path("label", "active_pairs.parquet")
    if path.is_file():
        t = pq.read_table(path)
        kern = np.asarray(t.column("kernel").to_pylist())
        rows, cols = t.column("row").to_numpy(), t.column("col").to_numpy()
        return [LabelSet(k, "q1", rows[kern == k], cols[kern == k], paired=True) for k in ("ff", "ft")]
    c = ctx.cfg.label
    per_row = c.partners - c.partners // 2
    e_pool, e_target = ctx.embeddings()
    lab = ctx.labels(labels)
    out, parts = [], []
    for kernel, e_cols, col_l in (("ff", e_pool, plan.pool_labeled), ("ft", e_target, plan.target_labeled)):
        rc, y_raw = lab[kernel]["q1"]
        every = labels.filter(pa.compute.equal(labels.column("kernel"), kernel))
        done = (every.column("row").to_numpy(), every.column("col").to_numpy())
        rows, cols = second_round(
            fit_config(ctx),
            e_pool,
            e_cols,
            (rc[0], rc[1], y_raw),
            plan.pool_labeled,
            col_l,
            done,
            per_row,
            kernel == "ff",
            ctx.cfg.fit.val_fraction,
        )
        out.append(LabelSet(kernel, "q1", rows, cols, paired=True))
        parts.append(pa.table({"kernel": [kernel] * len(rows), "row": rows, "col": cols}))
    write_parquet(path, pa.concat_tables(parts))
    return out
