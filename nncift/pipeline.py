"""The NN-CIFT pipeline: data -> embed -> label -> fit -> estimate -> select -> report.

Each stage reads its inputs from the run directory, writes its artifacts atomically, and ends with a
completion marker that carries the fingerprint of the configuration it depends on (its own section and
every upstream one). A rerun skips finished stages (and finished blocks of unfinished ones); a changed
configuration of a finished stage is refused unless ``overwrite``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.compute
import pyarrow.parquet as pq

from nncift import data as data_mod
from nncift.config import RunConfig
from nncift.errors import DataError, NncifError, RunDirBusyError
from nncift.store import (
    STAGES,
    RunDir,
    done_blocks,
    read_safetensors,
    run_lock,
    write_json,
    write_parquet,
    write_safetensors,
    write_text,
)

log = logging.getLogger(__name__)

# config sections each stage depends on, cumulatively ("" = root fields such as the seed)
_SECTIONS = {
    "data": ("", "data"),
    "embed": ("embed",),
    "label": ("label",),
    "fit": ("network",),
    "estimate": ("estimate",),
    "select": ("select",),
    "report": ("fidelity",),
}


def stage_sections(stage: str) -> tuple[str, ...]:
    out: tuple[str, ...] = ()
    for s in STAGES[: STAGES.index(stage) + 1]:
        out += _SECTIONS[s]
    return out


class Pipeline:
    """Runs the stages of one run directory.

    Args:
        cfg: validated configuration.
        run_dir: the run directory.
        overwrite: recompute finished stages whose configuration changed (and all later stages).
    """

    def __init__(self, cfg: RunConfig, run_dir: str | Path, overwrite: bool = False):
        self.cfg = cfg
        self.store = RunDir(run_dir)
        self.overwrite = overwrite
        self._ray_ready = False

    # ------------------------------------------------------------------ driver
    def run(self, until: str = "report") -> dict:
        """Run every stage up to ``until`` (inclusive); returns {stage: seconds or 'skipped'}."""
        if until not in STAGES:
            raise ValueError(f"unknown stage {until!r} (stages: {', '.join(STAGES)})")
        if self.store.root.exists() and not self.store.root.is_dir():
            raise DataError(f"--run-dir {self.store.root}: exists and is not a directory")
        fresh = not self.store.root.exists()
        done: dict[str, object] = {}
        try:
            with run_lock(self.store.root):
                for stage in STAGES[: STAGES.index(until) + 1]:
                    done[stage] = self._run_stage(stage)
                    if stage == "data":
                        write_text(self.store.root / "config.yaml", self.cfg.to_yaml())
        except RunDirBusyError:
            raise
        except NncifError:
            if fresh and self.store.root.exists() and not self.store.has_finished_stage():
                shutil.rmtree(self.store.root)  # bad input: leave nothing half-written behind
            raise
        return done

    def _run_stage(self, stage: str) -> object:
        sections = stage_sections(stage)
        fp = self.cfg.fingerprint(*sections)
        prov = self.cfg.provenance(*sections)
        if stage == "data":  # validate the inputs before anything is written
            if not self._needs(stage, fp, prov):
                log.info("stage %-8s already done, skipping", stage)
                return "skipped"
            tables = data_mod.load_pool_target(self.cfg.data, self.cfg.seed)
            compute: Callable[[], dict] = lambda: self.stage_data(*tables)  # noqa: E731
        else:
            compute = getattr(self, f"stage_{stage}")
        if not self.store.begin(stage, fp, prov, overwrite=self.overwrite):
            log.info("stage %-8s already done, skipping", stage)
            return "skipped"
        log.info("stage %-8s running", stage)
        t0 = time.perf_counter()
        info = compute() or {}
        seconds = time.perf_counter() - t0
        self.store.finish(stage, fp, prov, seconds=seconds, **info)
        log.info("stage %-8s done in %.1f s", stage, seconds)
        return seconds

    def _needs(self, stage: str, fp: str, prov: dict) -> bool:
        done = self.store.done_info(stage)
        if done is not None and done.get("fingerprint") == fp:
            return False
        if done is not None and not self.overwrite:
            self.store.begin(stage, fp, prov, overwrite=False)  # raises ProvenanceError with the diff
        return True

    def _ray(self) -> bool:
        if self.cfg.ray.executor != "ray":
            return False
        if not self._ray_ready:
            from nncift.distributed import init_ray

            init_ray(self.cfg.ray)
            self._ray_ready = True
        return True

    # ------------------------------------------------------------------ helpers
    def tables(self) -> tuple[pa.Table, pa.Table]:
        return (
            pq.read_table(self.store.path("data", "pool.parquet")),
            pq.read_table(self.store.path("data", "target.parquet")),
        )

    def embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        """(pool (M, d), target (N, d)) float32, checked: readable, finite, one dimension."""
        path = self.store.path("embed", "embeddings.safetensors")
        try:
            t = read_safetensors(path)
            pool, target = t["pool"], t["target"]
        except Exception as exc:  # safetensors raises several types for a damaged file
            raise DataError(f"{path}: unreadable ({type(exc).__name__}); delete {path.parent} to re-embed") from None
        for name, e in (("pool", pool), ("target", target)):
            bad = ~np.isfinite(e)
            if bad.any():
                raise DataError(
                    f"{path}: '{name}' has {int(bad.sum())} non-finite values (row {int(np.argwhere(bad)[0][0])}); "
                    f"delete {path.parent} to re-embed"
                )
        if pool.ndim != 2 or target.ndim != 2 or pool.shape[1] != target.shape[1]:
            raise DataError(f"{path}: pool {pool.shape} and target {target.shape} embeddings differ in dimension")
        return pool, target

    # ------------------------------------------------------------------ stages
    def stage_data(self, pool: pa.Table, target: pa.Table, test: pa.Table) -> dict:
        for name, t in (("pool", pool), ("target", target), ("test", test)):  # idx = row in K_FF / K_FT
            t = t.append_column("idx", pa.array(np.arange(t.num_rows, dtype=np.int64)))
            write_parquet(self.store.path("data", f"{name}.parquet"), t, row_group_size=1024)
        return {"M": pool.num_rows, "N": target.num_rows, "test": test.num_rows}

    def stage_embed(self) -> dict:
        from nncift.models import resolve_embedding_model

        c = self.cfg.embed
        kwargs = {
            "model_path": str(resolve_embedding_model(c.model)),
            "device": c.device,
            "batch_size": c.batch_size,
            "max_seq_length": c.max_seq_length,
            "template": c.template,
        }
        sources = {side: str(self.store.path("data", f"{side}.parquet")) for side in ("pool", "target")}
        if self._ray():
            from nncift.distributed import embed_ray

            emb = embed_ray(
                sources,
                self.store.path("embed", "parts"),
                kwargs,
                c.batch_size,
                concurrency=c.concurrency,
                num_cpus=c.num_cpus,
                num_gpus=c.num_gpus,
            )
        else:
            from tqdm.auto import tqdm

            from nncift.embed import Embedder

            enc = Embedder(**kwargs)
            emb = {}
            for side, path in sources.items():
                pf = pq.ParquetFile(path)
                parts = [
                    enc.encode(data_mod.texts(pa.Table.from_batches([b]), c.template))
                    for b in tqdm(
                        pf.iter_batches(batch_size=c.batch_size * 8, columns=["prompt", "response"]),
                        desc=f"embed {side}",
                    )
                ]
                emb[side] = np.concatenate(parts)
        write_safetensors(
            self.store.path("embed", "embeddings.safetensors"),
            {"pool": emb["pool"], "target": emb["target"]},
            metadata={"model": kwargs["model_path"]},
        )
        shutil.rmtree(self.store.path("embed", "parts"), ignore_errors=True)
        return {"dim": int(emb["pool"].shape[1]), "texts": len(emb["pool"]) + len(emb["target"])}

    def stage_label(self) -> dict:
        from nncift.label import gather_labels, plan_blocks
        from nncift.pairs import plan_labels

        c = self.cfg.label
        pool, target = self.tables()
        m, n = pool.num_rows, target.num_rows
        plan = plan_labels(
            m, n, c.fraction, c.min_count, c.eval_pairs, self.cfg.seed,
            design=c.design, partners=c.partners, diagonal=c.diagonal,
        )  # fmt: skip
        write_json(
            self.store.path("label", "plan.json"),
            {
                "design": plan.design,
                "pool_labeled": plan.pool_labeled,
                "target_labeled": plan.target_labeled,
                "sets": plan.summary(),
            },
        )
        side = self.label_block_side()
        specs = plan_blocks(plan, side)
        block_dir = self.store.path("label", "blocks")
        ok = done_blocks(block_dir, {f"{s['block_id']:06d}.parquet": s["pairs"] for s in specs})
        todo = [s for s in specs if f"{s['block_id']:06d}.parquet" not in ok]
        log.info(
            "label (%s design): %d blocks (%d already done), %d train + %d eval + %d diagonal pairs",
            plan.design,
            len(specs),
            len(specs) - len(todo),
            plan.train_pairs,
            plan.eval_pairs,
            plan.diag_pairs,
        )

        self.run_label_blocks(plan.sets, specs, todo, block_dir, desc="label")
        labels = gather_labels(block_dir, len(specs))
        if plan.design == "active":
            second = self._active_round(plan, labels)
            plan.sets += second
            specs2 = plan_blocks(SimpleNamespace(sets=second), side)
            block_dir2 = self.store.path("label", "blocks_active")
            ok2 = done_blocks(block_dir2, {f"{s['block_id']:06d}.parquet": s["pairs"] for s in specs2})
            todo2 = [s for s in specs2 if f"{s['block_id']:06d}.parquet" not in ok2]
            log.info("label (active round 2): %d pairs in %d blocks", sum(s.num_pairs for s in second), len(specs2))
            self.run_label_blocks(second, specs2, todo2, block_dir2, desc="label (active)")
            labels = pa.concat_tables([labels, gather_labels(block_dir2, len(specs2))])
        write_parquet(self.store.path("label", "labels.parquet"), labels)
        return {
            "function": c.function,
            "design": plan.design,
            "pairs_labeled": int(labels.num_rows),
            "train_pairs": plan.train_pairs,
            "eval_pairs": plan.eval_pairs,
            "diag_pairs": plan.diag_pairs,
            "total_pairs": m * m + m * n,
            "labeled_pool": len(plan.pool_labeled),
            "labeled_target": len(plan.target_labeled),
        }

    def label_block_side(self) -> int:
        """Label blocks sized by cost: ``label.block_seconds`` at the teacher's pairs/s, capped by ``block_size``."""
        from nncift.influence import function_traits
        from nncift.label import block_side

        c = self.cfg.label
        pps = c.pairs_per_second or function_traits(c.function)["pairs_per_second"]
        return block_side(c.block_size, c.block_seconds, pps)

    def _active_round(self, plan, labels: pa.Table) -> list:
        """Second round of ``label.design=active``: fit a surrogate on round 1 (the local fit loop, this stage's
        fit configuration), then choose, for every labeled row, the ``partners - partners // 2`` labeled
        columns it predicts highest that round 1 did not label (:func:`nncift.active.top_predicted_pairs`).

        The chosen pairs are saved in ``label/active_pairs.parquet`` before any is labeled, so a resumed run
        labels the same pairs. Returns paired :class:`~nncift.pairs.LabelSet` (quadrant q1), one per kernel.
        """
        from nncift.active import second_round
        from nncift.pairs import LabelSet

        path = self.store.path("label", "active_pairs.parquet")
        if path.is_file():
            t = pq.read_table(path)
            kern = np.asarray(t.column("kernel").to_pylist())
            rows, cols = t.column("row").to_numpy(), t.column("col").to_numpy()
            return [LabelSet(k, "q1", rows[kern == k], cols[kern == k], paired=True) for k in ("ff", "ft")]
        c = self.cfg.label
        per_row = c.partners - c.partners // 2
        e_pool, e_target = self.embeddings()
        lab = self._labels(labels)
        out, parts = [], []
        for kernel, e_cols, col_l in (("ff", e_pool, plan.pool_labeled), ("ft", e_target, plan.target_labeled)):
            rc, y_raw = lab[kernel]["q1"]
            every = labels.filter(pa.compute.equal(labels.column("kernel"), kernel))
            done = (every.column("row").to_numpy(), every.column("col").to_numpy())
            rows, cols = second_round(
                self.fit_config(), e_pool, e_cols, (rc[0], rc[1], y_raw), plan.pool_labeled, col_l, done,
                per_row, kernel == "ff", self.cfg.network.val_fraction,
            )  # fmt: skip
            out.append(LabelSet(kernel, "q1", rows, cols, paired=True))
            parts.append(pa.table({"kernel": [kernel] * len(rows), "row": rows, "col": cols}))
        write_parquet(path, pa.concat_tables(parts))
        return out

    def run_label_blocks(self, sets: list, specs: list[dict], todo: list[dict], block_dir: Path, desc: str) -> None:
        """Label the ``todo`` blocks of ``sets`` (LabelSet-like rectangles) with the configured function,
        over Ray Data actors or in a local loop; each block lands in ``block_dir`` as one Parquet file."""
        from nncift.distributed import map_blocks
        from nncift.label import LabelWorker

        c = self.cfg.label
        pool, target = self.tables()
        e_pool, e_target = self.embeddings()

        def side(t: pa.Table, e: np.ndarray) -> dict:
            cols = {k: t.column(k).to_pylist() for k in ("id", "prompt", "response")}
            return {"ids": cols["id"], "prompts": cols["prompt"], "responses": cols["response"], "embeddings": e}

        kwargs = {
            "function": c.function,
            "function_kwargs": self._function_kwargs(),
            "pool": side(pool, e_pool),
            "target": side(target, e_target),
            "sets": [s.to_dict() for s in sets],
            "out_dir": str(block_dir),
        }
        executor = "ray" if self._ray() else "local"
        map_blocks(executor, LabelWorker, kwargs, todo, desc=desc, concurrency=c.concurrency,
                   num_cpus=c.num_cpus, num_gpus=c.num_gpus)  # fmt: skip

    def _function_kwargs(self) -> dict:
        """Constructor arguments of the configured influence function (resolved once, in the driver)."""
        c = self.cfg.label
        if c.function == "table":
            return {"table": str(Path(c.table).resolve())}
        if c.function != "delift_icl":
            return {}
        from nncift.models import check_model_dir, embedded_lm_dir

        if c.model is not None:
            check_model_dir(c.model, "label.model")

        return {
            "model": str(embedded_lm_dir()) if c.model is None else c.model,
            "backend": c.backend,
            "device": c.device,
            "dtype": c.dtype,
            "batch_size": c.batch_size,
            "max_prompt_tokens": c.max_prompt_tokens,
            "max_response_tokens": c.max_response_tokens,
            "mode": c.mode,
            "trust_remote_code": c.trust_remote_code,
        }

    def _labels(self, table: pa.Table | None = None) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
        """Per kernel and quadrant (q1..q4, and "diag" for K_FF): ((2, P) row/col indices, (P,) raw values).

        K_FF self pairs are dropped from q1..q4 when ``network.exclude_self_pairs``.
        """
        t = pq.read_table(self.store.path("label", "labels.parquet")) if table is None else table
        kern = np.asarray(t.column("kernel").to_pylist())
        quad = np.asarray(t.column("quadrant").to_pylist())
        rows, cols = t.column("row").to_numpy(), t.column("col").to_numpy()
        vals = t.column("value").to_numpy()
        out: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
        self_pair = (kern == "ff") & (rows == cols) & self.cfg.network.exclude_self_pairs
        for k in ("ff", "ft"):
            for q in ("q1", "q2", "q3", "q4", "diag"):
                sel = (kern == k) & (quad == q) & (~self_pair if q != "diag" else True)
                out.setdefault(k, {})[q] = np.stack([rows[sel], cols[sel]]), vals[sel]
        return out

    def symmetric(self) -> bool:
        """Whether the surrogate shares one tower (``network.symmetric``; auto = the teacher's own trait)."""
        from nncift.influence import function_traits

        c = self.cfg.network
        if c.symmetric != "auto":
            return c.symmetric == "true"
        return function_traits(self.cfg.label.function)["symmetric"]

    def fit_config(self) -> dict:
        """The surrogate's fit configuration (:func:`nncift.train.fit_loop`)."""
        c = self.cfg.network
        return {
            "kind": c.kind,
            "hidden": c.hidden,
            "rank": c.rank,
            "symmetric": self.symmetric(),
            "cosine_prior": c.cosine_prior,
            "lr": c.lr,
            "weight_decay": c.weight_decay,
            "epochs": c.epochs,
            "batch_size": c.batch_size,
            "patience": c.patience,
            "seed": c.seed,
        }

    def stage_fit(self) -> dict:
        from nncift.distributed import run_fit
        from nncift.metrics import quadrant_report
        from nncift.network import Scaler, network_from_config
        from nncift.train import PairLabels, predict_pairs, split_train_val

        c = self.cfg.network
        e_pool, e_target = self.embeddings()
        labels = self._labels()
        fit_cfg = self.fit_config()
        executor = "ray" if self._ray() else "local"
        metrics, preds = {}, []
        import torch

        tasks, scalers, q1s, splits = {}, {}, {}, {}
        for kernel, e_cols in (("ff", e_pool), ("ft", e_target)):
            rc, y_raw = labels[kernel]["q1"]
            if len(y_raw) == 0:
                raise NncifError(f"label stage produced no training pairs for K_{kernel.upper()}")
            scalers[kernel] = Scaler.fit(y_raw)
            q1s[kernel] = q1 = PairLabels(rc[0], rc[1], scalers[kernel].transform(y_raw))
            splits[kernel] = tr_idx, va_idx = split_train_val(len(q1), c.val_fraction, c.seed)
            log.info("fit %s (%s): %d train / %d val pairs", kernel, c.kind, len(tr_idx), len(va_idx))
            tasks[kernel] = (e_cols, q1.take(tr_idx), q1.take(va_idx))
        fitted = run_fit(
            executor,
            fit_cfg,
            e_pool,
            tasks,
            num_workers=c.num_workers,
            use_gpu=c.use_gpu,
            storage=self.store.path("fit", "ray_train"),
            name="fit",
        )
        for kernel, e_cols in (("ff", e_pool), ("ft", e_target)):
            state, history = fitted[kernel]
            scaler, q1, (tr_idx, va_idx) = scalers[kernel], q1s[kernel], splits[kernel]
            net = network_from_config(fit_cfg, e_pool.shape[1])
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
                    pred, pq_.y, train_mean, seed=c.seed, rows=pq_.rows, cols=pq_.cols, k=self.cfg.fidelity.topk
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
            net.save(
                self.store.path("fit", f"network_{kernel}"),
                scaler,
                extra={"kernel": kernel, "history": history},
            )
        if preds:
            write_parquet(self.store.path("fit", "eval_predictions.parquet"), pa.concat_tables(preds))
        write_json(self.store.path("fit", "metrics.json"), _clean(metrics))
        shutil.rmtree(self.store.path("fit", "ray_train"), ignore_errors=True)
        n_params = network_from_config(fit_cfg, e_pool.shape[1]).num_parameters()
        return {"parameters_per_network": n_params, "kind": c.kind, "symmetric": fit_cfg["symmetric"]}

    def diagonal(self) -> np.ndarray | None:
        """(M,) float32 exact K_FF self-utilities from the label stage (``label.diagonal``), else None."""
        if not self.cfg.label.diagonal:
            return None
        (rc, vals) = self._labels()["ff"]["diag"]
        m = self.store.done_info("data")["M"]
        diag = np.full(m, np.nan, np.float32)
        diag[rc[0]] = vals
        if np.isnan(diag).any():
            raise RuntimeError(f"label stage has {int(np.isnan(diag).sum())} pool items without a diagonal label")
        return diag

    def estimator_heads(self) -> dict[str, dict]:
        """Per kernel, the fitted surrogate's factors + label scaler (+ the exact diagonal of K_FF)."""
        import torch

        from nncift.network import load_network

        e_pool, e_target = self.embeddings()
        diag = self.diagonal()
        heads = {}
        for kernel, e_cols in (("ff", e_pool), ("ft", e_target)):
            net, scaler, _ = load_network(self.store.path("fit", f"network_{kernel}"))
            head = net.estimator(torch.as_tensor(e_pool), torch.as_tensor(e_cols))
            head.update(lo=scaler.lo, hi=scaler.hi, diag=diag if kernel == "ff" else None)
            heads[kernel] = head
        return heads

    def stage_estimate(self) -> dict:
        from nncift.distributed import map_blocks
        from nncift.estimate import EstimateWorker
        from nncift.pairs import block_grid

        c = self.cfg.estimate
        m, n = self.store.done_info("data")["M"], self.store.done_info("data")["N"]
        layout = self.layout()
        heads = self.estimator_heads()
        # dense: tiles; sparse: row stripes spanning every column, each reduced to its own top-k (no merge
        # across workers)
        sparse = layout == "sparse"
        blocks = block_grid("ff", m, m, c.block_size, col_size=m if sparse else None)
        blocks += block_grid("ft", m, n, c.block_size, start_id=len(blocks), col_size=n if sparse else None)
        block_dir = self.store.path("estimate", "blocks")
        ok = done_blocks(block_dir, {f"{b.name}.parquet": b.r1 - b.r0 for b in blocks})
        todo = [b.to_dict() for b in blocks if f"{b.name}.parquet" not in ok]
        log.info(
            "estimate: %d blocks (%d already done), %d pairs",
            len(blocks),
            len(blocks) - len(todo),
            m * m + m * n,
        )
        executor = "ray" if self._ray() else "local"
        t0 = time.perf_counter()
        map_blocks(
            executor,
            EstimateWorker,
            {
                "heads": heads,
                "out_dir": str(block_dir),
                "device": c.device,
                "layout": layout,
                "topk": c.topk,
                "col_chunk": c.col_chunk,
            },
            todo,
            desc="estimate",
            concurrency=c.concurrency,
            num_cpus=c.num_cpus,
            num_gpus=c.num_gpus,
        )
        dt = time.perf_counter() - t0
        write_json(
            self.store.path("estimate", "kernels.json"),
            {"ff": {"shape": [m, m]}, "ft": {"shape": [m, n]}, "layout": layout, "topk": c.topk, "blocks": len(blocks)},
        )
        return {
            "pairs": m * m + m * n,
            "blocks": len(blocks),
            "map_seconds": dt,
            "layout": layout,
            "pairs_per_second": (m * m + m * n) / max(dt, 1e-9),
        }

    def layout(self) -> str:
        """dense or sparse, from estimate.layout (auto: dense while M*M <= estimate.dense_max_pairs)."""
        c = self.cfg.estimate
        if c.layout != "auto":
            return c.layout
        m = self.store.done_info("data")["M"]
        return "dense" if m * m <= c.dense_max_pairs else "sparse"

    def kernels(self) -> tuple[np.ndarray, np.ndarray]:
        """The dense estimated kernels (K_FF (M, M), K_FT (M, N)) of a dense-layout run."""
        from nncift.estimate import assemble_dense

        meta = json.loads(self.store.path("estimate", "kernels.json").read_text())
        block_dir = self.store.path("estimate", "blocks")
        return (
            assemble_dense(block_dir, "ff", tuple(meta["ff"]["shape"])),
            assemble_dense(block_dir, "ft", tuple(meta["ft"]["shape"])),
        )

    def _select_dense(self, budget: int) -> tuple[np.ndarray, np.ndarray, float]:
        from nncift.select import greedy_select, minmax_scale, objective_value

        c = self.cfg.select
        if c.algorithm != "lazy":
            raise NotImplementedError(
                f"select.algorithm={c.algorithm} runs on the sparse layout: set estimate.layout=sparse"
            )
        k_ff, k_ft = self.kernels()
        idx, gains = greedy_select(k_ff, budget, objective=c.objective, k_ft=k_ft, eta=c.eta, nu=c.nu)
        value = objective_value(minmax_scale(k_ff), idx, c.objective, minmax_scale(k_ft), c.eta, c.nu)
        return idx, gains, value

    def _select_sparse(self, budget: int) -> tuple[np.ndarray, np.ndarray, float]:
        """Selection on the per-row top-k kernels; nothing of size M x M or M x N is allocated."""
        from nncift.estimate import read_row_means, read_sparse, sparse_extent
        from nncift.select_sparse import (
            SparseKernel,
            greedi_local_round,
            greedi_merge,
            partition_items,
            sparse_lazy_greedy,
            sparse_objective,
            stochastic_greedy,
        )

        c = self.cfg.select
        block_dir = self.store.path("estimate", "blocks")
        m = self.store.done_info("data")["M"]
        ff_cols, ff_vals = read_sparse(block_dir, "ff", m)
        _, ft_vals = read_sparse(block_dir, "ft", m)
        ff_lo, ff_hi = sparse_extent(block_dir, "ff")  # the dense layout's scaling, not the kept values' own
        if c.objective == "topk":  # each K_FT row's mean over every target (recorded by the estimate stage)
            lo, hi = sparse_extent(block_dir, "ft")
            score = (read_row_means(block_dir, "ft", m) - lo) / (hi - lo) if hi > lo else np.zeros(m)
            order = np.lexsort((np.arange(m), -score))[:budget]
            return order.astype(np.int64), score[order], float(score[order].sum())
        kern = SparseKernel.from_topk(ff_cols, ff_vals, m).scaled(ff_lo, ff_hi)
        floor = None
        if c.objective in ("flmi", "flcg"):
            lo, hi = sparse_extent(block_dir, "ft")
            row_max = (ft_vals.max(axis=1) - lo) / (hi - lo) if hi > lo else np.zeros(m, np.float32)
            if c.objective == "flmi":
                kern = kern.capped((c.eta * row_max).astype(np.float32))
            else:
                floor = (c.nu * row_max).astype(np.float32)
        if c.algorithm == "lazy":
            idx, gains = sparse_lazy_greedy(kern, budget, floor)
        elif c.algorithm == "stochastic":
            idx, gains = stochastic_greedy(kern, budget, c.eps, self.cfg.seed, floor)
        else:
            if floor is not None:
                raise NotImplementedError("select.algorithm=greedi supports fl and flmi (not flcg)")
            parts = partition_items(m, c.parts, self.cfg.seed)
            if self._ray():
                from nncift.distributed import greedi_ray

                idx, gains = greedi_ray(kern, parts, budget)
            else:
                idx, gains = greedi_merge(kern, [greedi_local_round(kern, p, budget) for p in parts], budget)
        return idx, gains, sparse_objective(kern, idx, floor)

    def stage_select(self) -> dict:
        c = self.cfg.select
        pool, _ = self.tables()
        m = pool.num_rows
        budget = max(1, int(c.fraction * m))
        layout = json.loads(self.store.path("estimate", "kernels.json").read_text())["layout"]
        idx, gains, value = self._select_dense(budget) if layout == "dense" else self._select_sparse(budget)
        ids = pool.column("id").to_pylist()
        write_parquet(
            self.store.path("select", "selection.parquet"),
            pa.table(
                {
                    "id": [ids[i] for i in idx],
                    "rank": np.arange(len(idx), dtype=np.int64),
                    "gain": gains.astype(np.float64),
                    "index": idx,
                }
            ),
            metadata={"objective": c.objective, "budget": budget, "value": value, "layout": layout},
        )
        chosen = pool.take(pa.array(idx))
        lines = [json.dumps(r, ensure_ascii=False) for r in chosen.to_pylist()]
        write_text(self.store.path("select", "selected.jsonl"), "\n".join(lines) + "\n")
        return {"objective": c.objective, "budget": budget, "value": value, "layout": layout, "algorithm": c.algorithm}

    def export_table(self, out: str | Path) -> dict:
        """Write the run's teacher labels as a table file (``example_id, target_id, value``) for
        ``label.function=table`` / ``fidelity.truth_table``, with its provenance in ``<out>.json``.

        Returns:
            the provenance dict (pairs, teacher, its settings, data config, label seconds).
        """
        from nncift.influence.table import labels_to_table

        done = self.store.done_info("label")
        if done is None:
            raise NncifError(f"{self.store.root}: the label stage is not finished; run `nncift label` first")
        labels = pq.read_table(self.store.path("label", "labels.parquet"))
        table = labels_to_table(labels)
        out = Path(out)
        recorded = done["provenance"]  # the configuration the labels were computed with
        lab, data = recorded["label"], recorded["data"]
        prov = {
            "pairs": table.num_rows,
            "function": lab["function"],
            "label_config": lab,
            "data_config": data,
            "data_overrides": {
                "seed": recorded["root"]["seed"],
                **{f"data.{k}": v for k, v in data.items() if v is not None},
            },
            "M": self.store.done_info("data")["M"],
            "N": self.store.done_info("data")["N"],
            "label_seconds": done.get("seconds"),
            "teacher_pairs_per_second": labels.num_rows / done["seconds"] if done.get("seconds") else None,
            "source_run": str(self.store.root),
        }
        if lab["function"] == "delift_icl":
            from nncift.influence import delift_icl as icl
            from nncift.models import EMBEDDED_LM

            prov["template"] = {k: getattr(icl, k) for k in ("HEAD_NOICL", "HEAD_ICL", "SEP_ICL", "MID_ICL", "TAIL")}
            pkg = EMBEDDED_LM[2].split()[0]
            prov["model"] = lab.get("model") or f"embedded SmolLM2-135M-Instruct ({EMBEDDED_LM[1]} of {pkg})"
        write_parquet(out, table, metadata={"nncift_table": prov})
        write_json(out.with_suffix(".json"), prov)
        return prov

    def items(self) -> tuple:
        """Items (ids, prompts, responses, embeddings) of D_F and D_T."""
        from nncift.influence import Items

        pool, target = self.tables()
        e_pool, e_target = self.embeddings()
        return tuple(
            Items(t.column("prompt").to_pylist(), t.column("response").to_pylist(), e, t.column("id").to_pylist())
            for t, e in ((pool, e_pool), (target, e_target))
        )

    def truth_function(self):
        """The teacher's full-kernel source for fidelity, or (None, reason)."""
        from nncift.influence import build_influence_function, function_traits

        fd, lb = self.cfg.fidelity, self.cfg.label
        if fd.truth_table:
            path = str(Path(fd.truth_table).resolve())
            return build_influence_function("table", table=path, field="fidelity.truth_table"), None
        if function_traits(lb.function)["exact_is_cheap"]:
            return build_influence_function(lb.function, **self._function_kwargs()), None
        return None, f"the full kernel of `{lb.function}` is unknown: set fidelity.truth_table to a full-label table"

    def fidelity(self) -> dict:
        """Selection fidelity of this run under the teacher's full kernel (see :mod:`nncift.fidelity`).

        Returns ``{"measured": False, "reason": ...}`` when the full kernel is unknown or too large.
        """
        from nncift import fidelity as fid
        from nncift.errors import DataError

        fd, sc = self.cfg.fidelity, self.cfg.select
        m, n = self.store.done_info("data")["M"], self.store.done_info("data")["N"]
        if m * m + m * n > fd.max_pairs:
            return {
                "measured": False,
                "reason": f"M*M + M*N = {m * m + m * n:,} > fidelity.max_pairs = {fd.max_pairs:,}",
            }
        fn, reason = self.truth_function()
        if fn is None:
            return {"measured": False, "reason": reason}
        pool, target = self.items()
        try:
            true_ff, true_ft = fid.teacher_kernels(fn, pool, target)
        except DataError as exc:
            return {"measured": False, "reason": f"the truth table does not cover this run: {exc}"}
        sel = pq.read_table(self.store.path("select", "selection.parquet"))
        est = sel.column("index").to_numpy()
        budget = len(est)
        cos_ff, cos_ft = fid.cosine_kernels(pool.embeddings, target.embeddings)
        zero = fid.select(cos_ff, cos_ft, budget, sc.objective, sc.eta, sc.nu)
        out = fid.selection_fidelity(
            true_ff, true_ft, {"nncift": est, "zero_label": zero}, budget, sc.objective, sc.eta, sc.nu,
            fd.random_subsets, self.cfg.seed,
        )  # fmt: skip
        out["measured"] = True
        out["truth"] = fd.truth_table or self.cfg.label.function
        out["zero_label"] = out["subsets"].pop("zero_label")
        out.update(out["subsets"].pop("nncift"))
        del out["subsets"]
        return out

    def stage_report(self) -> dict:
        from nncift.report import write_report

        fidelity = self.fidelity()
        write_json(self.store.path("report", "fidelity.json"), _clean(fidelity))
        if fidelity.get("measured"):
            log.info(
                "fidelity: gap closed %.3f (zero-label baseline %.3f), Jaccard with the teacher's subset %.3f",
                fidelity["gap_closed"] if fidelity["gap_closed"] is not None else float("nan"),
                fidelity["zero_label"]["gap_closed"]
                if fidelity["zero_label"]["gap_closed"] is not None
                else float("nan"),
                fidelity["jaccard"],
            )
        else:
            log.info("fidelity: not measured (%s)", fidelity["reason"])
        return write_report(self.store, self.cfg)


def _clean(obj):
    """Replace NaN/inf with None so the JSON is standard."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj
