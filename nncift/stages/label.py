"""Stage ``label``: the expensive teacher on the planned pairs (or items, for a pointwise teacher).

Reads: ``data/*.parquet``, ``embed/embeddings.safetensors``.
Writes: ``label/plan.json`` (the design, the labeled items, the sets), ``label/blocks/<id>.parquet`` (one
file per finished block, so an interrupted stage resumes), ``label/blocks_active/`` and
``label/active_pairs.parquet`` (``label.design=active``), ``label/probes.json`` and ``label/blocks_probe/`` (the
probe decision of a teacher of unknown nature, ``label.probes=auto``, and its probe columns), ``label/teacher/`` (the teacher's own prepared
state, e.g. LESS's warm-up and gradient features), and ``label/labels.parquet``: ``kernel`` (ff | ft | item),
``quadrant`` (q1..q4 | diag), ``row_id``, ``col_id``, ``row``, ``col``, ``value``.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pyarrow as pa
import pyarrow.compute

from nncift.labels.active import active_round
from nncift.labels.fanout import (
    items_touched,
    label_block_side,
    label_plan,
    label_sections,
    prepare_teacher,
    probes_decided_by_labels,
    run_label_blocks,
    used_items,
)
from nncift.labels.tables import block_key
from nncift.stages.base import Context, Stage
from nncift.store import todo_blocks, write_json

log = logging.getLogger(__name__)


class LabelStage(Stage):
    name = "label"
    sections = ("label",)
    after = ("embed",)
    reads = ("data/pool.parquet", "data/target.parquet", "embed/embeddings.safetensors")
    writes = ("label/plan.json", "label/blocks/", "label/probes.json", "label/teacher/", "label/labels.parquet")

    def config_sections(self, cfg) -> tuple[str, ...]:
        """``label`` and the teacher's own section (``label.function=less`` reads ``less.*``)."""
        return label_sections(cfg)

    def validate(self, ctx: Context, **params: Any) -> None:
        self._kwargs = ctx.teacher_kwargs()  # model folders and table files checked before anything is written

    def run(self, ctx: Context, **params: Any) -> dict[str, Any]:
        from nncift.labels.label_worker import plan_blocks
        from nncift.labels.tables import gather_labels, write_labels

        c = ctx.cfg.label
        m, n = ctx.size()
        kind = ctx.kind()
        plan = label_plan(ctx, decided=False)
        self._write_plan(ctx, plan)
        kwargs = self._prepare(ctx, plan)
        side = label_block_side(ctx)
        specs = plan_blocks(plan, side)
        block_dir = ctx.path("label", "blocks")
        todo = todo_blocks(block_dir, specs, block_key)
        log.info(
            "label (%s design): %d blocks (%d already done), %d train + %d eval + %d diagonal + %d probe %s%s",
            plan.design,
            len(specs),
            len(specs) - len(todo),
            plan.train_pairs,
            plan.eval_pairs,
            plan.diag_pairs,
            plan.probe_pairs,
            kind.unit,
            f" (label.probes=auto: {ctx.source_teacher()[0].name}'s default)"
            if plan.probe_pairs and c.probes == "auto"
            else "",
        )
        run_label_blocks(ctx, plan.sets, specs, todo, block_dir, desc="label", kwargs=kwargs)
        labels = gather_labels(block_dir, len(specs))
        if plan.design == "active":
            second = active_round(ctx, plan, labels)
            plan.sets += second
            specs2 = plan_blocks(SimpleNamespace(sets=second), side)
            block_dir2 = ctx.path("label", "blocks_active")
            todo2 = todo_blocks(block_dir2, specs2, block_key)
            log.info("label (active round 2): %d pairs in %d blocks", sum(s.num_pairs for s in second), len(specs2))
            run_label_blocks(ctx, second, specs2, todo2, block_dir2, desc="label (active)", kwargs=kwargs)
            labels = pa.concat_tables([labels, gather_labels(block_dir2, len(specs2))])
        decision = None
        if probes_decided_by_labels(ctx):
            decision, labels = self._probe_round(ctx, plan, labels, kwargs, side)
            self._write_plan(ctx, plan)
        write_labels(ctx.store, labels)
        return {
            "function": c.function,
            "kind": kind.name,
            "design": plan.design,
            "pairs_labeled": int(labels.num_rows),
            "train_pairs": plan.train_pairs,
            "eval_pairs": plan.eval_pairs,
            "diag_pairs": plan.diag_pairs,
            "probe_pairs": plan.probe_pairs,
            "total_pairs": kind.total(m, n),
            "max_pairs": c.max_pairs,
            "cost_unit": ctx.teacher().cost_unit,
            "items_touched": items_touched(plan),
            "labeled_pool": len(plan.pool_labeled),
            "labeled_target": len(plan.target_labeled),
            "probe_decision": decision,
        }

    @staticmethod
    def _write_plan(ctx: Context, plan) -> None:
        write_json(
            ctx.path("label", "plan.json"),
            {
                "design": plan.design,
                "pool_labeled": plan.pool_labeled,
                "target_labeled": plan.target_labeled,
                "sets": plan.summary(),
            },
        )

    def _probe_round(self, ctx: Context, plan, labels: pa.Table, kwargs: dict, side: int):
        """``label.probes=auto`` on a teacher of unknown nature: decide the probe columns on the K_FF training
        labels (:func:`~nncift.labels.probes.probe_round`), record the decision in ``label/probes.json`` and
        label the columns (``label/blocks_probe/``, resumable). Returns (decision, labels with the probes);
        ``plan`` gains the probe sets."""
        from nncift.labels.label_worker import plan_blocks
        from nncift.labels.probes import probe_round
        from nncift.labels.tables import gather_labels

        m = ctx.size()[0]
        q1 = labels.filter(
            pa.compute.and_(
                pa.compute.equal(labels.column("kernel"), "ff"), pa.compute.equal(labels.column("quadrant"), "q1")
            )
        )
        decision, sets = probe_round(m, plan, q1.column("row").to_numpy(), q1.column("col").to_numpy(),
                                     q1.column("value").to_numpy(), ctx.cfg.seed, ctx.cfg.label.max_pairs)  # fmt: skip
        pairs = sum(s.num_pairs for s in sets)
        write_json(ctx.path("label", "probes.json"), decision)
        log.info("label.probes=auto (%s, a teacher of unknown nature): %d probe columns: %s",
                 ctx.source_teacher()[0].name, decision["probes"], decision["reason"])  # fmt: skip
        if not sets:
            return decision, labels
        plan.sets += sets
        kwargs = self._prepare(ctx, plan)  # the probe columns touch every pool item
        specs = plan_blocks(SimpleNamespace(sets=sets), side)
        block_dir = ctx.path("label", "blocks_probe")
        todo = todo_blocks(block_dir, specs, block_key)
        log.info("label (probe columns): %d pairs in %d blocks (%d already done)", pairs, len(specs),
                 len(specs) - len(todo))  # fmt: skip
        run_label_blocks(ctx, sets, specs, todo, block_dir, desc="label (probes)", kwargs=kwargs)
        return decision, pa.concat_tables([labels, gather_labels(block_dir, len(specs))])

    def _prepare(self, ctx: Context, plan) -> dict[str, Any]:
        """The teacher's driver-side preparation over the items any label of ``plan`` touches."""
        return prepare_teacher(ctx, *used_items(plan), kwargs=self._kwargs)
