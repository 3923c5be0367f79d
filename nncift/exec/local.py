"""How the stages' fan-outs run: one executor, chosen once per run (``ray.executor``), passed to every stage.

Both executors have the same small interface:

- ``map_blocks(worker_cls, ctor_kwargs, specs, desc=, concurrency=, num_cpus=, num_gpus=)``: build the
  callable ``worker_cls(**ctor_kwargs)`` once per worker and call it on each block spec (a dict of ints); the
  worker writes its own artifact. Returns one result dict per spec. A user-fixable error a worker returned
  (its ``error`` column) is raised in the driver as one line.
- ``map_rows(worker_cls, ctor_kwargs, sources, out_dir, batch_size, column, ...)``: stream the rows of Parquet
  sources through a worker (Ray Data actors on Ray: the text never passes through the driver).
- ``train(job, ...)``: a training job of :data:`TRAIN_JOBS` (``surrogate``: one surrogate per task,
  data-parallel on Ray Train; ``sft``: DeepSpeed fine-tuning).
- ``map_tasks(fn, shared, tasks, desc=, num_cpus=)``: stateless tasks ``fn(shared, *task)`` (Ray tasks over one
  object in the object store); results in task order.

:class:`LocalExecutor` runs everything in this process with the same pure kernels;
:class:`nncift.exec.ray_executor.RayExecutor` is its Ray twin and the only code that imports Ray. Every fan-out's
equivalence (identical artifacts) is tested.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# the training jobs of the ``train`` verb: name -> the method each executor runs it with
TRAIN_JOBS = {
    "surrogate": "_fit",  # fit(fit_cfg, e_rows, tasks, ...): one surrogate per task (DDP on Ray Train)
    "sft": "_finetune",  # finetune(ft, rows, out_dir, ...): DeepSpeed fine-tuning (one worker per rank on Ray Train)
}


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

    def map_rows(
        self,
        worker_cls: type,
        ctor_kwargs: dict[str, Any],
        sources: dict[str, str],
        out_dir: Path,
        batch_size: int,
        column: str,
        desc: str = "",
        **_res: Any,
    ) -> dict[str, np.ndarray]:
        """Stream the rows (``idx``, ``prompt``, ``response``) of each Parquet source through
        ``worker_cls(**ctor_kwargs)`` (called on batches of ``batch_size * 8`` rows, in row order) and keep its
        output ``column``: name -> (rows, ...) array in row order (``out_dir``: the Ray twin's scratch folder)."""
        import pyarrow.parquet as pq
        from tqdm.auto import tqdm

        from nncift.exec.devices import local_gpu_ids, resolve_worker_kwargs

        worker = worker_cls(**resolve_worker_kwargs(ctor_kwargs, local_gpu_ids()))
        out = {}
        for name, path in sources.items():
            pf = pq.ParquetFile(path)
            batches = pf.iter_batches(batch_size=batch_size * 8, columns=["idx", "prompt", "response"])
            parts = [
                worker({k: b.column(k).to_numpy(zero_copy_only=False) for k in ("idx", "prompt", "response")})[column]
                for b in tqdm(batches, desc=f"{desc or worker_cls.__name__} {name}")
            ]
            out[name] = np.concatenate(parts) if parts else np.zeros((0, getattr(worker, "dim", 0)), np.float32)
        return out

    def _fit(
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

    def train(self, job: str, *args: Any, **kw: Any) -> Any:
        """Run training job ``job`` of :data:`TRAIN_JOBS` in this process (world size 1, the same global
        batches as the Ray twin's workers together)."""
        return getattr(self, TRAIN_JOBS[job])(*args, **kw)

    def map_tasks(self, fn: Any, shared: Any, tasks: list[tuple], desc: str = "", num_cpus: float = 1.0) -> list:
        """``fn(shared, *task)`` for each task, in order: stateless tasks over one shared read-only object (e.g.
        GreeDi's round 1: one greedy per part of the items over the kernel)."""
        from tqdm.auto import tqdm

        return [fn(shared, *t) for t in tqdm(tasks, desc=desc or getattr(fn, "__name__", "tasks"), leave=False)]

    def _finetune(self, ft: dict, rows: dict[str, list[str]], out_dir: str | Path, **kw: Any) -> dict:
        """:func:`~nncift.lm.trainer.finetune_local`: one process accumulating the whole global batch."""
        from nncift.lm.trainer import finetune_local

        kw.pop("num_workers", None)
        return finetune_local(ft, rows, str(out_dir), **kw)
