"""What every stage is, and the context it runs in.

A :class:`Stage` declares its name, the config sections it depends on (its own; upstream stages' sections
are added by the runner), the stages it comes after, the artifacts it reads and writes, and ``run(ctx)``.
It does not touch completion markers, fingerprints or timing: :class:`nncift.runner.Runner` owns those for
every stage, including the per-subset fine-tune and evaluation stages.

The :class:`Context` is what a stage sees: the validated configuration, the run directory, the executor
chosen once for the run (local or Ray), a way to run the stages it needs (``ctx.require``), and cached
readers of the shared artifacts (tables, embeddings, labels).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nncift.config import RunConfig
from nncift.errors import DataError
from nncift.store import RunDir, read_safetensors

if TYPE_CHECKING:
    from nncift.influence import InfluenceFunction, Items
    from nncift.runner import Runner


class Stage:
    """One step of a run.

    Attributes:
        name: the stage's name and folder (``<run>/<name>/``); per-subset stages live in ``<run>/<name>/<subset>/``.
        sections: config sections this stage's results depend on (``""`` = root fields such as the seed); the
            teacher's own section is added by :meth:`config_sections` where it matters.
        after: stages whose results this one reads (their sections are part of this one's fingerprint).
        reads / writes: artifacts, relative to the run directory (documentation, and the test of the layout).
        always_run: recompute on every call (a cheap aggregation of other stages' results), never skip.
    """

    name: ClassVar[str] = ""
    sections: ClassVar[tuple[str, ...]] = ()
    after: ClassVar[tuple[str, ...]] = ()
    reads: ClassVar[tuple[str, ...]] = ()
    writes: ClassVar[tuple[str, ...]] = ()
    always_run: ClassVar[bool] = False  # cheap aggregations (the comparison table) are recomputed every time

    def config_sections(self, cfg: RunConfig) -> tuple[str, ...]:
        """This stage's own sections for ``cfg`` (default :attr:`sections`)."""
        return self.sections

    def identity(self, ctx: Context, **params: Any) -> dict[str, Any]:
        """Extra provenance beyond config sections (e.g. which selection a fine-tune trains on)."""
        return {}

    def folder(self, **params: Any) -> str:
        """The stage's folder in the run directory (relative)."""
        return self.name

    def validate(self, ctx: Context, **params: Any) -> None:
        """Check inputs before anything is written (default: nothing)."""

    def run(self, ctx: Context, **params: Any) -> dict[str, Any]:
        """Compute the stage's artifacts; returns facts for its completion marker (JSON values)."""
        raise NotImplementedError(f"stage {self.name!r} has no run()")

    def skipped_result(self, ctx: Context, **params: Any) -> Any:
        """What running an already finished stage returns (default: its completion marker)."""
        return ctx.store.done_info(self.folder(**params))


class Context:
    """What stages see: ``cfg``, ``store`` (the run directory), ``executor``, ``require`` and artifact readers.

    Args:
        cfg: the validated configuration.
        store: the run directory.
        executor: :class:`~nncift.exec.local.LocalExecutor` or :class:`~nncift.exec.ray_executor.RayExecutor`.
        runner: the runner (``require`` runs a stage it depends on, or skips it when finished).
    """

    def __init__(self, cfg: RunConfig, store: RunDir, executor: Any, runner: Runner):
        self.cfg, self.store, self.executor, self.runner = cfg, store, executor, runner

    # ------------------------------------------------------------------ stages
    def require(self, stage: str, **params: Any) -> Any:
        """Run ``stage`` (and its upstream stages) unless finished; returns its result."""
        return self.runner.run_stage(stage, **params)

    def fan_out(self, worker_cls: type, kwargs: dict[str, Any], todo: list[dict], desc: str, res: Any) -> Any:
        """``executor.map_blocks`` of ``todo`` with the actor resources of a config section ``res``
        (``concurrency``, ``num_cpus``, ``num_gpus``)."""
        return self.executor.map_blocks(
            worker_cls, kwargs, todo, desc=desc, concurrency=res.concurrency, num_cpus=res.num_cpus,
            num_gpus=res.num_gpus,
        )  # fmt: skip

    def size(self) -> tuple[int, int]:
        """(M, N): pool and target sizes from the data stage."""
        d = self.store.done_info("data")
        return int(d["M"]), int(d["N"])

    # ------------------------------------------------------------------ data and embeddings
    def tables(self, columns: list[str] | None = None) -> tuple[pa.Table, pa.Table]:
        """(pool, target) tables: ``id``, ``prompt``, ``response``, ``idx`` (+ ``embedding`` when the input had
        one); ``columns`` reads only those (a million-row embedding column is not read by stages that need
        only the text)."""
        return (
            pq.read_table(self.store.path("data", "pool.parquet"), columns=columns),
            pq.read_table(self.store.path("data", "target.parquet"), columns=columns),
        )

    @functools.cache  # noqa: B019 -- one context per run; the embeddings do not change within it
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

    def items(self) -> tuple[Items, Items]:
        """(pool, target) as :class:`~nncift.influence.Items` (ids, prompts, responses, embeddings)."""
        from nncift.influence import Items

        pool, target = self.tables()
        e_pool, e_target = self.embeddings()
        return tuple(
            Items(t.column("prompt").to_pylist(), t.column("response").to_pylist(), e, t.column("id").to_pylist())
            for t, e in ((pool, e_pool), (target, e_target))
        )

    # ------------------------------------------------------------------ the teacher
    def teacher(self) -> type[InfluenceFunction]:
        """The configured teacher's class (``label.function``)."""
        from nncift.influence import teacher_class

        return teacher_class(self.cfg.label.function)

    def teacher_kwargs(self) -> dict[str, Any]:
        """The teacher's constructor arguments, resolved once in the driver (:meth:`InfluenceFunction.resolve`)."""
        cls = self.teacher()
        section = getattr(self.cfg, cls.name) if cls.config is not None else None
        return cls.resolve(section, self.cfg.label.device)

    def source_teacher(self) -> tuple[type[InfluenceFunction], dict[str, Any]]:
        """The function whose values the teacher gives, and its settings (:meth:`InfluenceFunction.source`: a
        table of DELIFT ICL values answers DELIFT ICL and the settings it was built with)."""
        from nncift.influence import teacher_class

        cls = self.teacher()
        name, settings = cls.source(getattr(self.cfg, cls.name) if cls.config is not None else None)
        return teacher_class(name), settings

    def kind(self):
        """The teacher's :class:`~nncift.labels.kinds.TeacherKind` (pairwise or pointwise labels)."""
        from nncift.labels.kinds import teacher_kind

        return teacher_kind(self.teacher().kind)

    def pointwise(self) -> bool:
        """Whether the teacher scores items (pointwise) rather than pairs."""
        return self.kind().pointwise

    # ------------------------------------------------------------------ labels
    def labels(self, table: pa.Table | None = None) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
        """Per kernel and quadrant (q1..q4, and "diag" / "probe" for K_FF): ((2, P) row/col indices, (P,) raw values).

        K_FF self pairs are dropped from q1..q4 when ``fit.exclude_self_pairs``. Pointwise labels are kernel
        ``item`` with quadrants q1 (training) and q2 (held out); their col index is 0.
        """
        from nncift.labels.tables import read_labels, split_labels

        t = read_labels(self.store) if table is None else table
        return split_labels(t, self.kind(), self.cfg.fit.exclude_self_pairs)

    def diagonal(self) -> np.ndarray | None:
        """(M,) float32 exact K_FF self-utilities from the label stage (``label.diagonal``; never for a teacher that
        pays per item), else None."""
        if not self.cfg.label.diagonal or self.pointwise() or self.teacher().cost_unit == "item":
            return None
        rc, vals = self.labels()["ff"]["diag"]
        m, _ = self.size()
        diag = np.full(m, np.nan, np.float32)
        diag[rc[0]] = vals
        if np.isnan(diag).any():
            raise RuntimeError(f"label stage has {int(np.isnan(diag).sum())} pool items without a diagonal label")
        return diag

    def path(self, stage: str, name: str) -> Path:
        return self.store.path(stage, name)
