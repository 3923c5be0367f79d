"""The influence-function interface and the item container it consumes."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np


@dataclass
class Items:
    """A batch of rows as the influence functions see them.

    Attributes:
        prompts: (B,) prompt strings.
        responses: (B,) response strings.
        embeddings: (B, d) float32 unit-norm embeddings.
        ids: (B,) row ids (the table teacher looks values up by id); None when unknown.
    """

    prompts: list[str]
    responses: list[str]
    embeddings: np.ndarray
    ids: list[str] | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    def take(self, idx: np.ndarray) -> Items:
        idx = np.asarray(idx, dtype=np.int64)
        return Items(
            [self.prompts[i] for i in idx],
            [self.responses[i] for i in idx],
            self.embeddings[idx],
            None if self.ids is None else [self.ids[i] for i in idx],
        )


class InfluenceFunction(ABC):
    """An expensive influence function (a "teacher"), registered by name with :func:`nncift.influence.register`.

    Pairwise teachers (this class) implement :meth:`utility` (and, for speed, :meth:`utility_pairs`); pointwise
    ones derive from :class:`PointwiseInfluenceFunction`. Positive values mean the example helps the target.

    Attributes:
        name: registry name (``label.function``), and the name of the teacher's own config section.
        kind: ``"pairwise"`` (U(example -> target)) or ``"pointwise"`` (one score per item).
        config: the dataclass of the teacher's config section (``<name>.*``), or None when it has none.
        symmetric: ``U(a -> b) == U(b -> a)`` for every pair (surrogates may then share one tower).
        exact_is_cheap: every pair can be computed at negligible cost (embedding cosine, a lookup table), so
            a run can afford the full kernel as fidelity ground truth.
        pairs_per_second: a rough labeling rate (pairs, or items for pointwise teachers) on 2 CPU cores, used
            only to size label blocks (``label.pairs_per_second`` overrides it).
        cost_unit: what the teacher pays for: ``"pair"`` (a forward per pair, e.g. DELIFT ICL) or ``"item"`` (a
            feature per distinct item, every pair among featurised items then nearly free, e.g. LESS's gradients;
            every pointwise teacher). Label plans of per-item teachers minimise the distinct items they touch,
            and reports count the teacher's cost in its own unit.
        in_context: the teacher measures the in-context utility of an example with a causal LM (DELIFT ICL). Its
            kernel carries strong per-item effects (how much a target gains from examples in general, how much
            an example helps targets in general), so ``label.probes=auto`` labels :attr:`auto_probes` probe
            columns to measure them, and ``choose.teacher_features=auto`` reads the LM's hidden states.
        auto_probes: probe columns ``label.probes=auto`` labels for this teacher (M pairs each); None (a teacher
            of unknown nature: a table without provenance, a plugin) decides on the run's own training labels
            (:func:`nncift.labels.probes.decide_probes`: probe columns when the pairs labeled both ways are not
            symmetric).
    """

    name: ClassVar[str] = "base"
    kind: ClassVar[str] = "pairwise"
    config: ClassVar[type | None] = None
    symmetric: bool = False
    exact_is_cheap: bool = False
    pairs_per_second: float = 1e6
    cost_unit: ClassVar[str] = "pair"
    in_context: ClassVar[bool] = False
    auto_probes: ClassVar[int | None] = None

    @classmethod
    def source(cls, section: Any) -> tuple[str, dict[str, Any]]:
        """The function whose values this teacher gives, and its settings: ``(name, settings)``.

        The teacher itself here; a table of values answers with the function that built it, from its
        provenance (:class:`~nncift.influence.table.TableFunction`), so that its ``auto`` settings follow the
        values' nature rather than their file format.
        """
        import dataclasses

        return cls.name, (dataclasses.asdict(section) if dataclasses.is_dataclass(section) else {})

    @classmethod
    def resolve(cls, section: Any, device: str) -> dict[str, Any]:
        """Constructor keyword arguments from the teacher's config section, resolved once in the driver
        (model folders checked, paths made absolute); they travel to every label worker, so plain values only.

        Args:
            section: the ``<name>.*`` config dataclass (None when :attr:`config` is None).
            device: ``label.device`` (``cpu``, ``cuda``, ``cuda:N``).
        """
        return {}

    @classmethod
    def build(cls, **kwargs: Any) -> InfluenceFunction:
        """Instantiate from :meth:`resolve`'s keyword arguments (in a label worker)."""
        return cls(**kwargs)

    @classmethod
    def prepare(
        cls,
        kwargs: dict[str, Any],
        *,
        pool: Items,
        target: Items,
        pool_labeled: np.ndarray,
        target_labeled: np.ndarray,
        work_dir: Any,
        executor: Any,
        seed: int,
    ) -> dict[str, Any]:
        """Driver-side work the label stage runs once before any block (default: none), e.g. LESS's LoRA
        warm-up and the gradient features of the labeled items. It must be resumable (finished parts in
        ``work_dir`` are reused) and fan its heavy work out with ``executor.map_blocks``.

        Args:
            kwargs: :meth:`resolve`'s output.
            pool, target: every item of D_F (M) and D_T (N).
            pool_labeled, target_labeled: (L_F,), (L_T,) int64 indices of the items any label touches.
            work_dir: a folder of the label stage owned by this teacher (``<run>/label/teacher``).
            executor: the run's :class:`~nncift.exec.local.LocalExecutor` or ``RayExecutor``.
            seed: the run's seed.

        Returns:
            the keyword arguments the label workers build the teacher with (plain values only).
        """
        return kwargs

    @classmethod
    def check_pairs(cls, kwargs: dict[str, Any], sets: list[dict], pool_ids: Any, target_ids: Any) -> None:
        """Refuse, in the driver and before any block is labeled, pairs this teacher cannot label (default:
        nothing to check; the table teacher checks that its file holds every pair).

        Args:
            kwargs: the keyword arguments the label workers build the teacher with (after :meth:`prepare`).
            sets: the label sets as dicts (``kernel``, ``quadrant``, ``rows``, ``cols``, ``paired``).
            pool_ids, target_ids: the run's row ids of D_F and D_T (Arrow arrays or sequences).
        """
        return None

    @abstractmethod
    def utility(self, examples: Items, targets: Items) -> np.ndarray:
        """U(example -> target) for every pair.

        Returns:
            (len(examples), len(targets)) float32.
        """

    def utility_pairs(self, examples: Items, targets: Items) -> np.ndarray:
        """U(examples[k] -> targets[k]) for aligned pairs (default: one :meth:`utility` call per pair;
        the built-in functions override it with a batched computation).

        Returns:
            (len(examples),) float32.
        """
        if len(examples) != len(targets):
            raise ValueError(f"utility_pairs needs aligned pairs, got {len(examples)} examples, {len(targets)} targets")
        out = np.empty(len(examples), np.float32)
        for k in range(len(examples)):
            out[k] = self.utility(examples.take([k]), targets.take([k]))[0, 0]
        return out

    def kernel_block(self, kernel: str, rows: Items, cols: Items) -> np.ndarray:
        """A block of K_FF or K_FT with rows from D_F.

        ``K_FF[i, j] = U(j -> i)`` (how well pool item j serves pool item i: the facility-location
        orientation) and ``K_FT[i, j] = U(i -> j)`` (how much pool item i helps target j).

        Returns:
            (len(rows), len(cols)) float32.
        """
        if kernel == "ff":
            return np.ascontiguousarray(self.utility(cols, rows).T, dtype=np.float32)
        if kernel == "ft":
            return np.ascontiguousarray(self.utility(rows, cols), dtype=np.float32)
        raise ValueError(f"kernel must be 'ff' or 'ft', got {kernel!r}")

    def kernel_pairs(self, kernel: str, rows: Items, cols: Items) -> np.ndarray:
        """Entries ``K[rows[k], cols[k]]`` of K_FF or K_FT for aligned pairs (same orientation as
        :meth:`kernel_block`).

        Returns:
            (len(rows),) float32.
        """
        if kernel == "ff":
            return np.asarray(self.utility_pairs(cols, rows), dtype=np.float32)
        if kernel == "ft":
            return np.asarray(self.utility_pairs(rows, cols), dtype=np.float32)
        raise ValueError(f"kernel must be 'ff' or 'ft', got {kernel!r}")


class PointwiseInfluenceFunction(InfluenceFunction):
    """A teacher that scores items one by one (e.g. SelectIT): s(item), higher = more useful.

    Subclasses implement :meth:`score`. The pipeline labels a seeded fraction of D_F, fits the pointwise
    surrogate, estimates a score for every item and selects the top-k.
    """

    kind: ClassVar[str] = "pointwise"
    cost_unit: ClassVar[str] = "item"

    @abstractmethod
    def score(self, items: Items) -> np.ndarray:
        """The teacher's score of each item.

        Returns:
            (len(items),) float32.
        """

    def utility(self, examples: Items, targets: Items) -> np.ndarray:
        raise TypeError(f"{self.name} is a pointwise teacher: it scores items (score), not pairs (utility)")
