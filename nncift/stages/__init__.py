"""The stages of a run, in order. Each is an object (:class:`~nncift.stages.base.Stage`) in its own module,
declaring its name, config sections, upstream stages, and the artifacts it reads and writes; the one runner
(:class:`nncift.runner.Runner`) owns fingerprints, skip/resume, markers and timing for all of them.

Pipeline (``nncift run``): data -> embed -> label -> fit -> choose -> estimate -> select -> report.
Per subset (``nncift finetune|evaluate|compare``): exact (the teacher's own selection) -> finetune -> evaluate
-> compare.
New data scored against a finished run (``nncift score``, ``nncift select --scored``): score -> score_select.
"""

from __future__ import annotations

from nncift.stages.base import Context, Stage
from nncift.stages.choose import ChooseStage
from nncift.stages.compare import CompareStage
from nncift.stages.data import DataStage
from nncift.stages.embed import EmbedStage
from nncift.stages.estimate import EstimateStage
from nncift.stages.evaluate import EvaluateStage
from nncift.stages.exact import ExactSelectStage
from nncift.stages.finetune import FinetuneStage
from nncift.stages.fit import FitStage
from nncift.stages.label import LabelStage
from nncift.stages.report import ReportStage
from nncift.stages.score import ScoredSelectStage, ScoreStage
from nncift.stages.select import SelectStage

PIPELINE: tuple[Stage, ...] = (
    DataStage(),
    EmbedStage(),
    LabelStage(),
    FitStage(),
    ChooseStage(),
    EstimateStage(),
    SelectStage(),
    ReportStage(),
)
SUBSET_STAGES: tuple[Stage, ...] = (ExactSelectStage(), FinetuneStage(), EvaluateStage(), CompareStage())
SCORE_STAGES: tuple[Stage, ...] = (ScoreStage(), ScoredSelectStage())
STAGES: dict[str, Stage] = {s.name: s for s in (*PIPELINE, *SUBSET_STAGES, *SCORE_STAGES)}

__all__ = ["PIPELINE", "SCORE_STAGES", "STAGES", "SUBSET_STAGES", "Context", "Stage"]
