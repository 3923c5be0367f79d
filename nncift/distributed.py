"""The only module that imports Ray (lazily): :class:`RayExecutor`, with block fan-out on Ray Data, fitting
and fine-tuning on Ray Train, and GreeDi rounds as Ray tasks.

Every fan-out here has a twin in :class:`nncift.executors.LocalExecutor` running the same callable class or
kernel in a loop; the tests assert both give identical artifacts.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nncift.config import RayConfig

log = logging.getLogger(__name__)


def init_ray(cfg: RayConfig) -> None:
    """Connect to ``cfg.address`` or start a local Ray with logical CPUs >= 4 (so actors never starve
    the read tasks of a 2-core machine)."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if cfg.address:
        ray.init(address=cfg.address, log_to_driver=True)
    else:
        ray.init(
            address="local",  # never attach by accident to a head started with `ray start`
            num_cpus=cfg.num_cpus or max(4, os.cpu_count() or 1),
            include_dashboard=True,  # Ray Train's placement-group cleaner needs the state API
            dashboard_host="127.0.0.1",
            log_to_driver=True,
            configure_logging=True,
            logging_level=logging.WARNING,
        )
    configure_data_context()


def configure_data_context() -> None:
    """Ray Data settings of every nncift fan-out: progress bars, and no "no progress" timeout (Ray's default
    kills a map whose single block runs over 30 minutes: an expensive teacher's legitimate work)."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True
    ctx.verbose_progress = False
    ctx.execution_no_progress_timeout_s = -1


def map_ray(
    worker_cls: type,
    ctor_kwargs: dict[str, Any],
    specs: list[dict],
    *,
    concurrency: int = 1,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
) -> list[dict]:
    """Fan ``specs`` (one dict per block) out over an actor pool of ``worker_cls`` with Ray Data.

    Each actor builds the worker once and handles one block per call; the worker writes its own artifact, so
    finished blocks survive a crash. Large arrays of ``ctor_kwargs`` (e.g. a million rows' estimator factors)
    are put in the object store once (:func:`share_arrays`) and read zero-copy by every actor of a node, rather
    than pickled into each actor's constructor.
    """
    import ray

    if not specs:
        return []
    configure_data_context()
    ds = ray.data.from_items(specs, override_num_blocks=min(len(specs), 4 * concurrency * 8))
    out = ds.map_batches(
        _shared_args_class(worker_cls),
        fn_constructor_kwargs={"worker_cls": worker_cls, "kwargs": share_arrays(ctor_kwargs)},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_cpus=num_cpus,
        num_gpus=num_gpus or None,
    )
    return out.take_all()


SHARE_MIN_BYTES = 1 << 20


@dataclass(frozen=True)
class _Shared:
    """An array in the Ray object store, standing in for it inside constructor arguments."""

    ref: Any


def share_arrays(obj: Any) -> Any:
    """``obj`` with every ndarray of at least :data:`SHARE_MIN_BYTES` (inside dicts / lists / tuples) put in
    the object store once; :func:`resolve_arrays` is the inverse (zero-copy, read-only arrays)."""
    import ray

    if isinstance(obj, np.ndarray) and obj.nbytes >= SHARE_MIN_BYTES:
        return _Shared(ray.put(obj))
    if isinstance(obj, dict):
        return {k: share_arrays(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(share_arrays(v) for v in obj)
    return obj


def resolve_arrays(obj: Any) -> Any:
    """Inverse of :func:`share_arrays` (run in the actor)."""
    import ray

    if isinstance(obj, _Shared):
        return ray.get(obj.ref)
    if isinstance(obj, dict):
        return {k: resolve_arrays(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(resolve_arrays(v) for v in obj)
    return obj


class SharedArgsWorker:
    """Ray Data actor: builds ``worker_cls(**kwargs)`` with its shared arrays resolved and ``device: auto``
    resolved for the GPUs Ray gave this actor (:func:`nncift.devices.resolve_device`), then delegates."""

    def __init__(self, worker_cls: type, kwargs: dict[str, Any]):
        import ray

        from nncift.devices import resolve_worker_kwargs

        self.worker = worker_cls(**resolve_worker_kwargs(resolve_arrays(kwargs), ray.get_gpu_ids()))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.worker(batch)


@functools.cache
def _shared_args_class(worker_cls: type) -> type:
    """A :class:`SharedArgsWorker` subclass named like ``worker_cls`` (Ray Data names the operator after it)."""
    return type(worker_cls.__name__, (SharedArgsWorker,), {"__doc__": SharedArgsWorker.__doc__})


def embed_ray(
    sources: dict[str, str], out_dir: Path, ctor_kwargs: dict[str, Any], batch_size: int, **res: Any
) -> dict[str, np.ndarray]:
    """Stream each Parquet source (``idx``, ``prompt``, ``response``) through Embedder actors to Parquet.

    Ray Data reads the rows, renders and embeds them on actors, and writes ``idx`` + ``embedding`` parts
    under ``out_dir/<name>/``: the corpus text never passes through the driver. The driver then gathers
    only the embeddings.

    Returns:
        name -> (rows, d) float32 in ``idx`` order.
    """
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from nncift.embed import Embedder

    shutil.rmtree(out_dir, ignore_errors=True)  # parts of an interrupted attempt
    conc = res.get("concurrency", 1)
    paths = list(sources.values())
    # The encoder length-sorts each call into batch_size batches, so larger calls pad less; but every actor
    # needs several calls. Row counts come from the Parquet footers (no data read).
    total = sum(pq.ParquetFile(p).metadata.num_rows for p in paths)
    rows_per_call = max(batch_size, min(batch_size * 16, -(-total // (4 * conc))))
    ds = (
        ray.data.read_parquet(paths, columns=["idx", "prompt", "response"], include_paths=True)
        # small files arrive as one block: re-chunk (streaming, no shuffle) so every actor gets work
        .repartition(target_num_rows_per_block=rows_per_call)
    ).map_batches(
        _shared_args_class(Embedder),  # named Embedder; resolves device=auto in the actor
        fn_constructor_kwargs={"worker_cls": Embedder, "kwargs": ctor_kwargs},
        batch_size=rows_per_call,
        compute=ray.data.ActorPoolStrategy(size=conc),
        num_cpus=res.get("num_cpus", 1.0),
        num_gpus=res.get("num_gpus") or None,
    )
    ds.write_parquet(str(out_dir))
    table = pq.read_table(out_dir, columns=["path", "idx", "embedding"])
    col = table.column("embedding").combine_chunks()
    if isinstance(col.type, pa.ExtensionType):  # Ray's tensor extension type
        dense = np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(len(col), -1)
    else:
        dense = col.flatten().to_numpy().reshape(len(col), -1)
    idx = table.column("idx").to_numpy()
    where = np.asarray(table.column("path").to_pylist())
    out = {}
    for name, path in sources.items():
        sel = np.flatnonzero(np.char.endswith(where.astype(str), os.path.basename(path)))
        order = sel[np.argsort(idx[sel])]
        if not np.array_equal(idx[order], np.arange(len(order))):
            raise RuntimeError(f"{out_dir}: embedded rows of {path} do not cover 0..{len(order) - 1} exactly once")
        out[name] = dense[order].astype(np.float32)
    return out


def _train_worker(config: dict) -> None:
    """Ray Train per-worker loop: the pure :func:`~nncift.train.fit_loop` under DDP, once per network."""
    import json
    import warnings

    import ray.train
    import ray.train.torch
    import torch
    from safetensors.torch import save_file

    from nncift.train import PairLabels, fit_loop

    # the embeddings and labels, zero-copy (read-only) from the object store; the loop only reads them
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    config = resolve_arrays(config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    results = {}
    for name, task in config["tasks"].items():
        results[name] = fit_loop(
            config["fit"],
            config["e_rows"],
            task["e_cols"],
            PairLabels(*task["train"]),
            PairLabels(*task["val"]),
            rank=rank,
            world_size=world,
            wrap=ray.train.torch.prepare_model,
        )
    metrics = {f"{n}_best_val_mse": min(h["val_mse"] for h in hist) for n, (_, hist) in results.items()}
    if rank == 0:
        with tempfile.TemporaryDirectory() as d:
            for name, (state, history) in results.items():
                save_file(state, os.path.join(d, f"{name}.safetensors"))
                Path(d, f"{name}.history.json").write_text(json.dumps(history))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
    else:
        ray.train.report(metrics)


def scaling_config(num_workers: int, use_gpu: bool) -> Any:
    """The Ray Train ``ScalingConfig`` of the fit: ``num_workers`` DDP workers, each given one GPU (its own
    ``CUDA_VISIBLE_DEVICES``; NCCL) when ``use_gpu``, else one CPU (gloo)."""
    import ray.train

    return ray.train.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu)


FitTask = tuple[np.ndarray, Any, Any]  # (e_cols (C, d), train PairLabels, val PairLabels)


def fit_ray(
    fit_cfg: dict,
    e_rows: np.ndarray,
    tasks: dict[str, FitTask],
    *,
    num_workers: int,
    use_gpu: bool,
    storage: Path,
    name: str,
) -> dict[str, tuple[dict, list[dict]]]:
    """Fit one InfluenceNetwork per task in a single Ray Train ``TorchTrainer`` run (DDP; gloo on CPU).

    Args:
        fit_cfg: see :func:`~nncift.train.fit_loop`.
        e_rows: (M, d) row embeddings shared by every task.
        tasks: name -> (column embeddings, train pairs, validation pairs).

    Returns:
        name -> (best state dict, per-epoch history of rank 0).
    """
    import json

    import ray.train
    import torch
    from ray.train.torch import TorchTrainer
    from safetensors.torch import load_file

    cpus = os.cpu_count() or 1
    config = {
        "fit": fit_cfg,
        "e_rows": e_rows,
        "tasks": {
            n: {"e_cols": ec, "train": (tr.rows, tr.cols, tr.y), "val": (va.rows, va.cols, va.y)}
            for n, (ec, tr, va) in tasks.items()
        },
        "threads": max(1, cpus // num_workers),
    }
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config=share_arrays(config),  # the controller and workers hold references, not copies
        scaling_config=scaling_config(num_workers, use_gpu),
        run_config=ray.train.RunConfig(storage_path=str(storage.resolve()), name=name),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train fit '{name}' returned no checkpoint: {result.error}")
    out = {}
    with result.checkpoint.as_directory() as d:
        for n in tasks:
            state = load_file(os.path.join(d, f"{n}.safetensors"))
            history = json.loads(Path(d, f"{n}.history.json").read_text())
            out[n] = ({k: torch.as_tensor(v) for k, v in state.items()}, history)
    return out


def greedi_ray(kern: Any, parts: list[np.ndarray], budget: int) -> tuple[np.ndarray, np.ndarray]:
    """Partitioned two-round greedy (GreeDi) with round 1 fanned out as Ray tasks.

    Local twin: :func:`nncift.select_sparse.greedi_local_round` per part, then
    :func:`~nncift.select_sparse.greedi_merge`; the results are identical.
    """
    import ray

    from nncift.select_sparse import greedi_local_round, greedi_merge

    kern_ref = ray.put(kern)
    task = ray.remote(num_cpus=1)(greedi_local_round)
    local = ray.get([task.remote(kern_ref, p, budget) for p in parts])
    return greedi_merge(kern, local, budget)


def _finetune_worker(config: dict) -> None:
    """Ray Train per-worker loop: :func:`~nncift.finetune.sft_train` on this worker's rank."""
    import ray.train
    import torch

    from nncift.finetune import sft_train

    ctx = ray.train.get_context()
    torch.set_num_threads(config["threads"])
    if config["use_gpu"]:
        import ray.train.torch

        torch.cuda.set_device(ray.train.torch.get_device())  # this worker's GPU (LOCAL_RANK of the node)
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if config["use_gpu"] else "gloo", verbose=False)
    summary = sft_train(
        config["ft"],
        config["rows"],
        config["out_dir"],
        rank=ctx.get_world_rank(),
        world=ctx.get_world_size(),
        use_gpu=config["use_gpu"],
        stop_after=config.get("stop_after"),
    )
    ray.train.report({k: v for k, v in summary.items() if isinstance(v, int | float)})


def finetune_ray(
    ft: dict,
    rows: dict[str, list[str]],
    out_dir: str | Path,
    *,
    num_workers: int,
    use_gpu: bool,
    stop_after: int | None = None,
) -> dict:
    """DeepSpeed fine-tuning on ``num_workers`` Ray Train workers (gloo on CPU, NCCL on GPUs).

    Local twin: :func:`nncift.finetune.finetune_local` (same global batches; tested to give the same
    weights). ``rows`` go through the object store once; every rank writes its checkpoint shards into
    ``out_dir``, which must be on storage all workers share (as for every stage of a run directory).

    Returns:
        The rank-0 summary (steps, final loss, seconds, trainable parameters).
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    cpus = os.cpu_count() or 1
    out_dir = Path(out_dir).resolve()
    config = {
        "ft": ft,
        "rows": rows,
        "out_dir": str(out_dir),
        "use_gpu": use_gpu,
        "threads": max(1, cpus // num_workers),
        "stop_after": stop_after,
    }
    trainer = TorchTrainer(
        _finetune_worker,
        train_loop_config=share_arrays(config),  # the controller and workers hold references, not copies
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=ray.train.RunConfig(storage_path=str(out_dir / "ray"), name="train"),
    )
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"fine-tuning failed: {result.error}")
    if stop_after is not None:
        return {"stopped_at": stop_after}
    import json

    return json.loads((out_dir / "train_summary.json").read_text())


class RayExecutor:
    """The Ray twin of :class:`~nncift.executors.LocalExecutor` (same interface, same artifacts). Ray starts
    (or connects to ``ray.address``) on the first fan-out."""

    name = "ray"

    def __init__(self, cfg: RayConfig):
        self.cfg = cfg

    def start(self) -> None:
        init_ray(self.cfg)

    def map_blocks(
        self, worker_cls: type, ctor_kwargs: dict[str, Any], specs: list[dict], desc: str = "", **res: Any
    ) -> list[dict]:
        """:func:`map_ray`; a user-fixable error a worker returned is raised here as one line (that of the
        first failing block in spec order, as the local executor does, whatever order the actors finished in)."""
        from nncift.errors import raise_worker_errors

        self.start()
        out = map_ray(worker_cls, ctor_kwargs, specs, **res)
        raise_worker_errors(sorted(out, key=lambda r: int(r.get("block_id", 0))))
        return out

    def embed(
        self, sources: dict[str, str], out_dir: Path, ctor_kwargs: dict[str, Any], batch_size: int, **res: Any
    ) -> dict[str, np.ndarray]:
        self.start()
        return embed_ray(sources, out_dir, ctor_kwargs, batch_size, **res)

    def fit(self, fit_cfg: dict, e_rows: np.ndarray, tasks: dict[str, Any], **kw: Any) -> dict:
        self.start()
        return fit_ray(fit_cfg, e_rows, tasks, **kw)

    def greedi(self, kern: Any, parts: list[np.ndarray], budget: int) -> tuple[np.ndarray, np.ndarray]:
        self.start()
        return greedi_ray(kern, parts, budget)

    def finetune(self, ft: dict, rows: dict[str, list[str]], out_dir: str | Path, **kw: Any) -> dict:
        self.start()
        return finetune_ray(ft, rows, out_dir, **kw)
