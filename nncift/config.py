"""One typed configuration for the whole pipeline.

A :class:`RunConfig` groups one dataclass per stage. It is filled from YAML and ``--set key=value``
overrides (:func:`load_config`), validated at the boundary (:meth:`RunConfig.validate`: each section checks
its own fields, the run the rules between sections), saved next to the outputs, and fingerprinted per stage
so that a resumed run can refuse a changed configuration.

The names a choice accepts come from the registry of the code it selects (as scikit-learn's
``_parameter_constraints``): ``data.format`` from :data:`nncift.corpus.readers.FORMATS`, ``label.design`` from
:data:`nncift.labels.plan.DESIGNS`, ``fit.kind`` from :data:`nncift.surrogate.network.NETWORKS`,
``estimate.layout`` / ``select.algorithm`` from :mod:`nncift.selection.from_kernels`, ``select.objective``
from :data:`nncift.selection.greedy.OBJECTIVES` (imported when validating, not with this module). The actor
settings (``concurrency``, ``num_cpus``, ``num_gpus``, ``device``) are defined once, in :class:`Resources`.

Fields whose ``metadata`` holds ``provenance=False`` (parallelism, devices) do not change results and are
left out of the fingerprints: a run may be resumed with more actors or on a GPU.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from nncift.errors import ConfigError

RUNTIME = {"provenance": False}


def _f(default: Any, help: str, runtime: bool = False) -> Any:
    meta = {"help": help}
    if runtime:
        meta.update(RUNTIME)
    return field(default=default, metadata=meta)


Need = Callable[[bool, str, str], None]
"""``need(condition, field, message)``: a ConfigError naming the field unless the condition holds."""


def _need(prefix: str) -> Need:
    """A :data:`Need` for the fields of one section (``prefix`` "label." -> "config field 'label.fraction'")."""

    def need(cond: bool, key: str, msg: str) -> None:
        if not cond:
            raise ConfigError(f"config field '{prefix}{key}': {msg}")

    return need


def _is_device(dev: str) -> bool:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto``."""
    return dev in {"auto", "cpu", "cuda"} or (dev.startswith("cuda:") and dev[len("cuda:") :].isdigit())


@dataclass
class Resources:
    """What the actors of one stage (a Ray Data actor pool) ask for and run on, defined once: the help, the
    runtime metadata (out of the fingerprints) and the checks of each field.

    A section running actors takes the fields it has, with its own default, by :meth:`field`; they stay the
    section's own YAML keys (``label.concurrency``, ``embed.device``, ...) in the section's own order, so saved
    configurations read and fingerprint as before::

        concurrency: int = Resources.field("concurrency", 2)

    and its ``validate`` calls :meth:`check`, which names the section's field (``label.concurrency``).
    """

    concurrency: int = _f(1, "Ray Data actors", runtime=True)
    num_cpus: float = _f(1.0, "CPUs per actor", runtime=True)
    num_gpus: float = _f(0.0, "GPUs per actor", runtime=True)
    device: str = _f("cpu", "cpu | cuda | cuda:N | auto (cuda where num_gpus gave a GPU, else cpu)", runtime=True)

    @staticmethod
    def field(name: str, default: Any = None) -> Any:
        """The field ``name`` of :class:`Resources` for a section: the same help and metadata, ``default``
        (None: the one here). The section annotates it with the same type (tests/test_registry.py checks)."""
        f = {f.name: f for f in dataclasses.fields(Resources)}[name]
        return dataclasses.field(default=f.default if default is None else default, metadata=f.metadata)

    @staticmethod
    def check(section: Any, need: Need) -> None:
        """Check the :class:`Resources` fields that ``section`` has (``need`` names them in the section)."""
        have = {f.name for f in dataclasses.fields(section)}
        if "concurrency" in have:
            need(section.concurrency >= 1, "concurrency", f"must be >= 1, got {section.concurrency}")
        if "num_cpus" in have:
            need(section.num_cpus > 0, "num_cpus", f"must be positive, got {section.num_cpus}")
        if "num_gpus" in have:
            need(section.num_gpus >= 0, "num_gpus", f"must be >= 0, got {section.num_gpus}")
        if "device" in have:
            need(_is_device(section.device), "device", f"got {section.device!r} (cpu | cuda | cuda:N | auto)")

    def validate(self, need: Need) -> None:
        Resources.check(self, need)


@dataclass
class DataConfig:
    """Where the pool D_F and the target D_T come from."""

    input: str | None = _f(
        None,
        "pool corpus: a file (JSONL/JSON/Parquet/ShareGPT), a directory of shards, a glob or an HF dataset dir; local or a pyarrow.fs URI (s3://, gs://, hdfs://, file://); None = embedded ShareGPT",
    )
    target: str | None = _f(None, "target corpus path; None = a seeded split of `input`")
    format: str = _f("auto", "auto | jsonl | json | parquet | hf | sharegpt")
    split: str = _f("train", "split to read from a saved HF DatasetDict")
    id_field: str | None = _f(None, "field holding a unique id; None = 'id' if present, else a content hash")
    embedding_field: str | None = _f(
        None,
        "field holding a precomputed embedding (a list of floats), kept as column `embedding` (embed.source=column)",
    )
    prompt_field: str | None = _f(None, "prompt field; None = auto (instruction+input | prompt | conversations)")
    input_field: str | None = _f(None, "optional field appended to the prompt (Alpaca 'input')")
    response_field: str | None = _f(None, "response field; None = auto (output | response | conversations)")
    pool_size: int | None = _f(2000, "rows of D_F (M); None = all remaining rows")
    target_size: int | None = _f(500, "rows of D_T (N); None = all rows of `target`")
    max_chars: int = _f(4000, "truncate prompt and response to this many characters (0 = no limit)")
    test: str | None = _f(None, "held-out test corpus for `nncift evaluate`; None = carved from the inputs")
    test_size: int = _f(200, "rows of the held-out test split (disjoint from D_F and D_T; 0 = none)")
    read_block_bytes: int = _f(
        64 * 2**20,
        "bytes of one read task: a JSONL file is cut into line-aligned ranges, a Parquet file into runs of row "
        "groups, of about this size (JSON/ShareGPT/HF inputs are one task per file); results do not depend on it",
        runtime=True,
    )
    partitions: int | None = _f(
        None,
        "hash buckets of the exact deduplication (one worker task each); None = one per 4 Mi rows; results do "
        "not depend on it",
        runtime=True,
    )
    concurrency: int = Resources.field("concurrency", 2)

    def validate(self, need: Need) -> None:
        from nncift.corpus.readers import FORMATS

        need(self.format == "auto" or self.format in FORMATS, "format", f"got {self.format!r}")
        for k in ("pool_size", "target_size"):
            v = getattr(self, k)
            need(v is None or v > 0, k, f"must be positive or null, got {v}")
        need(self.max_chars >= 0, "max_chars", "must be >= 0")
        need(self.test_size >= 0, "test_size", "must be >= 0")
        need(self.read_block_bytes >= 1, "read_block_bytes", f"must be >= 1, got {self.read_block_bytes}")
        need(
            self.partitions is None or self.partitions >= 1,
            "partitions",
            f"must be >= 1 or null, got {self.partitions}",
        )
        Resources.check(self, need)


@dataclass
class EmbedConfig:
    """Sentence embeddings shared by every influence function and the network."""

    source: str = _f("model", "model (encode the texts) | column (the inputs' data.embedding_field, L2-normalised)")
    model: str = _f("all-MiniLM-L6-v2", "embedded model name or a local sentence-transformers directory")
    template: str = _f("{prompt}\n{response}", "text embedded for each row")
    batch_size: int = _f(64, "rows per encoder batch")
    max_seq_length: int = _f(128, "encoder token limit (all-MiniLM-L6-v2 was trained with 128)")
    device: str = Resources.field("device")
    concurrency: int = Resources.field("concurrency", 2)
    num_cpus: float = Resources.field("num_cpus")
    num_gpus: float = Resources.field("num_gpus")

    def validate(self, need: Need) -> None:
        need(self.batch_size > 0, "batch_size", "must be positive")
        need(self.source in {"model", "column"}, "source", f"got {self.source!r} (model | column)")
        Resources.check(self, need)


@dataclass
class LabelConfig:
    """Seed labeling: the expensive influence function on a u-fraction of rows and columns."""

    function: str = _f(
        "delift_se", "teacher: delift_se | delift_icl | table | less | selectit (its settings: section <function>.*)"
    )
    design: str = _f(
        "spread",
        "training pairs: spread (see `partners`) | block (all pairs of the labeled items) | active (spread with "
        "half the partners, then the other half on each row's top pairs predicted by a round-1 surrogate)",
    )
    fraction: float = _f(0.9, "u: fraction of D_F and of D_T whose items are labeled (the rest is held out)")
    min_count: int = _f(200, "design=block: floor on labeled items per side (the paper's u=0.05 is too few)")
    partners: int = _f(20, "design=spread: each labeled example is paired with this many labeled targets")
    diagonal: bool = _f(True, "label the exact K_FF self-utilities U(i -> i) of every pool item (M teacher calls)")
    probes: str = _f(
        "auto",
        "probe examples: each labeled as the in-context example of every pool item (probes x M "
        "pairs, one shared prefix each), measuring every item's per-target effect (the additive estimate); "
        "auto = 4 for DELIFT ICL (or a table of its values), 0 for DELIFT-SE, and for a teacher of unknown nature "
        "(a table without provenance, a plugin) 4 when its training labels measured both ways are asymmetric, else 0",
    )
    eval_pairs: int = _f(4000, "pairs sampled per quadrant Q2-Q4 and kernel for the fidelity report")
    max_pairs: int | None = _f(
        None,
        "cap on all teacher pairs (items, pointwise) of the plan; training labels share what Q2-Q4 and "
        "the diagonal leave; None = no cap",
    )
    block_size: int = _f(128, "largest side of a label block (rows and columns)")
    block_seconds: float = _f(120.0, "target teacher seconds per label block: blocks are sized by cost")
    pairs_per_second: float | None = _f(
        None, "teacher pairs/s used to size blocks; None = the function's default (delift_icl 5 on 2 CPU cores)"
    )
    concurrency: int = Resources.field("concurrency")
    num_cpus: float = Resources.field("num_cpus")
    num_gpus: float = Resources.field("num_gpus")
    device: str = Resources.field("device")  # the teacher's

    def validate(self, need: Need) -> None:
        from nncift.labels.plan import DESIGNS

        known = _plain_teachers()
        need(self.function in known, "function",
             f"unknown function {self.function!r} (known: {', '.join(sorted(known))})")  # fmt: skip
        need(self.design in DESIGNS, "design", f"got {self.design!r} ({' | '.join(DESIGNS)})")
        need(self.partners >= 1, "partners", "must be >= 1")
        need(self.probes == "auto" or self.probes.isdigit(), "probes", f"got {self.probes!r} (auto or an integer >= 0)")
        need(0.0 < self.fraction <= 1.0, "fraction", f"must be in (0, 1], got {self.fraction}")
        need(self.min_count >= 2, "min_count", "must be >= 2")
        need(self.block_size > 0, "block_size", "must be positive")
        need(self.block_seconds > 0, "block_seconds", "must be positive")
        need(self.pairs_per_second is None or self.pairs_per_second > 0, "pairs_per_second", "must be positive")
        need(self.eval_pairs >= 0, "eval_pairs", "must be >= 0")
        need(self.max_pairs is None or self.max_pairs > 0, "max_pairs", "must be positive or null")
        need(
            self.max_pairs is None or not DESIGNS.get(self.design).second_round,
            "max_pairs",
            f"is not supported with label.design={self.design} yet (its second round is planned after the first fit)",
        )
        Resources.check(self, need)


@dataclass
class FitConfig:
    """The surrogate (InfluenceNetwork) and its fit (stage ``fit``)."""

    kind: str = _f("bilinear", "surrogate: bilinear (two towers, low rank) | mlp (the paper's InfluenceNetwork)")
    hidden: int = _f(100, "kind=mlp: hidden units")
    rank: int = _f(256, "kind=bilinear: tower width")
    symmetric: str = _f("auto", "kind=bilinear: one shared tower (auto = when the teacher is symmetric) | true | false")
    cosine_prior: bool = _f(True, "kind=bilinear: add a learned multiple of the embedding cosine")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    epochs: int = _f(60, "maximum epochs")
    lr: float = _f(1e-3, "Adam learning rate")
    batch_size: int = _f(256, "pairs per optimizer step (global: all Ray Train workers together)")
    val_fraction: float = _f(0.1, "fraction of Q1 labels held out for early stopping")
    patience: int = _f(3, "epochs without validation improvement before stopping")
    seed: int = _f(0, "initialisation and shuffling seed")
    exclude_self_pairs: bool = _f(True, "drop K_FF (i, i) pairs from training and evaluation (trivially maximal)")
    num_workers: int = _f(2, "Ray Train workers (DDP)", runtime=True)
    use_gpu: bool = _f(False, "train on GPUs", runtime=True)
    device: str = _f(
        "auto",
        "device of the local executor's fit: auto (cuda when use_gpu and CUDA is available, else cpu) | cpu | "
        "cuda | cuda:N; the Ray executor places its workers by use_gpu",
        runtime=True,
    )

    def validate(self, need: Need) -> None:
        from nncift.surrogate.network import NETWORKS

        kinds = [name for name, net in NETWORKS.items() if not net.pointwise]  # pointwise: set by the teacher
        need(self.kind in kinds, "kind", f"got {self.kind!r} ({' | '.join(kinds)})")
        need(self.rank >= 1, "rank", "must be >= 1")
        need(self.symmetric in {"auto", "true", "false"}, "symmetric", f"got {self.symmetric!r} (auto | true | false)")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(self.hidden > 0, "hidden", "must be positive")
        need(self.epochs > 0, "epochs", "must be positive")
        need(self.lr > 0, "lr", "must be positive")
        need(self.batch_size > 0, "batch_size", "must be positive")
        need(0.0 < self.val_fraction < 0.5, "val_fraction", "must be in (0, 0.5)")
        need(self.num_workers >= 1, "num_workers", "must be >= 1")
        need(_is_device(self.device), "device", f"got {self.device!r} (auto | cpu | cuda | cuda:N)")


@dataclass
class ChooseConfig:
    """Stage ``choose``: which estimate the run keeps, decided on its own held-out labels (nncift.surrogate.candidates)."""

    mode: str = _f(
        "held_out",
        "held_out (candidates scored on held-out rows, the best kept within noise, free first) | surrogate (always "
        "the fitted network, no extra labels: the paper's behaviour) | a candidate name (forced, e.g. diag_cosine)",
    )
    candidates: str = _f(
        "auto", "auto (every applicable one) | comma-separated names of nncift.surrogate.candidates.CANDIDATES"
    )
    views: str = _f("lexical", "extra item views offered as free candidates: lexical | none")
    lexical: str = _f(
        "word,char",
        "the lexical view's blocks, each 256 wide and calibrated with its own weight on the run's labels: "
        "comma-separated word (word 1-2-grams) | char (character 3-5-grams: spellings, stems, code identifiers)",
    )
    teacher_features: str = _f(
        "auto",
        "per-item features from the teacher LM's hidden states for the additive estimate's per-item effects: lm | "
        "none | auto (lm when label.function=delift_icl)",
    )
    lm_model: str | None = _f(None, "teacher_features=lm: local causal LM; None = delift_icl.model or the embedded one")
    lm_layers: str = _f("auto", "teacher_features=lm: comma-separated hidden-state layers; auto = 1/4, 1/2, 3/4 depth")
    lm_tokens: int = _f(128, "teacher_features=lm: prompt and response tokens kept per item")
    rows: int = _f(64, "held-out rows R of the criterion (at most a third of the pool)")
    whole_pool: int = _f(
        400,
        "pools of at most this many items are scored on every row instead: each candidate's own full selection, "
        "valued under the teacher's labels of each row's top coverers (the objective itself, not a sample); 0: never",
    )
    whole_top: int = _f(3, "whole-pool criterion: per row and candidate, its best-ranked picks the teacher labels")
    top: int = _f(5, "per held-out row and candidate, its best-ranked picks the teacher labels")
    z: float = _f(1.0, "candidates more than z paired std errors below the best held-out coverage are out")
    z_near: float = _f(
        1.0,
        "among the rest, a learned estimate must beat the best free one's neighbour quality by "
        "z_near paired std errors (1: the one-standard-error rule)",
    )
    targets: int = _f(16, "objective topk: targets labeled per held-out row to measure its mean")

    def validate(self, need: Need) -> None:
        from nncift.surrogate.candidates import CANDIDATES, ITEM_CANDIDATES

        mode = self.mode
        lm_member = mode.startswith("additive_lm") and mode[len("additive_lm") :].isdigit()
        need(mode in {"held_out", "surrogate", *CANDIDATES, *ITEM_CANDIDATES} or lm_member, "mode",
             f"got {mode!r} (held_out | surrogate | one of {', '.join(CANDIDATES)}, additive_lm<layer>; "
             f"pointwise teachers: {', '.join(ITEM_CANDIDATES)})")  # fmt: skip
        bad = sorted(set(_split(self.candidates)) - {"auto", *CANDIDATES})
        need(not bad and bool(_split(self.candidates)), "candidates",
             f"unknown candidate {bad[0] if bad else '(none)'} (known: {', '.join(CANDIDATES)})")  # fmt: skip
        need(self.views in {"lexical", "none"}, "views", f"got {self.views!r} (lexical | none)")
        lex = _split(self.lexical)
        need(bool(lex) and len(set(lex)) == len(lex) and set(lex) <= {"word", "char"}, "lexical",
             f"got {self.lexical!r} (comma-separated, distinct: word, char)")  # fmt: skip
        need(self.teacher_features in {"auto", "lm", "none"}, "teacher_features",
             f"got {self.teacher_features!r} (auto | lm | none)")  # fmt: skip
        need(self.lm_layers == "auto" or all(x.strip().isdigit() for x in self.lm_layers.split(",")), "lm_layers",
             f"got {self.lm_layers!r} (auto or comma-separated layer numbers)")  # fmt: skip
        need(self.lm_tokens >= 1, "lm_tokens", "must be >= 1")
        need(self.rows >= 2, "rows", "must be >= 2")
        need(self.whole_pool >= 0, "whole_pool", "must be >= 0")
        need(self.whole_top >= 1, "whole_top", "must be >= 1")
        need(self.top >= 1, "top", "must be >= 1")
        need(self.z >= 0, "z", "must be >= 0")
        need(self.z_near >= 0, "z_near", "must be >= 0")
        need(self.targets >= 1, "targets", "must be >= 1")


@dataclass
class EstimateConfig:
    """Blockwise estimation of the full K_FF (M x M) and K_FT (M x N)."""

    block_size: int = _f(512, "rows and columns per estimation block")
    dense_max_pairs: int = _f(100_000_000, "layout=auto: dense tiles up to this many pairs per kernel, else sparse")
    layout: str = _f("auto", "auto | dense (tiles) | sparse (per-row top-k stripes)")
    topk: int = _f(32, "sparse layout: columns kept per row")
    col_chunk: int = _f(8192, "sparse layout: columns predicted per chunk before the top-k merge", runtime=True)
    engine: str = _f("auto", "auto (numpy on the CPU, torch on other devices or for precision=bf16) | numpy (CPU "
                     "only) | torch (a sparse stripe's top-k stays on the device: only (rows, k) come back)",
                     runtime=True)  # fmt: skip
    precision: str = _f("fp32", "matmul precision of factorised (dot) surrogates on the torch engine: fp32 | tf32 "
                        "(CUDA TensorFloat-32; fp32 on the CPU) | bf16 (bfloat16 factors, float32 output); the "
                        "kept top-k entries are re-scored in fp32")  # fmt: skip
    device: str = Resources.field("device")
    concurrency: int = Resources.field("concurrency")
    num_cpus: float = Resources.field("num_cpus")
    num_gpus: float = Resources.field("num_gpus")
    candidates: str = _f("exhaustive", "sparse layout: exhaustive (score every column) | ivf (each row's top-k by "
                         "an inverted-file maximum-inner-product search, faiss; fit.kind=bilinear)")  # fmt: skip
    nlist: int = _f(0, "candidates=ivf: index cells (0 = about 4 sqrt(columns))")
    nprobe: int = _f(32, "candidates=ivf: cells scanned per row (nlist = exhaustive, exact)")
    candidates_min_cols: int = _f(50_000, "candidates=ivf: kernels with fewer columns are scored exhaustively")
    extent_sample: int = _f(4096, "candidates=ivf: columns scored exhaustively per stripe for the value extent")
    recall_sample: int = _f(256, "candidates=ivf: rows whose top-k is checked against exhaustive estimation",
                            runtime=True)  # fmt: skip

    def validate(self, need: Need) -> None:
        from nncift.kernels.estimate_worker import ENGINES, PRECISIONS
        from nncift.selection.from_kernels import LAYOUTS

        layouts = {"auto", *(name for name, lay in LAYOUTS.items() if not lay.pointwise)}  # items: by the teacher
        need(self.block_size > 0, "block_size", "must be positive")
        need(self.layout in layouts, "layout", f"got {self.layout!r}")
        need(self.topk >= 1, "topk", "must be >= 1")
        need(self.col_chunk >= 1, "col_chunk", "must be >= 1")
        need(self.engine in ENGINES, "engine", f"got {self.engine!r} ({' | '.join(ENGINES)})")
        need(self.precision in PRECISIONS, "precision", f"got {self.precision!r} ({' | '.join(PRECISIONS)})")
        need(self.engine != "numpy" or (self.device == "cpu" and self.precision != "bf16"), "engine",
             "numpy runs float32 on the CPU: needs estimate.device=cpu and precision fp32 or tf32 (or engine=torch)")  # fmt: skip
        need(self.candidates in {"exhaustive", "ivf"}, "candidates", f"got {self.candidates!r} (exhaustive | ivf)")
        need(self.nlist >= 0, "nlist", "must be >= 0 (0 = auto)")
        need(self.nprobe >= 1, "nprobe", "must be >= 1")
        need(self.candidates_min_cols >= 1, "candidates_min_cols", "must be >= 1")
        need(self.extent_sample >= 1, "extent_sample", "must be >= 1")
        need(self.recall_sample >= 0, "recall_sample", "must be >= 0")
        if self.candidates == "ivf":
            need(self.layout != "dense", "candidates", "ivf keeps each row's top-k: needs estimate.layout=sparse")
            need(self.device == "cpu", "candidates", "ivf runs on the CPU (faiss-cpu): set estimate.device=cpu")
        Resources.check(self, need)


@dataclass
class SelectConfig:
    """Subset selection on the estimated kernels."""

    fraction: float = _f(0.3, "v: budget as a fraction of M")
    objective: str = _f("fl", "fl (K_FF) | flmi (K_FF, K_FT) | flcg (K_FF, K_FT) | topk (mean of K_FT)")
    algorithm: str = _f("lazy", "lazy (exact lazy greedy) | stochastic | greedi (partitioned, sparse layout)")
    eps: float = _f(0.1, "stochastic greedy: sample size (M / budget) log(1 / eps)")
    parts: int = _f(4, "greedi: number of partitions (Ray tasks)")
    eta: float = _f(1.0, "FLMI magnification")
    nu: float = _f(1.0, "FLCG privacy hardness")

    def validate(self, need: Need) -> None:
        from nncift.selection.from_kernels import ALGORITHMS
        from nncift.selection.greedy import OBJECTIVES

        need(0.0 < self.fraction <= 1.0, "fraction", f"must be in (0, 1], got {self.fraction}")
        need(self.objective in OBJECTIVES, "objective", f"got {self.objective!r}")
        need(self.eta > 0, "eta", "must be positive")
        need(self.algorithm in ALGORITHMS, "algorithm", f"got {self.algorithm!r}")
        need(0 < self.eps < 1, "eps", "must be in (0, 1)")
        need(self.parts >= 1, "parts", "must be >= 1")
        need(self.nu >= 0, "nu", "must be >= 0")


@dataclass
class FidelityConfig:
    """Fidelity of the selection against the teacher's own full kernel (reported when it is known)."""

    truth_table: str | None = _f(None, "full-label table (example_id, target_id, value) of the teacher; "
                                 "None = the teacher itself when it is cheap (delift_se, a full table)")  # fmt: skip
    exact: bool = _f(
        False,
        "when the teacher's full kernel is not cheap: label every pair (pointwise: score every "
        "item) with the teacher for this report (the `exact` stage: the full teacher cost, for demos and "
        "benchmarks; bounded by eval.exact_max_pairs)",
    )
    random_subsets: int = _f(10, "seeded random subsets of the same budget (their mean f is the 0 of gap closed)")
    max_pairs: int = _f(20_000_000, "compute fidelity only while M*M + M*N <= this (the full kernel is dense)")
    topk: int = _f(10, "per-row top-k recall on unseen x unseen pairs (Q4)")

    def validate(self, need: Need) -> None:
        need(self.random_subsets >= 1, "random_subsets", "must be >= 1")
        need(self.topk >= 1, "topk", "must be >= 1")


@dataclass
class FinetuneConfig:
    """DeepSpeed fine-tuning (under Ray Train) of a causal LM on a subset of D_F."""

    model: str | None = _f(None, "local causal-LM directory; None = embedded SmolLM2-135M-Instruct")
    method: str = _f("lora", "lora (peft adapters) | full (every weight)")
    lora_r: int = _f(8, "LoRA rank")
    lora_alpha: int = _f(16, "LoRA alpha")
    lora_dropout: float = _f(0.05, "LoRA dropout")
    lora_target: str = _f("all-linear", "peft target_modules: all-linear or comma-separated module names")
    deepspeed: str = _f("zero2", "zero0 | zero1 | zero2 | zero3 (cluster/deepspeed/*.json) or a JSON path")
    precision: str = _f("auto", "auto (bf16 on GPUs, fp32 on CPU) | fp32 | bf16")
    epochs: int = _f(2, "passes over the subset")
    batch_size: int = _f(8, "global batch (sequences per optimizer step, all workers together)")
    lr: float = _f(2e-4, "peak learning rate (linear warmup, linear decay)")
    warmup_ratio: float = _f(0.05, "fraction of the steps used for warmup")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    grad_clip: float = _f(1.0, "gradient clipping norm")
    max_seq_len: int = _f(384, "tokens per example (prompt + response + EOS)")
    max_prompt_tokens: int = _f(192, "raw prompt tokens kept before the chat template is applied")
    template: str = _f("auto", "auto (chat template if any) | chat | a format string with {prompt}")
    trust_remote_code: bool = _f(False, "allow custom model code from the model directory")
    seed: int = _f(0, "LoRA initialisation and data order")
    micro_batch_size: int = _f(2, "sequences per forward on one worker", runtime=True)
    num_workers: int = _f(2, "Ray Train workers (data-parallel ranks)", runtime=True)
    use_gpu: bool = _f(False, "one GPU per worker (NCCL, bf16)", runtime=True)
    optimizer: str = _f(
        "torch_adamw",
        "AdamW implementation: torch_adamw (torch.optim.AdamW, no compiled op on any device) | fused_adam "
        "(DeepSpeed's FusedAdam, JIT-built for the GPU's arch at the first run; needs use_gpu)",
        runtime=True,
    )
    save_every: int = _f(50, "checkpoint every this many optimizer steps", runtime=True)
    keep_checkpoints: int = _f(2, "completed checkpoints kept", runtime=True)

    def validate(self, need: Need) -> None:
        need(self.method in {"lora", "full"}, "method", f"got {self.method!r}")
        need(self.precision in {"auto", "fp32", "bf16"}, "precision", f"got {self.precision!r}")
        for k in ("lora_r", "lora_alpha", "epochs", "batch_size", "micro_batch_size", "num_workers", "save_every"):
            need(getattr(self, k) >= 1, k, "must be >= 1")
        need(self.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
        need(0 <= self.lora_dropout < 1, "lora_dropout", "must be in [0, 1)")
        need(self.optimizer in FINETUNE_OPTIMIZERS, "optimizer",
             f"got {self.optimizer!r} ({' | '.join(FINETUNE_OPTIMIZERS)})")  # fmt: skip
        need(self.optimizer != "fused_adam" or self.use_gpu, "optimizer",
             "fused_adam is a CUDA kernel: it needs finetune.use_gpu=true (use torch_adamw on the CPU)")  # fmt: skip
        need(self.lr > 0, "lr", "must be positive")
        need(0 <= self.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)")
        need(self.max_seq_len >= 8, "max_seq_len", "must be >= 8")
        need(0 < self.max_prompt_tokens < self.max_seq_len, "max_prompt_tokens", "must be in (0, max_seq_len)")
        need(
            self.batch_size % (self.micro_batch_size * self.num_workers) == 0,
            "batch_size",
            f"{self.batch_size} must be a multiple of micro_batch_size x num_workers "
            f"({self.micro_batch_size} x {self.num_workers})",
        )
        need(
            self.template in {"auto", "chat"} or "{prompt}" in self.template,
            "template",
            f"must be auto, chat or a format string containing {{prompt}}, got {self.template!r}",
        )


@dataclass
class EvalConfig:
    """Evaluation of fine-tuned models on the held-out test split, and the subset comparison."""

    max_new_tokens: int = _f(96, "greedy generation length")
    subsets: str = _f(
        "random,nncift,full", "`nncift compare`: base | random | nncift | exact | full, comma-separated", runtime=True
    )
    exact_max_pairs: int = _f(
        20_000_000, "compare: the exact-function subset only when M*M + M*N <= this", runtime=True
    )
    batch_size: int = _f(8, "prompts per generation batch", runtime=True)
    device: str = Resources.field("device")
    concurrency: int = Resources.field("concurrency")
    num_cpus: float = Resources.field("num_cpus")
    num_gpus: float = Resources.field("num_gpus")

    def validate(self, need: Need) -> None:
        from nncift.selection.subsets import SUBSETS

        need(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        need(self.batch_size >= 1, "batch_size", "must be >= 1")
        bad = sorted(set(_split(self.subsets)) - set(SUBSETS))
        need(not bad and bool(_split(self.subsets)), "subsets", f"unknown subset {bad[0] if bad else '(none)'}")
        Resources.check(self, need)


@dataclass
class RayConfig:
    """How stages are executed."""

    executor: str = _f("ray", "ray | local (plain loops, same kernels)", runtime=True)
    address: str | None = _f(None, "Ray cluster address; None = start a local one", runtime=True)
    num_cpus: int | None = _f(None, "logical CPUs of a local Ray (None = max(4, cores))", runtime=True)
    stall_seconds: float = _f(
        120.0,
        "when a Ray fan-out finishes no block for this long, log one line on what it waits for (resources asked "
        "vs free, pending actors, nodes), at most once per this period",
        runtime=True,
    )

    def validate(self, need: Need) -> None:
        need(self.executor in {"ray", "local"}, "executor", f"got {self.executor!r}")
        need(self.stall_seconds > 0, "stall_seconds", f"must be positive, got {self.stall_seconds}")


@dataclass
class RunConfig:
    """The whole pipeline's configuration."""

    seed: int = _f(0, "seed of the D_F/D_T split and of label sampling")
    data: DataConfig = field(default_factory=DataConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    label: LabelConfig = field(default_factory=LabelConfig)
    fit: FitConfig = field(default_factory=FitConfig)
    choose: ChooseConfig = field(default_factory=ChooseConfig)
    estimate: EstimateConfig = field(default_factory=EstimateConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    fidelity: FidelityConfig = field(default_factory=FidelityConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    teachers: dict[str, Any] = field(default_factory=dict, metadata={"provenance": False, "teachers": True})
    """The registered teachers' own sections (``delift_icl.*``, ``less.*``, ...), by teacher name."""

    def __post_init__(self) -> None:
        if not self.teachers:  # every registered teacher's section, at its defaults
            from nncift.influence import teachers

            self.teachers = {n: t.config() for n, t in teachers().items() if t.config is not None}

    def __getattr__(self, name: str) -> Any:  # cfg.less -> the ``less.*`` section
        teachers = self.__dict__.get("teachers")
        if teachers is not None and name in teachers:
            return teachers[name]
        raise AttributeError(f"{type(self).__name__} has no section {name!r}")

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        out = {f.name: dataclasses.asdict(getattr(self, f.name)) if dataclasses.is_dataclass(getattr(self, f.name))
               else getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "teachers"}  # fmt: skip
        out.update({name: dataclasses.asdict(sec) for name, sec in self.teachers.items()})
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "<dict>") -> RunConfig:
        from nncift.influence import teachers

        raw = dict(raw or {})
        sections = {n: t.config for n, t in teachers().items() if t.config is not None}
        given = {n: raw.pop(n) for n in list(raw) if n in sections}
        if "teachers" in raw:
            raise ConfigError(f"{source}: unknown config field 'teachers'")
        cfg = _build(cls, raw, prefix="", source=source, extra=tuple(sections))
        cfg.teachers = {n: _build(c, given.get(n) or {}, f"{n}.", source) for n, c in sections.items()}
        cfg.validate()
        return cfg

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first offending field: each section's own checks (its
        ``validate``), the registered teachers' sections, then the rules between sections."""
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if dataclasses.is_dataclass(section):
                section.validate(_need(f"{f.name}."))
        for sec in self.teachers.values():
            if hasattr(sec, "validate"):
                sec.validate()
        selected = self.teachers.get(self.label.function)
        if hasattr(selected, "validate_selected"):  # checks that apply only to the chosen teacher
            selected.validate_selected()
        need = _need("")
        need(
            self.embed.source != "column" or bool(self.data.embedding_field),
            "embed.source",
            "column needs data.embedding_field (the input field holding each row's embedding)",
        )
        _check_fit_device(self.fit, self.ray.executor, need)
        need(self.estimate.candidates != "ivf" or self.fit.kind == "bilinear", "estimate.candidates",
             "ivf needs a factorised surrogate (fit.kind=bilinear); the MLP's top-k is not an inner-product search")  # fmt: skip

    # ------------------------------------------------------------------ provenance
    def fingerprint(self, *sections: str) -> str:
        """Hash of the result-relevant fields of ``sections`` (runtime knobs excluded)."""
        payload = {}
        for name in sections:
            obj = self if name == "" else getattr(self, name)
            payload[name or "root"] = _provenance_dict(obj)
        blob = json.dumps(payload, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def provenance(self, *sections: str) -> dict[str, Any]:
        return {name or "root": _provenance_dict(self if name == "" else getattr(self, name)) for name in sections}


FINETUNE_OPTIMIZERS = ("torch_adamw", "fused_adam")


def _check_fit_device(fit: FitConfig, executor: str, need: Need) -> None:
    """``fit.device`` (its syntax checked by :meth:`FitConfig.validate`): with the local executor an explicit CUDA
    device must exist here (torch is imported only then); the Ray executor places its workers by
    ``fit.use_gpu``, which a CUDA device needs."""
    dev = fit.device
    index = dev[len("cuda:") :] if dev.startswith("cuda:") else None
    if not dev.startswith("cuda"):
        return
    if executor != "local":
        need(fit.use_gpu, "fit.device",
             f"{dev} with ray.executor={executor}: its Train workers take GPUs by fit.use_gpu, set fit.use_gpu=true "
             "(fit.device is the local executor's device)")  # fmt: skip
        return
    import torch

    need(torch.cuda.is_available(), "fit.device", f"{dev} asked but torch finds no CUDA device here (use cpu or auto)")
    count = torch.cuda.device_count()
    need(index is None or int(index) < count, "fit.device", f"{dev} asked but there are only {count} CUDA devices")


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _provenance_dict(obj: Any) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(obj):
        if f.metadata.get("provenance", True) is False or dataclasses.is_dataclass(f.type):
            continue
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            continue
        out[f.name] = v
    return out


def _coerce(value: Any, typ: Any, key: str, source: str) -> Any:
    """Coerce a YAML value to the annotated type, or raise ConfigError naming ``key``."""
    text = str(typ)
    optional = "None" in text
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{source}: config field '{key}' may not be null")
    base = text.replace(" | None", "").replace("None | ", "")
    shown = base.replace("<class '", "").replace("'>", "")
    try:
        if base in ("int", "<class 'int'>"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if base in ("float", "<class 'float'>"):
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base in ("bool", "<class 'bool'>"):
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes"):
                return True
            if str(value).lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if base in ("str", "<class 'str'>"):
            if isinstance(value, bool):  # `--set x=true` parses as a YAML bool
                return "true" if value else "false"
            if isinstance(value, dict | list):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: config field '{key}' expects {shown}, got {value!r}") from None
    return value


# fields that moved: the old key -> where it lives now (a clear error instead of "unknown field")
MOVED = {
    "network": "fit",
    **{f"label.{k}": f"delift_icl.{k}" for k in ("model", "backend", "dtype", "max_prompt_tokens",
                                                  "max_response_tokens", "trust_remote_code", "mode", "batch_size")},
    "label.table": "table.path",
}  # fmt: skip


def _plain_teachers() -> set[str]:
    from nncift.influence import teachers

    return set(teachers())


def _build(cls: type, raw: dict[str, Any], prefix: str, source: str, extra: tuple[str, ...] = ()) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: config section '{prefix.rstrip('.') or 'root'}' must be a mapping")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if not f.metadata.get("teachers")}
    unknown = sorted(set(raw) - names)
    if unknown:
        key = f"{prefix}{unknown[0]}"
        if key in MOVED:
            raise ConfigError(f"{source}: config field '{key}' is now '{MOVED[key]}'")
        known = ", ".join(sorted(names | set(extra)))
        raise ConfigError(f"{source}: unknown config field '{key}' (known: {known})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            kwargs[f.name] = _build(typ, raw[f.name], f"{prefix}{f.name}.", source)
        else:
            kwargs[f.name] = _coerce(raw[f.name], typ, prefix + f.name, source)
    return cls(**kwargs)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings (values parsed as YAML scalars) to a nested dict."""
    raw = json.loads(json.dumps(raw or {}))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"--set: bad key {key!r}")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        node = raw
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set: '{key}' goes through a non-section field")
        node[parts[-1]] = value
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a :class:`RunConfig` from YAML (optional) plus ``--set`` overrides, and validate it."""
    raw: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f":{mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{p}{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if overrides:
        raw = apply_overrides(raw, overrides)
        source = f"{source} + --set"
    return RunConfig.from_dict(raw, source=source)
