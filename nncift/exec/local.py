"""How the stages' fan-outs run: one executor, chosen once per run (``ray.executor``), passed to every stage.

Both executors have the same small interface:

- ``map_blocks(worker_cls, ctor_kwargs, specs, desc=, concurrency=, num_cpus=, num_gpus=)``: build the
  callable ``worker_cls(**ctor_kwargs)`` once per worker and call it on each block spec (a dict of ints); the
  worker writes its own artifact. Returns one result dict per spec. A user-fixable error a worker returned
  (its ``error`` column) is raised in the driver as one line.
- ``embed(sources, out_dir, ctor_kwargs, batch_size, ...)``: embed Parquet sources of rows.
- ``fit(fit_cfg, e_rows, tasks, ...)``: fit one surrogate per task (data-parallel on Ray Train).
- ``greedi(kernel, parts, budget)``: the partitioned two-round greedy.
- ``finetune(ft, rows, out_dir, ...)``: DeepSpeed fine-tuning.

:class:`LocalExecutor` runs everything in this process with the same pure kernels;
:class:`nncift.exec.ray_executor.RayExecutor` is its Ray twin and the only code that imports Ray. Every fan-out's
equivalence (identical artifacts) is tested.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from nncift.config import RayConfig

log = logging.getLogger(__name__)


class LocalExecutor:
    """Everything in this process: plain loops over the same worker classes and kernels."""

    name = "local"

    def map_blocks(
        self, worker_cls: type, ctor_kwargs: dict[str, Any], specs: list[dict], desc: str = "", **_res: Any
    ) -> list[dict]:
        """Construct the worker once (``device: auto`` resolved for this process), call it on each spec in
        order, with a progress bar in pairs (when the specs declare ``pairs``) or blocks; stops at the first
        block that returns an error."""
        from tqdm.auto import tqdm

        from nncift.errors import raise_worker_errors
        from nncift.exec.devices import local_gpu_ids, resolve_worker_kwargs

        worker = worker_cls(**resolve_worker_kwargs(ctor_kwargs, local_gpu_ids()))
        out = []
        weighted = bool(specs) and all("pairs" in s for s in specs)
        total = sum(int(s["pairs"]) for s in specs) if weighted else len(specs)
        with tqdm(total=total, desc=desc or worker_cls.__name__, unit="pair" if weighted else "block",
                  disable=not specs, leave=False, unit_scale=weighted) as bar:  # fmt: skip
            for spec in specs:
                res = worker({k: np.asarray([v]) for k, v in spec.items()})
                out.append({k: v[0] for k, v in res.items()})
                raise_worker_errors(out[-1:])  # stop at the first bad block (an expensive teacher would go on)
                bar.update(int(spec["pairs"]) if weighted else 1)
        return out

    def embed(
        self, sources: dict[str, str], out_dir: Path, ctor_kwargs: dict[str, Any], batch_size: int, **_res: Any
    ) -> dict[str, np.ndarray]:
        """Embed each Parquet source (``prompt``, ``response``) in row order; name -> (rows, d) float32."""
        import pyarrow as pa
        import pyarrow.parquet as pq
        from tqdm.auto import tqdm

        from nncift.corpus.embedder import Embedder
        from nncift.corpus.readers import texts
        from nncift.exec.devices import local_gpu_ids, resolve_worker_kwargs

        enc = Embedder(**resolve_worker_kwargs(ctor_kwargs, local_gpu_ids()))
        out = {}
        for name, path in sources.items():
            pf = pq.ParquetFile(path)
            batches = pf.iter_batches(batch_size=batch_size * 8, columns=["prompt", "response"])
            parts = [
                enc.encode(texts(pa.Table.from_batches([b]), ctor_kwargs["template"]))
                for b in tqdm(batches, desc=f"embed {name}")
            ]
            out[name] = np.concatenate(parts) if parts else np.zeros((0, enc.dim), np.float32)
        return out

    def fit(
        self,
        fit_cfg: dict,
        e_rows: np.ndarray,
        tasks: dict[str, tuple],
        use_gpu: bool = False,
        device: str = "auto",
        **_kw: Any,
    ) -> dict[str, tuple[dict, list[dict]]]:
        """:func:`~nncift.surrogate.fitting.fit_loop` per task in this process (world size 1, the same global batches), on
        ``device`` (``fit.device``; auto = CUDA when ``use_gpu`` and one is available); CPU weights back."""
        from nncift.surrogate.fitting import fit_device, fit_loop

        dev = fit_device(device, use_gpu)
        log.info("fit on %s", dev)

        def on_epoch(r: dict) -> None:
            log.info("epoch %d train MSE %.5f val MSE %.5f", r["epoch"], r["train_mse"], r["val_mse"])

        return {
            n: fit_loop(fit_cfg, e_rows, ec, tr, va, on_epoch=on_epoch, device=dev) for n, (ec, tr, va) in tasks.items()
        }

    def greedi(self, kern: Any, parts: list[np.ndarray], budget: int) -> tuple[np.ndarray, np.ndarray]:
        """GreeDi: a greedy per part, then a greedy over the union of the part solutions.

        Args:
            kern: a :class:`~nncift.selection.sparse.SparseKernel`, or a :class:`~nncift.selection.sparse.StripeSource`
                (each part then reads only its own sub-kernel from the estimate's stripes).
            parts: the partition of the items. budget: picks.
        """
        from nncift.selection.sparse import greedi_local_round, greedi_merge

        return greedi_merge(kern, [greedi_local_round(kern, p, budget) for p in parts], budget)

    def finetune(self, ft: dict, rows: dict[str, list[str]], out_dir: str | Path, **kw: Any) -> dict:
        """:func:`~nncift.lm.trainer.finetune_local`: one process accumulating the whole global batch."""
        from nncift.lm.trainer import finetune_local

        kw.pop("num_workers", None)
        return finetune_local(ft, rows, str(out_dir), **kw)


def make_executor(cfg: RayConfig) -> Any:
    """The run's executor: :class:`LocalExecutor`, or :class:`nncift.exec.ray_executor.RayExecutor` (Ray starts on
    its first fan-out)."""
    if cfg.executor == "local":
        return LocalExecutor()
    from nncift.exec.ray_executor import RayExecutor

    return RayExecutor(cfg)
