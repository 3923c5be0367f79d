"""Stage ``fit``: fit the surrogate of the teacher on the Q1 labels, one network per kernel (K_FF, K_FT), or
one pointwise network for a pointwise teacher; Ray Train (DDP) or the local loop, the same global batches.

Reads: ``embed/embeddings.safetensors``, ``label/labels.parquet``.
Writes: ``fit/network_<ff|ft|item>.{safetensors,json}`` (weights; kind, shape, label scaler, history),
``fit/metrics.json`` (per-quadrant fidelity of held-out labels), ``fit/eval_predictions.parquet``.
"""

from __future__ import annotations

import logging
import shutil
from typing import Any

import numpy as np
import pyarrow as pa

from nncift.errors import NnciftError
from nncift.stages.base import Context, Stage
from nncift.store import write_json, write_parquet
from nncift.surrogate.fitting import fit_config

log = logging.getLogger(__name__)


def kernels(ctx: Context) -> tuple[tuple[str, np.ndarray], ...]:
    """(name, column embeddings) of each surrogate: K_FF and K_FT, or the one pointwise ``item`` network
    (a single zero column: its labels are (item, 0) pairs)."""
    e_pool, e_target = ctx.embeddings()
    cols = {"ff": e_pool, "ft": e_target, "item": np.zeros((1, e_pool.shape[1]), np.float32)}
    return tuple((k, cols[k]) for k in ctx.kind().kernels)


class FitStage(Stage):
    name = "fit"
    sections = ("fit",)
    after = ("label",)
    reads = ("embed/embeddings.safetensors", "label/labels.parquet")
    writes = ("fit/network_ff.safetensors", "fit/network_ft.safetensors", "fit/metrics.json")

    def run(self, ctx: Context, **params: Any) -> dict[str, Any]:
        import torch

        from nncift.surrogate.fitting import PairLabels, predict_pairs, split_train_val
        from nncift.surrogate.metrics import quadrant_report
        from nncift.surrogate.network import Scaler, network_from_config

        c = ctx.cfg.fit
        e_pool, _ = ctx.embeddings()
        labels = ctx.labels()
        cfg = fit_config(ctx)
        tasks, scalers, q1s, splits = {}, {}, {}, {}
        for kernel, e_cols in kernels(ctx):
            rc, y_raw = labels[kernel]["q1"]
            if len(y_raw) == 0:
                raise NnciftError(f"label stage produced no training labels for {kernel!r}")
            scalers[kernel] = Scaler.fit(y_raw)
            q1s[kernel] = q1 = PairLabels(rc[0], rc[1], scalers[kernel].transform(y_raw))
            splits[kernel] = tr_idx, va_idx = split_train_val(len(q1), c.val_fraction, c.seed)
            log.info("fit %s (%s): %d train / %d val labels", kernel, cfg["kind"], len(tr_idx), len(va_idx))
            tasks[kernel] = (e_cols, q1.take(tr_idx), q1.take(va_idx))
        # fit.device is the local executor's (the Ray executor's Train workers take GPUs by fit.use_gpu)
        local = {"device": c.device} if ctx.executor.name == "local" else {}
        fitted = ctx.executor.train(
            "surrogate",
            cfg,
            e_pool,
            tasks,
            num_workers=c.num_workers,
            use_gpu=c.use_gpu,
            storage=ctx.path("fit", "ray_train"),
            name="fit",
            **local,
        )
        metrics, preds = {}, []
        for kernel, e_cols in kernels(ctx):
            state, history = fitted[kernel]
            scaler, q1, (tr_idx, va_idx) = scalers[kernel], q1s[kernel], splits[kernel]
            net = network_from_config(cfg, e_pool.shape[1])
            net.load_state_dict(state)
            net.eval()
            er, ec = torch.as_tensor(e_pool), torch.as_tensor(e_cols)
            train_mean = float(q1.take(tr_idx).y.mean())
            kernel_metrics = {}
            for q in ("q1", "q2", "q3", "q4"):
                rcq, yq = labels[kernel][q]
                if len(yq) == 0:
                    continue
                pq_ = PairLabels(rcq[0], rcq[1], scaler.transform(yq))
                pred = predict_pairs(net, er, ec, pq_)
                kernel_metrics[q] = quadrant_report(
                    pred, pq_.y, train_mean, seed=c.seed, rows=pq_.rows, cols=pq_.cols, k=ctx.cfg.fidelity.topk
                )
                preds.append(
                    pa.table(
                        {
                            "kernel": [kernel] * len(pred),
                            "quadrant": [q] * len(pred),
                            "row": pq_.rows,
                            "col": pq_.cols,
                            "true": pq_.y,
                            "pred": pred,
                        }
                    )
                )
            metrics[kernel] = {
                "quadrants": kernel_metrics,
                "history": history,
                "scaler": scaler.__dict__,
                "train_pairs": len(tr_idx),
                "val_pairs": len(va_idx),
            }
            net.save(ctx.path("fit", f"network_{kernel}"), scaler, extra={"kernel": kernel, "history": history})
        if preds:
            write_parquet(ctx.path("fit", "eval_predictions.parquet"), pa.concat_tables(preds))
        from nncift.store import clean_json

        write_json(ctx.path("fit", "metrics.json"), clean_json(metrics))
        shutil.rmtree(ctx.path("fit", "ray_train"), ignore_errors=True)
        n_params = network_from_config(cfg, e_pool.shape[1]).num_parameters()
        return {"parameters_per_network": n_params, "kind": cfg["kind"], "symmetric": cfg["symmetric"]}
