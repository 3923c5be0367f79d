"""The only module that imports Ray (lazily): :class:`RayExecutor`, with block fan-out on Ray Data, fitting
and fine-tuning on Ray Train, and GreeDi rounds as Ray tasks.

Every fan-out here has a twin in :class:`nncift.exec.local.LocalExecutor` running the same callable class or
kernel in a loop; the tests assert both give identical artifacts.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nncift.config import RayConfig
from nncift.exec.ports import free_port
from nncift.exec.stall import StallWatch, actors_that_fit, describe_wait, watching

log = logging.getLogger(__name__)


def init_ray(cfg: RayConfig) -> None:
    """Connect to ``cfg.address`` or start a local Ray with logical CPUs >= 4 (so actors never starve
    the read tasks of a 2-core machine)."""
    import ray

    if ray.is_initialized():
        return
    from nncift import console

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if not console.verbose():  # the core worker's own log lines (they stay in the session's log files)
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    # the workers' log lines reach the console only with -v (they stay in the Ray session's log files)
    if cfg.address:
        ray.init(address=cfg.address, log_to_driver=console.verbose())
    else:
        start_private_ray(
            num_cpus=cfg.num_cpus or max(4, os.cpu_count() or 1),
            include_dashboard=True,  # Ray Train's placement-group cleaner needs the state API
            log_to_driver=console.verbose(),
            configure_logging=True,
            logging_level=logging.WARNING,
        )
    configure_data_context()


PRIVATE_TEMP_PREFIX = "nncift-ray-"


def private_temp_dir() -> Path:
    """``/tmp/nncift-ray-<pid>``: this process's own Ray temp dir, short because Ray's unix sockets live under
    it (107-byte path limit)."""
    return Path("/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir(), f"{PRIVATE_TEMP_PREFIX}{os.getpid()}")


_CLEANUP_REGISTERED: set[str] = set()


def start_private_ray(**init_kwargs: Any) -> None:
    """``ray.init`` of a Ray that only this process uses, and that takes none of the ports or directories a
    ``ray start --head`` started later takes by default, so that head starts and a ``ray job submit`` to it
    never reaches this session:

    * the dashboard (job API) on a free port, not 8265; the dashboard agent's HTTP port free too, not 52365
      (not a ``ray.init`` argument: ``RayParams`` is wrapped for the call); the GCS on a free port, not 6379
      (Ray picks a random one anyway; it is picked here so ``RAY_ADDRESS`` can name it); no client server
      (10001) and random metrics ports, as ``ray.init`` does anyway;
    * its own temp dir (:func:`private_temp_dir`, not ``/tmp/ray``), removed at exit;
    * ``RAY_ADDRESS`` = this GCS in the environment the Ray processes (so every worker) start with: any
      auto-detection inside the session (Ray Train's placement-group cleaner asks the state API about its
      controller) finds this session, never another Ray instance on the machine. The driver's own
      environment is restored after the call.
    """
    import inspect

    import ray
    import ray._private.parameter as ray_parameter

    temp_dir = private_temp_dir()
    gcs_port = free_port()
    env = {"RAY_GCS_SERVER_PORT": str(gcs_port), "RAY_ADDRESS": f"{ray.util.get_node_ip_address()}:{gcs_port}"}
    saved_env = {k: os.environ.get(k) for k in env}
    params_cls = ray_parameter.RayParams
    if "dashboard_agent_listen_port" in inspect.signature(params_cls).parameters:

        class _FreeAgentPort(params_cls):  # type: ignore[misc, valid-type]
            def __init__(self, *args: Any, **kwargs: Any):
                kwargs.setdefault("dashboard_agent_listen_port", 0)  # 0: a free port (Ray's default is 52365)
                super().__init__(*args, **kwargs)

        ray_parameter.RayParams = _FreeAgentPort
    if str(temp_dir) not in _CLEANUP_REGISTERED:  # after Ray's own atexit hook, so it runs before it
        atexit.register(_remove_private_session, temp_dir)
        _CLEANUP_REGISTERED.add(str(temp_dir))
    try:
        os.environ.update(env)
        ray.init(
            address="local",  # never attach by accident to a head started with `ray start`
            dashboard_host="127.0.0.1",
            dashboard_port=free_port(),
            _temp_dir=str(temp_dir),
            **init_kwargs,
        )
    finally:
        ray_parameter.RayParams = params_cls
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    log.debug("private Ray: GCS port %d, temp dir %s", gcs_port, temp_dir)


def _remove_private_session(temp_dir: Path) -> None:
    """atexit: shut the private Ray down, then remove its temp dir (Ray leaves it)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


def configure_data_context() -> None:
    """Ray Data settings of every nncift fan-out: progress bars, and no "no progress" timeout (Ray's default
    kills a map whose single block runs over 30 minutes: an expensive teacher's legitimate work)."""
    import ray

    from nncift import console

    ctx = ray.data.DataContext.get_current()
    ctx.verbose_progress = False
    ctx.execution_no_progress_timeout_s = -1
    # Ray Data's progress dumps and INFO lines only with -v (they stay in the Ray session's ray-data.log);
    # each fan-out shows nncift's own progress line instead
    ctx.enable_progress_bars = console.verbose()
    if not console.verbose():
        from ray.util.debug import log_once

        log_once("ray_data_progress_manager_disabled")  # its one-time "Progress bars disabled" notice
        for h in logging.getLogger("ray.data").handlers:
            if not isinstance(h, logging.FileHandler) and type(h).__name__ != "SessionFileHandler":
                h.setLevel(logging.WARNING)


def map_ray(
    worker_cls: type,
    ctor_kwargs: dict[str, Any],
    specs: list[dict],
    *,
    concurrency: int = 1,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    stall_seconds: float | None = 120.0,
    desc: str = "",
) -> list[dict]:
    """Fan ``specs`` (one dict per block) out over an actor pool of ``worker_cls`` with Ray Data.

    Each actor builds the worker once and handles one block per call; the worker writes its own artifact, so
    finished blocks survive a crash. Large arrays of ``ctor_kwargs`` (e.g. a million rows' estimator factors)
    are put in the object store once (:func:`share_arrays`) and read zero-copy by every actor of a node, rather
    than pickled into each actor's constructor. The pool autoscales between 1 and ``concurrency`` actors
    (:func:`actor_pool`); when no block finishes for ``stall_seconds``, one warning line says what it waits for.
    """
    if not specs:
        return []
    configure_data_context()
    with visibility_marker(ctor_kwargs.get("out_dir")) as marker:
        return _map_ray(worker_cls, ctor_kwargs, specs, marker, concurrency, num_cpus, num_gpus, stall_seconds, desc)


VISIBLE_PREFIX = ".nncift-visible-"


@contextlib.contextmanager
def visibility_marker(out_dir: str | Path | None) -> Iterator[str | None]:
    """A hidden file ``<out_dir>/.nncift-visible-<token>`` that the driver writes before a fan-out and removes
    after it: an actor that cannot see it runs on a node that does not see the run directory
    (:class:`SharedArgsWorker`). None when the fan-out names no ``out_dir``."""
    if not out_dir:
        yield None
        return
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    marker = Path(out_dir, f"{VISIBLE_PREFIX}{uuid.uuid4().hex}")
    marker.touch()
    try:
        yield str(marker)
    finally:
        marker.unlink(missing_ok=True)


def _map_ray(
    worker_cls: type,
    ctor_kwargs: dict[str, Any],
    specs: list[dict],
    marker: str | None,
    concurrency: int,
    num_cpus: float,
    num_gpus: float,
    stall_seconds: float | None,
    desc: str,
) -> list[dict]:
    import ray

    ds = ray.data.from_items(specs, override_num_blocks=min(len(specs), 4 * concurrency * 8))
    out = ds.map_batches(
        _shared_args_class(worker_cls),
        fn_constructor_kwargs={"worker_cls": worker_cls, "kwargs": share_arrays(ctor_kwargs), "marker": marker},
        batch_size=1,
        compute=actor_pool(concurrency, num_cpus, num_gpus),
        num_cpus=num_cpus,
        num_gpus=num_gpus or None,
    )
    rows: list[dict] = []
    pairs = {int(s["block_id"]): int(s["pairs"]) for s in specs if "pairs" in s and "block_id" in s}
    weighted = len(pairs) == len(specs)
    with (
        watching(_pool_watch(worker_cls.__name__, lambda: len(rows), stall_seconds, concurrency, num_cpus, num_gpus)),
        progress_bar(sum(pairs.values()) if weighted else len(specs), desc or worker_cls.__name__, weighted) as bar,
    ):
        for row in out.iter_rows():  # what take_all() does, with a count for the watchdog and the progress line
            rows.append(row)
            bar.update(pairs.get(int(row.get("block_id", -1)), 0) if weighted else 1)
    return rows


def progress_bar(total: int, desc: str, weighted: bool) -> Any:
    """The one progress line of a fan-out (done / total in pairs or blocks, rate, ETA), as the local executor's."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="pair" if weighted else "block", disable=not total, leave=False,
                unit_scale=weighted)  # fmt: skip


def actor_pool(n: int, num_cpus: float, num_gpus: float) -> Any:
    """An actor pool autoscaling from 1 to ``n`` actors, so that a busy cluster slows a fan-out instead of
    freezing it (a fixed pool of ``n`` waits until all ``n`` fit). It starts with as many as fit into the free
    resources now (at least 1): on a free cluster, all ``n`` at once, as a fixed pool would."""
    import ray
    from ray._private.state import available_resources_per_node  # DeveloperAPI

    try:
        room = actors_that_fit(list(available_resources_per_node().values()), num_cpus, num_gpus)
    except Exception:  # only the start size depends on it
        room = 1
    return ray.data.ActorPoolStrategy(min_size=1, max_size=n, initial_size=max(1, min(n, room)))


def _pool_watch(
    what: str, progress: Any, stall_seconds: float | None, n: int, num_cpus: float, num_gpus: float
) -> StallWatch | None:
    """The stall watch of a fan-out over an actor pool (``None`` when ``stall_seconds`` is unset)."""
    if not stall_seconds:
        return None
    return StallWatch(what, stall_seconds, progress, lambda: _pool_wait(what, n, num_cpus, num_gpus))


def _pool_wait(what: str, n: int, num_cpus: float, num_gpus: float) -> str:
    """:func:`~nncift.exec.stall.describe_wait` from the live cluster: free and total resources per node (GCS),
    and the pool's actors pending creation (the state API, when the session has a dashboard)."""
    import ray
    from ray._private.state import available_resources_per_node, total_resources_per_node  # DeveloperAPI

    ips = {x["NodeID"]: x["NodeManagerAddress"] for x in ray.nodes() if x.get("Alive")}
    free, total = available_resources_per_node(), total_resources_per_node()
    nodes: dict[str, tuple[dict, dict]] = {}
    for node_id, tot in total.items():
        name = ips.get(node_id, node_id[:8])
        nodes[name if name not in nodes else f"{name}/{node_id[:8]}"] = (free.get(node_id, {}), tot)
    return describe_wait(what, n, num_cpus, num_gpus, nodes, _pending_actors(what))


def _pending_actors(what: str) -> int | None:
    """Actors of the pool ``what`` pending creation (Ray Data names them ``MapWorker(MapBatches(<what>))``),
    or ``None`` when the state API cannot tell (no dashboard in this session)."""
    try:
        from ray._private import ray_constants
        from ray.experimental.internal_kv import _internal_kv_get
        from ray.util.state import list_actors

        url = _internal_kv_get(ray_constants.DASHBOARD_ADDRESS, namespace=ray_constants.KV_NAMESPACE_DASHBOARD)
        if not url:
            return None
        actors = list_actors(address=f"http://{url.decode()}", filters=[("state", "=", "PENDING_CREATION")],
                             limit=10_000, timeout=5, raise_on_missing_output=False)  # fmt: skip
        return sum(f"({what})" in a.class_name for a in actors)
    except Exception:  # the line is said without it
        return None


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
    resolved for the GPUs Ray gave this actor (:func:`nncift.exec.devices.resolve_device`), then delegates.

    A user-fixable error of the constructor (:class:`~nncift.errors.NnciftError`: a bad table file, a broken
    model folder) is deterministic: raised here, it would kill the actor and Ray Data would build it again.
    It is kept instead and answered on every batch: block batches get it in their ``error`` column (the
    driver raises the first as one line, :func:`nncift.errors.raise_worker_errors`), other batches raise it
    (:func:`user_error` finds it in the driver)."""

    def __init__(self, worker_cls: type, kwargs: dict[str, Any], marker: str | None = None):
        import ray

        from nncift.errors import DataError, NnciftError
        from nncift.exec.devices import resolve_worker_kwargs

        self.worker, self.init_error = None, None
        if marker is not None and not os.path.isfile(marker):  # once per actor: is the run directory shared?
            ctx = ray.get_runtime_context()
            self.init_error = DataError(
                f"Ray node {ray.util.get_node_ip_address()} (node id {ctx.get_node_id()[:12]}) cannot see the run "
                f"directory: {os.path.dirname(marker)} (the driver's file {os.path.basename(marker)} is not there); "
                "every node must mount the run directory at the same path (shared storage)"
            )
            return
        try:
            self.worker = worker_cls(**resolve_worker_kwargs(resolve_arrays(kwargs), ray.get_gpu_ids()))
        except NnciftError as exc:
            self.init_error = exc

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.init_error is not None:
            from nncift.errors import encode_worker_error

            if "block_id" not in batch:
                raise self.init_error
            ids = np.asarray(batch["block_id"])
            return {"block_id": ids, "error": np.full(len(ids), encode_worker_error(self.init_error), dtype=object)}
        return self.worker(batch)


def user_error(exc: BaseException) -> Exception | None:
    """The :class:`~nncift.errors.NnciftError` a Ray failure carries (an actor's batch raised it), rebuilt as
    one line, or None. Ray Data hands the driver only the remote traceback's text, so the error is found as
    its last ``nncift.errors.<Class>: <message>`` line."""
    import re

    from nncift.errors import ConfigError, DataError, MissingDependencyError, NnciftError, TeacherError

    seen: list[BaseException] = []
    todo: list[Any] = [exc]
    while todo:
        e = todo.pop()
        if not isinstance(e, BaseException) or any(e is s for s in seen):
            continue
        seen.append(e)
        if isinstance(e, NnciftError) and "\n" not in str(e):
            return e
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]
    classes = {c.__name__: c for c in (ConfigError, DataError, MissingDependencyError, TeacherError, NnciftError)}
    found = re.findall(r"^nncift\.errors\.(\w+): (.+)$", "\n".join(str(e) for e in seen), flags=re.M)
    if not found:
        return None
    name, msg = found[-1]
    return classes.get(name, NnciftError)(msg.strip())


@contextlib.contextmanager
def one_line_user_errors() -> Iterator[None]:
    """Re-raise a user-fixable error that a Ray worker raised (buried in Ray's wrappers) as its own one-line
    :class:`~nncift.errors.NnciftError`; anything else propagates unchanged."""
    try:
        yield
    except Exception as exc:
        err = user_error(exc)
        if err is None:
            raise
        raise err from None


@functools.cache
def _shared_args_class(worker_cls: type) -> type:
    """A :class:`SharedArgsWorker` subclass named like ``worker_cls`` (Ray Data names the operator after it)."""
    return type(worker_cls.__name__, (SharedArgsWorker,), {"__doc__": SharedArgsWorker.__doc__})


def map_rows_ray(
    worker_cls: type,
    ctor_kwargs: dict[str, Any],
    sources: dict[str, str],
    out_dir: Path,
    batch_size: int,
    column: str,
    desc: str = "",
    **res: Any,
) -> dict[str, np.ndarray]:
    """Stream each Parquet source (``idx``, ``prompt``, ``response``) through ``worker_cls`` actors to Parquet.

    Ray Data reads the rows, runs the worker on actors (e.g. the Embedder renders and embeds them), and writes
    ``idx`` + the worker's output columns under ``out_dir``: the corpus text never passes through the driver.
    The driver then gathers only ``column``.

    Returns:
        name -> (rows, ...) array of ``column`` in ``idx`` order.
    """

    shutil.rmtree(out_dir, ignore_errors=True)  # parts of an interrupted attempt
    with visibility_marker(out_dir.parent) as marker:  # beside the parts: Ray Data writes a folder of its own
        _row_parts(worker_cls, sources, out_dir, ctor_kwargs, batch_size, marker, desc or worker_cls.__name__, res)
    return _gather_column(sources, out_dir, column)


def _row_parts(
    worker_cls: type,
    sources: dict[str, str],
    out_dir: Path,
    ctor_kwargs: dict[str, Any],
    batch_size: int,
    marker: str | None,
    desc: str,
    res: dict,
) -> None:
    import pyarrow.parquet as pq
    import ray

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
        _shared_args_class(worker_cls),  # named like the worker; resolves device=auto in the actor
        fn_constructor_kwargs={"worker_cls": worker_cls, "kwargs": ctor_kwargs, "marker": marker},
        batch_size=rows_per_call,
        compute=actor_pool(conc, res.get("num_cpus", 1.0), res.get("num_gpus") or 0.0),
        num_cpus=res.get("num_cpus", 1.0),
        num_gpus=res.get("num_gpus") or None,
    )
    written = lambda: len(list(out_dir.glob("*.parquet")))  # noqa: E731 - the parts land as they finish
    cpus, gpus = res.get("num_cpus", 1.0), res.get("num_gpus") or 0.0
    parts = sum(-(-pq.ParquetFile(p).metadata.num_rows // rows_per_call) for p in paths)  # repartitioned per file
    with (
        watching(_pool_watch(worker_cls.__name__, written, res.get("stall_seconds", 120.0), conc, cpus, gpus)),
        polled_progress(written, parts, desc),
    ):
        ds.write_parquet(str(out_dir))


@contextlib.contextmanager
def polled_progress(count: Any, total: int, desc: str, every: float = 1.0) -> Iterator[None]:
    """A fan-out's progress line for work that only shows as files landing: ``count()`` polled every ``every``
    seconds on a thread (blocks done / ``total``, rate, ETA), closed when the block exits."""
    bar = progress_bar(total, desc, weighted=False)
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(every):
            bar.update(max(0, min(total, count()) - bar.n))

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()
        bar.close()


def _gather_column(sources: dict[str, str], out_dir: Path, column: str) -> dict[str, np.ndarray]:
    """name -> (rows, ...) float32 ``column`` in ``idx`` order, from the parts :func:`_row_parts` wrote."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(out_dir, columns=["path", "idx", column])
    col = table.column(column).combine_chunks()
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
    """Ray Train per-worker loop: the pure :func:`~nncift.surrogate.fitting.fit_loop` under DDP, once per network."""
    import json
    import warnings

    import ray.train
    import ray.train.torch
    import torch
    from safetensors.torch import save_file

    from nncift.surrogate.fitting import PairLabels, fit_loop

    # the embeddings and labels, zero-copy (read-only) from the object store; the loop only reads them
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    config = resolve_arrays(config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    results = {}
    beat = config.get("epochs_file") if rank == 0 else None

    def on_epoch(rec: dict) -> None:  # the driver's stall watch counts these lines
        with open(beat, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec) + "\n")

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
            on_epoch=on_epoch if beat else None,
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
    stall_seconds: float | None = None,
) -> dict[str, tuple[dict, list[dict]]]:
    """Fit one InfluenceNetwork per task in a single Ray Train ``TorchTrainer`` run (DDP; gloo on CPU).

    Rank 0 appends each finished epoch to ``<storage>/<name>.epochs.jsonl``; when none lands for
    ``stall_seconds`` (e.g. the workers' placement group waits for CPUs or GPUs), one warning line says what
    the workers wait for.

    Args:
        fit_cfg: see :func:`~nncift.surrogate.fitting.fit_loop`.
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
        "epochs_file": str(storage.resolve() / f"{name}.epochs.jsonl"),
    }
    beat = Path(config["epochs_file"])
    beat.parent.mkdir(parents=True, exist_ok=True)
    beat.unlink(missing_ok=True)
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config=share_arrays(config),  # the controller and workers hold references, not copies
        scaling_config=scaling_config(num_workers, use_gpu),
        run_config=ray.train.RunConfig(storage_path=str(storage.resolve()), name=name),
    )
    epochs = lambda: len(beat.read_text().splitlines()) if beat.is_file() else 0  # noqa: E731
    with watching(_pool_watch("TorchTrainer workers", epochs, stall_seconds, num_workers, 1.0, float(use_gpu))):
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


def map_tasks_ray(fn: Any, shared: Any, tasks: list[tuple], desc: str = "", num_cpus: float = 1.0) -> list:
    """``fn(shared, *task)`` per task as Ray tasks, ``shared`` put once in the object store; results in task order
    (local twin: :meth:`nncift.exec.local.LocalExecutor.map_tasks`, identical results)."""
    import ray

    ref = ray.put(shared)
    remote = ray.remote(num_cpus=num_cpus)(fn)
    pending = [remote.remote(ref, *t) for t in tasks]
    with progress_bar(len(pending), desc or getattr(fn, "__name__", "tasks"), weighted=False) as bar:
        left = list(pending)
        while left:
            done, left = ray.wait(left, num_returns=1)
            bar.update(len(done))
    return ray.get(pending)


def _finetune_worker(config: dict) -> None:
    """Ray Train per-worker loop: :func:`~nncift.lm.trainer.sft_train` on this worker's rank."""
    import ray.train
    import torch

    from nncift.lm.trainer import sft_train

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

    Local twin: :func:`nncift.lm.trainer.finetune_local` (same global batches; tested to give the same
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
    """The Ray twin of :class:`~nncift.exec.local.LocalExecutor` (same interface, same artifacts). Ray starts
    (or connects to ``ray.address``) on the first fan-out."""

    name = "ray"

    def __init__(self, cfg: RayConfig):
        self.cfg = cfg

    def start(self) -> None:
        init_ray(self.cfg)

    def _stall(self) -> float | None:
        """``ray.stall_seconds`` (None when the executor was built without a config, as in tests)."""
        return getattr(self.cfg, "stall_seconds", None)

    def map_blocks(
        self, worker_cls: type, ctor_kwargs: dict[str, Any], specs: list[dict], desc: str = "", **res: Any
    ) -> list[dict]:
        """:func:`map_ray`; a user-fixable error a worker returned is raised here as one line (that of the
        first failing block in spec order, as the local executor does, whatever order the actors finished in)."""
        from nncift.errors import raise_worker_errors

        self.start()
        with one_line_user_errors():  # a worker raised a user-fixable error (not retried: a UDF error)
            out = map_ray(worker_cls, ctor_kwargs, specs, stall_seconds=self._stall(), desc=desc, **res)
        raise_worker_errors(sorted(out, key=lambda r: int(r.get("block_id", 0))))
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
        **res: Any,
    ) -> dict[str, np.ndarray]:
        self.start()
        with one_line_user_errors():  # e.g. an Embedder constructor's user-fixable error
            return map_rows_ray(
                worker_cls,
                ctor_kwargs,
                sources,
                out_dir,
                batch_size,
                column,
                desc=desc,
                stall_seconds=self._stall(),
                **res,
            )

    def train(self, job: str, *args: Any, **kw: Any) -> Any:
        """Run training job ``job`` (:data:`nncift.exec.local.TRAIN_JOBS`) on Ray Train."""
        from nncift.exec.local import TRAIN_JOBS

        return getattr(self, TRAIN_JOBS[job])(*args, **kw)

    def _fit(self, fit_cfg: dict, e_rows: np.ndarray, tasks: dict[str, Any], **kw: Any) -> dict:
        self.start()
        return fit_ray(fit_cfg, e_rows, tasks, stall_seconds=self._stall(), **kw)

    def map_tasks(self, fn: Any, shared: Any, tasks: list[tuple], desc: str = "", num_cpus: float = 1.0) -> list:
        self.start()
        return map_tasks_ray(fn, shared, tasks, desc=desc, num_cpus=num_cpus)

    def _finetune(self, ft: dict, rows: dict[str, list[str]], out_dir: str | Path, **kw: Any) -> dict:
        self.start()
        return finetune_ray(ft, rows, out_dir, **kw)
