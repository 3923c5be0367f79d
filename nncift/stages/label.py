"""Stage ``label``: the expensive teacher on the planned pairs (or items, for a pointwise teacher).

Reads: ``data/*.parquet``, ``embed/embeddings.safetensors``.
Writes: ``label/plan.json`` (the design, the labeled items, the sets), ``label/blocks/<id>.parquet`` (one
file per finished block, so an interrupted stage resumes), ``label/blocks_active/`` and
``label/active_pairs.parquet`` (``label.design=active``), ``label/teacher/`` (the teacher's own prepared
state, e.g. LESS's warm-up and gradient features), and ``label/labels.parquet``: ``kernel`` (ff | ft | item),
``quadrant`` (q1..q4 | diag), ``row_id``, ``col_id``, ``row``, ``col``, ``value``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute
import pyarrow.parquet as pq

from nncift.errors import ConfigError, NnciftError
from nncift.stages.base import Context, Stage
from nncift.store import done_blocks, write_json, write_parquet

log = logging.getLogger(__name__)


class LabelStage(Stage):
    name = "label"
    sections = ("label",)
    after = ("embed",)
    reads = ("data/pool.parquet", "data/target.parquet", "embed/embeddings.safetensors")
    writes = ("label/plan.json", "label/blocks/", "label/teacher/", "label/labels.parquet")

    def config_sections(self, cfg) -> tuple[str, ...]:
        """``label`` and the teacher's own section (``label.function=less`` reads ``less.*``)."""
        from nncift.influence import teacher_class

        cls = teacher_class(cfg.label.function)
        return ("label", cls.name) if cls.config is not None else ("label",)

    def validate(self, ctx: Context, **params: Any) -> None:
        self._kwargs = ctx.teacher_kwargs()  # model folders and table files checked before anything is written

    def run(self, ctx: Context, **params: Any) -> dict[str, Any]:
        from nncift.labels.worker import gather_labels, plan_blocks

        c = ctx.cfg.label
        m, n = ctx.size()
        pointwise = ctx.pointwise()
        plan = label_plan(ctx)
        write_json(
            ctx.path("label", "plan.json"),
            {
                "design": plan.design,
                "pool_labeled": plan.pool_labeled,
                "target_labeled": plan.target_labeled,
                "sets": plan.summary(),
            },
        )
        kwargs = self._prepare(ctx, plan)
        side = label_block_side(ctx)
        specs = plan_blocks(plan, side)
        block_dir = ctx.path("label", "blocks")
        ok = done_blocks(block_dir, {f"{s['block_id']:06d}.parquet": s["pairs"] for s in specs})
        todo = [s for s in specs if f"{s['block_id']:06d}.parquet" not in ok]
        log.info(
            "label (%s design): %d blocks (%d already done), %d train + %d eval + %d diagonal %s",
            plan.design,
            len(specs),
            len(specs) - len(todo),
            plan.train_pairs,
            plan.eval_pairs,
            plan.diag_pairs,
            "items" if pointwise else "pairs",
        )
        run_label_blocks(ctx, plan.sets, specs, todo, block_dir, desc="label", kwargs=kwargs)
        labels = gather_labels(block_dir, len(specs))
        if plan.design == "active":
            second = active_round(ctx, plan, labels)
            plan.sets += second
            specs2 = plan_blocks(SimpleNamespace(sets=second), side)
            block_dir2 = ctx.path("label", "blocks_active")
            ok2 = done_blocks(block_dir2, {f"{s['block_id']:06d}.parquet": s["pairs"] for s in specs2})
            todo2 = [s for s in specs2 if f"{s['block_id']:06d}.parquet" not in ok2]
            log.info("label (active round 2): %d pairs in %d blocks", sum(s.num_pairs for s in second), len(specs2))
            run_label_blocks(ctx, second, specs2, todo2, block_dir2, desc="label (active)", kwargs=kwargs)
            labels = pa.concat_tables([labels, gather_labels(block_dir2, len(specs2))])
        write_parquet(ctx.path("label", "labels.parquet"), labels)
        return {
            "function": c.function,
            "kind": "pointwise" if pointwise else "pairwise",
            "design": plan.design,
            "pairs_labeled": int(labels.num_rows),
            "train_pairs": plan.train_pairs,
            "eval_pairs": plan.eval_pairs,
            "diag_pairs": plan.diag_pairs,
            "probe_pairs": plan.probe_pairs,
            "total_pairs": m if pointwise else m * m + m * n,
            "max_pairs": c.max_pairs,
            "cost_unit": ctx.teacher().cost_unit,
            "items_touched": _items_touched(plan),
            "labeled_pool": len(plan.pool_labeled),
            "labeled_target": len(plan.target_labeled),
        }

    def _prepare(self, ctx: Context, plan) -> dict[str, Any]:
        """The teacher's driver-side preparation over the items any label of ``plan`` touches."""
        return prepare_teacher(ctx, *used_items(plan), kwargs=self._kwargs)


def _items_touched(plan) -> dict[str, int]:
    """Distinct items the plan's labels touch (what a per-item teacher pays for): ``labeled`` (training items of
    both sides), ``report`` (held-out items only the Q2-Q4 report reads), ``total``."""
    pool, target = used_items(plan)
    labeled = len(plan.pool_labeled) + len(plan.target_labeled)
    total = len(pool) + len(target)
    return {"labeled": labeled, "report": total - labeled, "total": total}


def label_plan(ctx: Context):
    """The run's label plan (:func:`nncift.labels.plan.plan_labels` or ``plan_items``, capped by ``label.max_pairs``):
    deterministic in the configuration, so later stages recompute it instead of reading it back."""
    from nncift.labels.plan import cap_plan, plan_items, plan_labels

    c = ctx.cfg.label
    m, n = ctx.size()
    if ctx.pointwise():
        plan = plan_items(m, c.fraction, c.min_count, c.eval_pairs, ctx.cfg.seed)
    else:
        item_cost = ctx.teacher().cost_unit == "item"
        if item_cost and (c.diagonal or c.probes):
            log.info("label: %s pays per item: no diagonal or probe columns (they would touch every pool item)",
                     c.function)  # fmt: skip
        plan = plan_labels(m, n, c.fraction, c.min_count, c.eval_pairs, ctx.cfg.seed, design=c.design,
                           partners=c.partners, diagonal=c.diagonal and not item_cost, probes=0 if item_cost else c.probes,
                           item_cost=item_cost)  # fmt: skip
    try:
        return cap_plan(plan, c.max_pairs, ctx.cfg.seed)
    except ValueError as exc:
        raise ConfigError(f"config field 'label.max_pairs': {exc}") from None


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
    from nncift.labels.worker import block_side

    c = ctx.cfg.label
    pps = c.pairs_per_second or ctx.teacher().pairs_per_second
    return block_side(c.block_size, c.block_seconds, pps)


def run_label_blocks(
    ctx: Context, sets: list, specs: list[dict], todo: list[dict], block_dir: Path, desc: str, kwargs: dict
) -> None:
    """Label the ``todo`` blocks of ``sets`` (LabelSet-like) with the teacher, on the run's executor; each
    block lands in ``block_dir`` as one Parquet file as soon as it finishes."""
    from nncift.labels.worker import LabelWorker

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


def active_round(ctx: Context, plan, labels: pa.Table) -> list:
    """Second round of ``label.design=active``: fit a surrogate on round 1 (the local fit loop, the run's fit
    configuration), then choose, for every labeled row, the ``partners - partners // 2`` labeled columns it
    predicts highest that round 1 did not label (:func:`nncift.labels.active.top_predicted_pairs`).

    The chosen pairs are saved in ``label/active_pairs.parquet`` before any is labeled, so a resumed run
    labels the same pairs. Returns paired :class:`~nncift.labels.plan.LabelSet` (quadrant q1), one per kernel.
    """
    from nncift.labels.active import second_round
    from nncift.labels.plan import LabelSet
    from nncift.stages.fit import fit_config

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


def export_table(ctx: Context, out: str | Path) -> dict:
    """Write the run's teacher labels as a table file (``example_id, target_id, value``) for
    ``label.function=table`` / ``fidelity.truth_table``, with its provenance in ``<out>.json``.

    Returns:
        the provenance dict (pairs, teacher, its settings, data config, label seconds).
    """
    from nncift.influence.table import labels_to_table

    done = ctx.store.done_info("label")
    if done is None:
        raise NnciftError(f"{ctx.store.root}: the label stage is not finished; run `nncift label` first")
    if done.get("kind") == "pointwise":
        raise NnciftError(f"{ctx.store.root}: a pointwise teacher's labels are item scores, not a pair table")
    labels = pq.read_table(ctx.path("label", "labels.parquet"))
    table = labels_to_table(labels)
    out = Path(out)
    recorded = done["provenance"]  # the configuration the labels were computed with
    lab, data = recorded["label"], recorded["data"]
    m, n = ctx.size()
    prov = {
        "pairs": table.num_rows,
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
    write_parquet(out, table, metadata={"nncift_table": prov})
    write_json(out.with_suffix(".json"), prov)
    return prov


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
