"""The label fan-out shared by the label, choose and exact stages: the run's label plan, the teacher's
driver-side preparation, cost-sized blocks, and the resumable map of label blocks on the run's executor."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute

from nncift.errors import ConfigError
from nncift.store import write_parquet

if TYPE_CHECKING:
    from nncift.stages.base import Context

from nncift.labels.tables import block_key
from nncift.store import todo_blocks

log = logging.getLogger(__name__)


def label_sections(cfg) -> tuple[str, ...]:
    """The config sections a teacher's labels depend on: ``label`` and the teacher's own section
    (``label.function=less`` reads ``less.*``)."""
    from nncift.influence import teacher_class

    cls = teacher_class(cfg.label.function)
    return ("label", cls.name) if cls.config is not None else ("label",)


def items_touched(plan) -> dict[str, int]:
    """Distinct items the plan's labels touch (what a per-item teacher pays for): ``labeled`` (training items of
    both sides), ``report`` (held-out items only the Q2-Q4 report reads), ``total``."""
    pool, target = used_items(plan)
    labeled = len(plan.pool_labeled) + len(plan.target_labeled)
    total = len(pool) + len(target)
    return {"labeled": labeled, "report": total - labeled, "total": total}


def probes_decided_by_labels(ctx: Context) -> bool:
    """``label.probes=auto`` on a pairwise, per-pair teacher of unknown nature (its ``auto_probes`` is None: a
    table without provenance, a plugin): the label stage decides the probe columns on the run's own training
    labels (:func:`nncift.labels.probes.decide_probes`) and records the decision in ``label/probes.json``."""
    c = ctx.cfg.label
    if c.probes != "auto" or c.fraction >= 1.0 or ctx.pointwise() or ctx.teacher().cost_unit == "item":
        return False
    cls = ctx.source_teacher()[0]
    return cls.auto_probes is None and not cls.symmetric


def probe_decision(ctx: Context) -> dict | None:
    """The label stage's recorded decision (``label/probes.json``), or None before it was made."""
    import json

    path = ctx.path("label", "probes.json")
    return json.loads(path.read_text()) if path.is_file() else None


def label_probes(ctx: Context) -> int:
    """``label.probes`` resolved: ``auto`` is the teacher's :attr:`~nncift.influence.interface.InfluenceFunction.auto_probes`
    (4 for DELIFT ICL and for a table of its values, 0 for DELIFT-SE and declared-symmetric teachers); for a
    teacher of unknown nature, the label stage's decision (0 before it was made)."""
    p = ctx.cfg.label.probes
    if p != "auto":
        return int(p)
    if probes_decided_by_labels(ctx):
        return int((probe_decision(ctx) or {}).get("probes", 0))
    return ctx.source_teacher()[0].auto_probes or 0


def label_plan(ctx: Context, decided: bool = True):
    """The run's label plan (:func:`nncift.labels.plan.plan_labels` or ``plan_items``, capped by ``label.max_pairs``):
    deterministic in the configuration (and, for a teacher of unknown nature, the label stage's recorded probe
    decision, appended after the cap), so later stages recompute it instead of reading it back. ``decided=False``:
    the plan's first round, before any probe decision (the label stage's own)."""
    from nncift.labels.plan import cap_plan, plan_items, plan_labels, probe_sets

    c = ctx.cfg.label
    m, n = ctx.size()
    by_labels = False
    if ctx.pointwise():
        plan = plan_items(m, c.fraction, c.min_count, c.eval_pairs, ctx.cfg.seed)
    else:
        item_cost = ctx.teacher().cost_unit == "item"
        by_labels = probes_decided_by_labels(ctx)
        probes = 0 if by_labels else label_probes(ctx)
        if item_cost and (c.diagonal or probes):
            log.info("label: %s pays per item: no diagonal or probe columns (they would touch every pool item)",
                     c.function)  # fmt: skip
        plan = plan_labels(m, n, c.fraction, c.min_count, c.eval_pairs, ctx.cfg.seed, design=c.design,
                           partners=c.partners, diagonal=c.diagonal and not item_cost, probes=0 if item_cost else probes,
                           item_cost=item_cost)  # fmt: skip
    try:
        plan = cap_plan(plan, c.max_pairs, ctx.cfg.seed)
    except ValueError as exc:
        raise ConfigError(f"config field 'label.max_pairs': {exc}") from None
    if by_labels and decided and label_probes(ctx):
        plan.sets += probe_sets(m, plan.pool_labeled, label_probes(ctx), ctx.cfg.seed)
    return plan


def used_items(plan) -> tuple[np.ndarray, np.ndarray]:
    """(pool, target) int64 indices of the items any label of ``plan`` touches (for the active design, every
    labeled item: its second round draws among them)."""
    used_pool = np.unique(
        np.concatenate(
            [np.asarray(s.rows) for s in plan.sets]
            + [np.asarray(s.cols) for s in plan.sets if s.kernel == "ff"]
            + [np.zeros(0, np.int64)]
        )
    )
    used_target = np.unique(
        np.concatenate([np.asarray(s.cols) for s in plan.sets if s.kernel == "ft"] + [np.zeros(0, np.int64)])
    )
    if plan.design == "active":
        used_pool = np.union1d(used_pool, plan.pool_labeled)
        used_target = np.union1d(used_target, plan.target_labeled)
    return used_pool.astype(np.int64), used_target.astype(np.int64)


def prepare_teacher(ctx: Context, used_pool: np.ndarray, used_target: np.ndarray, kwargs: dict | None = None) -> dict:
    """The teacher's driver-side preparation (:meth:`InfluenceFunction.prepare`) over the given items;
    resumable in ``label/teacher/``. Returns the keyword arguments label workers build the teacher with."""
    from nncift.influence.interface import InfluenceFunction

    kwargs = ctx.teacher_kwargs() if kwargs is None else kwargs
    cls = ctx.teacher()
    if cls.prepare.__func__ is InfluenceFunction.prepare.__func__:  # nothing to prepare: no item lists built
        return kwargs
    pool, target = ctx.items()
    return cls.prepare(
        kwargs,
        pool=pool,
        target=target,
        pool_labeled=np.asarray(used_pool, np.int64),
        target_labeled=np.asarray(used_target, np.int64),
        work_dir=ctx.path("label", "teacher"),
        executor=ctx.executor,
        seed=ctx.cfg.seed,
    )


def teacher_kwargs_for(ctx: Context, extra_pool: np.ndarray | None = None, extra_target: np.ndarray | None = None):
    """The prepared teacher for labels beyond the plan (the choose stage's): the plan's items plus the extra
    ones (teachers without a prepare hook: their plain keyword arguments)."""
    pool, target = used_items(label_plan(ctx))
    if extra_pool is not None:
        pool = np.union1d(pool, extra_pool)
    if extra_target is not None:
        target = np.union1d(target, extra_target)
    return prepare_teacher(ctx, pool, target)


def label_block_side(ctx: Context) -> int:
    """Label blocks sized by cost: ``label.block_seconds`` at the teacher's pairs/s, capped by ``block_size``."""
    from nncift.labels.label_worker import block_side

    c = ctx.cfg.label
    pps = c.pairs_per_second or ctx.teacher().pairs_per_second
    return block_side(c.block_size, c.block_seconds, pps)


def run_label_blocks(
    ctx: Context, sets: list, specs: list[dict], todo: list[dict], block_dir: Path, desc: str, kwargs: dict
) -> None:
    """Label the ``todo`` blocks of ``sets`` (LabelSet-like) with the teacher, on the run's executor; each
    block lands in ``block_dir`` as one Parquet file as soon as it finishes."""
    from nncift.labels.label_worker import LabelWorker

    c = ctx.cfg.label
    pool, target = ctx.tables(["id", "prompt", "response"])
    e_pool, e_target = ctx.embeddings()

    def side(t: pa.Table, e: np.ndarray) -> dict:
        cols = {k: t.column(k).combine_chunks() for k in ("id", "prompt", "response")}  # Arrow, not Python str
        return {"ids": cols["id"], "prompts": cols["prompt"], "responses": cols["response"], "embeddings": e}

    worker_kwargs = {
        "function": c.function,
        "function_kwargs": kwargs,
        "pool": side(pool, e_pool),
        "target": side(target, e_target),
        "sets": [s.to_dict() for s in sets],
        "out_dir": str(block_dir),
    }
    if todo:  # pairs the teacher cannot label (a table without them) are refused here, before any worker starts
        ctx.teacher().check_pairs(kwargs, worker_kwargs["sets"], pool.column("id"), target.column("id"))
    ctx.executor.map_blocks(
        LabelWorker, worker_kwargs, todo, desc=desc, concurrency=c.concurrency, num_cpus=c.num_cpus, num_gpus=c.num_gpus
    )


def label_sets(ctx: Context, sets: list, extra_pool: np.ndarray, extra_target: np.ndarray) -> tuple[pa.Table, float]:
    """Label the choose stage's sets with the teacher (resumable blocks in ``choose/blocks/``, gathered into
    ``choose/labels.parquet``); a teacher with a prepare hook is prepared for the extra items first.

    Returns:
        (the labels, the teacher's seconds: preparation included).
    """
    import time

    from nncift.labels.label_worker import plan_blocks
    from nncift.labels.tables import LABEL_SCHEMA, gather_labels

    if not sets:
        return LABEL_SCHEMA.empty_table(), 0.0
    specs = plan_blocks(SimpleNamespace(sets=sets), label_block_side(ctx))
    block_dir = ctx.path("choose", "blocks")
    todo = todo_blocks(block_dir, specs, block_key)
    log.info("choose: %d teacher %s for the held-out criterion (%d blocks, %d already done)",
             sum(s.num_pairs for s in sets), ctx.kind().unit, len(specs),
             len(specs) - len(todo))  # fmt: skip
    t0 = time.perf_counter()
    kwargs = teacher_kwargs_for(ctx, extra_pool, extra_target)
    run_label_blocks(ctx, sets, specs, todo, block_dir, desc="label (choose)", kwargs=kwargs)
    seconds = time.perf_counter() - t0
    table = gather_labels(block_dir, len(specs))
    write_parquet(ctx.path("choose", "labels.parquet"), table)
    return table, seconds
