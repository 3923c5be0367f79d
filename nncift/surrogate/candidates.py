"""Choosing the estimate on the run's own held-out labels: candidate estimates and a criterion that reads what
selection reads.

A learned surrogate is not always better than estimates that need no network: on a text-similarity teacher
the plain embedding cosine can beat it, and on DELIFT's in-context utility the exact self-utilities with a
near-constant off-diagonal can. So every run builds a small family of **candidate estimates** of each kernel
and keeps the one its own held-out labels prove best.

Candidates (raw teacher units; the K_FF diagonal is the teacher's exact self-utility where labeled):

==================  =====  ======================================================================
name                free   estimate off the diagonal
==================  =====  ======================================================================
``cosine``          yes    the embedding cosine (zero teacher labels; diagonal 1, not the teacher's); only
                           without the exact diagonal, which ``diag_cosine`` then adds to it
``lexical``         yes    the cosine of the lexical view (:mod:`nncift.surrogate.views`), zero labels; likewise
``diag_const``      yes    the training labels' mean (only when the exact diagonal is labeled)
``diag_cosine``     yes    ``a cos + b``, the cosine calibrated on the training labels (least squares)
``diag_lexical``    yes    the lexical view calibrated likewise, one weight per block (word, char n-grams): the mix
                           that best orders each labeled row, scaled by least squares (:func:`calibrate_blocks`)
``surrogate``       no     the fitted network
``shrink_<l>``      no     ``(1 - l) surrogate + l (a cos + b)``: the network shrunk toward the calibrated
                           cosine (bilinear networks; ``l`` in 0.25, 0.5, 0.75)
``additive``        no     ``a cos + b + r_i + c_j``: per-target and per-example effects measured on the
                           labeled items (and the probe columns), shrunk by empirical Bayes, and predicted
                           by ridge from the item features elsewhere
``additive_lm<L>``  no     the same, the effects predicted from the teacher LM's layer-L hidden states
                           (``choose.teacher_features``)
``additive_lexical`` no    ``a lex + b + r_i + c_j``: the same effects on the calibrated lexical cosine
``metric_lexical``  no     ``sum_k w_k lex_i[k] lex_j[k] + b``: one weight per dimension of the lexical view,
                           ridge-shrunk toward the blocks' calibration (:func:`metric_form`), for text
                           teachers that weigh terms otherwise than the view's cosine
==================  =====  ======================================================================

Of the additive family (``additive``, ``additive_lm<L>``), which differ only in the features that predict the
effects of unlabeled items, one member takes part in the held-out choice: the one whose ridge has the least
GCV error summed over the items it must predict (:func:`narrow_family`). Near-identical candidates add nothing
but noise to a choice that keeps the best-scoring one.

"Free" means no network: the calibrated ones read the training labels only through two numbers. K_FT has
no diagonal: its candidates carry the same names (``diag_cosine`` of K_FT is the calibrated cosine), and
without ``label.diagonal`` neither kernel has one.

Every candidate except a paper MLP is a bilinear form on a view's item vectors, ``[v_i, 1] W [v_j, 1]^T`` (+
effects), so blends are sums of ``W`` and the chosen estimate stays one GEMM per block (factors ``[v, 1] W``
and ``[v, 1]``: the estimation speed of the default bilinear network).

**The criterion** (:func:`probe_fl` / :func:`score_probes`): a sample of held-out rows R (``choose.rows``)
is covered, for each candidate, by the greedy facility-location selection the pipeline would run, restricted
to those rows but over *every* column of the pool, with the budget scaled to ``select.fraction x |R|``. The
teacher then labels, for every row, the ``choose.top`` columns each candidate thinks cover it best among its
picks (the union over candidates; pairs already known are not labeled again), and each candidate's picks
are scored under the teacher's values: per row the best true coverage among its picks. Rows keep their full
set of potential coverers (unlike a random sub-square of the kernel, whose items rarely resemble each other),
every candidate is scored on the same rows (paired), and the values are the objective the selection
maximises, not an MSE. Row sampling resolves large differences of coverage (a cosine that ignores DELIFT's self-utilities) but
not the small ones that still separate a good neighbour structure from a poor one, so a second, more
sensitive score reads the same rows: each candidate's ``choose.top`` best columns over the whole pool (the
row's own excluded) and their mean teacher value. :func:`decide` keeps the candidates within ``choose.z``
standard errors of the best coverage, then among them the best neighbour quality, or the best free one
within ``choose.z_near`` standard errors of it: a learned estimate must *prove* it is better.

**A small pool is read whole** (:func:`criterion_rows`, ``choose.whole_pool``): the rows are every pool item and
the budget the selection's own, so each candidate's picks are its full selection; the teacher labels each row's
``choose.whole_top`` best coverers among them (per candidate), and each row's best known value among the picks
is its coverage. The mean is then the objective of the candidate's own selection (a lower bound: coverers the
candidate ranks lower are not labeled), not a sample of it, and :func:`decide_whole` keeps the best. This reads
what the sampled criterion cannot: a constant added to a row changes which items a selection keeps for itself.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

SHRINK = (0.75, 0.5, 0.25)
# preference order among candidates tied within noise: free before learned, simpler before richer
PREFERENCE = ("diag_cosine", "diag_lexical", "cosine", "lexical", "diag_const",
              *(f"shrink_{x:g}" for x in SHRINK), "surrogate", "metric_lexical", "additive", "additive_lexical",
              "additive_lm")  # fmt: skip
ITEM_CANDIDATES = ("response_length", "prompt_length", "ridge", "surrogate")  # pointwise teachers
FREE = ("diag_cosine", "diag_lexical", "cosine", "lexical", "diag_const", "response_length", "prompt_length")
CANDIDATES = PREFERENCE  # families: ``additive_lm`` builds one ``additive_lm<layer>`` per teacher-LM layer


@dataclass
class Recipe:
    """How one candidate estimates one kernel (``ff`` or ``ft``), in raw teacher units.

    ``K[i, j] = [v_i, 1] W [v_j, 1]^T + r_i + c_j`` on the item vectors of ``view``; or, for ``network``, the
    fitted surrogate's own output. With ``diag``, K_FF[i, i] is the teacher's exact self-utility.

    Attributes:
        r, c: (M,) / (C,) float32 per-row / per-column effects (or None); ``r_w``, ``c_w``: (D + 1,) ridge weights
            on ``[v, 1]`` that predict them for new items.
    """

    name: str
    kernel: str
    free: bool
    view: str | None = None
    W: np.ndarray | None = None
    r: np.ndarray | None = None
    c: np.ndarray | None = None
    r_w: np.ndarray | None = None
    c_w: np.ndarray | None = None
    diag: bool = False
    network: bool = False
    effect_view: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def factor_width(self) -> int | None:
        """Columns of the per-item factors (estimation cost per pair), None for a network candidate."""
        if self.W is None:
            return None
        return self.W.shape[1] + (self.r is not None) + (self.c is not None)

    # ------------------------------------------------------------------ persistence (safetensors + JSON)
    def arrays(self) -> dict[str, np.ndarray]:
        return {
            k: np.asarray(v, np.float32) for k in ("W", "r", "c", "r_w", "c_w") if (v := getattr(self, k)) is not None
        }

    def meta(self) -> dict[str, Any]:
        return {"name": self.name, "kernel": self.kernel, "free": self.free, "view": self.view, "diag": self.diag,
                "network": self.network, "effect_view": self.effect_view, "info": self.info}  # fmt: skip

    @classmethod
    def from_parts(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> Recipe:
        return cls(**meta, **{k: arrays.get(k) for k in ("W", "r", "c", "r_w", "c_w")})


# ------------------------------------------------------------------------------------------ factors
def _aug(v: np.ndarray) -> np.ndarray:
    """``[v, 1]``: (n, d) -> (n, d + 1) float32."""
    return np.concatenate([np.asarray(v, np.float32), np.ones((len(v), 1), np.float32)], axis=1)


def dot_factors(recipe: Recipe, rows_v: np.ndarray, cols_v: np.ndarray, r: np.ndarray | None = None,
                c: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Per-item factors ``(P, Q)`` with ``P @ Q.T`` = the recipe's estimate (raw units, no diagonal).

    Args:
        rows_v: (R, d) view vectors of the rows. cols_v: (C, d) of the columns.
        r, c: the rows' / columns' effects (default: the recipe's own, which must then match R / C).

    Returns:
        P (R, k), Q (C, k) float32.
    """
    p = _aug(rows_v) @ recipe.W
    q = _aug(cols_v)
    r = recipe.r if r is None and recipe.r is not None else r
    c = recipe.c if c is None and recipe.c is not None else c
    ones_p, ones_q = np.ones((len(p), 1), np.float32), np.ones((len(q), 1), np.float32)
    if r is not None:
        p, q = np.concatenate([p, np.asarray(r, np.float32)[:, None]], 1), np.concatenate([q, ones_q], 1)
    if c is not None:
        p, q = np.concatenate([p, ones_p], 1), np.concatenate([q, np.asarray(c, np.float32)[:, None]], 1)
    return np.ascontiguousarray(p, np.float32), np.ascontiguousarray(q, np.float32)


def effects_for(recipe: Recipe, v_new: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Ridge-predicted (row, column) effects of new items from their view vectors ((M', d) -> (M',) each)."""
    a = _aug(v_new)
    return (None if recipe.r_w is None else a @ recipe.r_w, None if recipe.c_w is None else a @ recipe.c_w)


def bilinear_form(net) -> np.ndarray:
    """A :class:`~nncift.surrogate.network.BilinearNetwork` as ``W`` (d + 1, d + 1) float32 on ``[e, 1]`` (scaled label units):
    ``s(i, j) = [e_i, 1] W [e_j, 1]^T``."""
    import torch

    with torch.no_grad():
        row_t, row_b = net.row_tower.weight, net.row_bias.weight
        col_t, col_b = (net.row_tower.weight, net.row_bias.weight) if net.symmetric else (
            net.col_tower.weight, net.col_bias.weight)  # fmt: skip
        form = row_t.T @ col_t
        if net.cosine_prior:
            form = form + net.alpha * torch.eye(net.dim)
        d = net.dim
        w = torch.zeros(d + 1, d + 1)
        w[:d, :d] = form
        w[:d, d] = row_b[0]
        w[d, :d] = col_b[0]
        w[d, d] = net.bias
    return w.numpy().astype(np.float32)


def affine_form(d: int, a: float | np.ndarray, b: float, blocks: list[slice] | None = None) -> np.ndarray:
    """``W`` of ``a <v_i, v_j> + b`` on ``[v, 1]``: (d + 1, d + 1) float32; with ``blocks`` (column slices of
    the view) and ``a`` one weight per block, ``sum_k a_k <v_i[k], v_j[k]> + b``."""
    w = np.zeros((d + 1, d + 1), np.float32)
    diag = np.zeros(d, np.float32)
    for k, cols in enumerate(blocks or [slice(0, d)]):
        diag[cols] = np.ravel(a)[k]
    w[np.arange(d), np.arange(d)] = diag
    w[d, d] = b
    return w


# ------------------------------------------------------------------------------------------ fitting helpers
def calibrate(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares ``y ~ a x + b`` (a = 0, b = mean y when x is constant)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 2 or np.ptp(x) == 0:
        return 0.0, float(y.mean()) if len(y) else 0.0
    a, b = np.polyfit(x, y, 1)
    return float(a), float(b)


def block_dots(vr: np.ndarray, vc: np.ndarray, blocks: list[slice] | None = None) -> np.ndarray:
    """(P, B) float64: the dot product of each labeled pair's row and column vectors ((P, d) each) over each block
    of columns (one block: the whole vector)."""
    return np.stack([np.einsum("pd,pd->p", vr[:, s], vc[:, s]) for s in blocks or [slice(None)]], 1).astype(np.float64)


def _row_ranks(g: np.ndarray, v: np.ndarray) -> np.ndarray:
    """(P,) ordinal rank of each value within its group (``g``: (P,) group index), ties in input order."""
    order = np.lexsort((np.arange(len(v)), v, g))
    gs = g[order]
    first = np.r_[0, np.flatnonzero(gs[1:] != gs[:-1]) + 1]
    out = np.empty(len(v))
    out[order] = np.arange(len(v)) - np.repeat(first, np.diff(np.r_[first, len(v)]))
    return out


def _row_rank_corr(g: np.ndarray, rx: np.ndarray, ry: np.ndarray) -> float:
    """Mean over groups with >= 3 members of the Pearson correlation of within-group ranks (NaN: no such group)."""
    n = np.bincount(g)
    dx, dy = rx - (np.bincount(g, rx) / n)[g], ry - (np.bincount(g, ry) / n)[g]
    num, den = np.bincount(g, dx * dy), np.sqrt(np.bincount(g, dx * dx) * np.bincount(g, dy * dy))
    ok = (n >= 3) & (den > 0)
    return float(np.mean(num[ok] / den[ok])) if ok.any() else float("nan")


def within_row_spearman(groups: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    """Mean over groups (rows) with at least 3 labels of the Spearman correlation of ``x`` and ``y`` within the
    group (ordinal ranks): how well ``x`` orders each row's labeled columns, what greedy selection reads.
    NaN when no group has 3 labels."""
    if len(groups) == 0:
        return float("nan")
    g = np.unique(np.asarray(groups), return_inverse=True)[1]
    return _row_rank_corr(g, _row_ranks(g, np.asarray(x, np.float64)), _row_ranks(g, np.asarray(y, np.float64)))


def calibrate_blocks(x: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None, steps: int = 8
                     ) -> tuple[np.ndarray, float]:  # fmt: skip
    """Calibrate (P, B) block similarities to ``y``: (B,) weights and the intercept. One block is :func:`calibrate`.

    With several blocks and the labels' rows (``groups``), the mix of the blocks (a grid of ``steps + 1`` points
    per edge of the simplex of non-negative proportions summing to 1) is the one that best orders each row's
    labeled columns (:func:`within_row_spearman`, what selection reads: least squares over all pairs weighs
    the many dissimilar pairs and can prefer a block that orders the near neighbours worse), and its scale and
    intercept are least squares. Without rows of >= 3 labels, least squares over the blocks.
    """
    import itertools

    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    n_b = x.shape[1]
    if n_b == 1:
        a, b = calibrate(x[:, 0], y)
        return np.array([a]), b
    if groups is not None and len(y) >= 3:
        g = np.unique(np.asarray(groups), return_inverse=True)[1]
        ry = _row_ranks(g, y)  # the labels' ranks, shared by every mix
        best, best_mix = -np.inf, None
        for combo in itertools.product(range(steps + 1), repeat=n_b - 1):
            if sum(combo) > steps:
                continue
            mix = np.array([*combo, steps - sum(combo)], np.float64) / steps
            rho = _row_rank_corr(g, _row_ranks(g, x @ mix), ry)
            if np.isfinite(rho) and rho > best:
                best, best_mix = rho, mix
        if best_mix is not None:
            a, b = calibrate(x @ best_mix, y)
            return a * best_mix, b
    a = np.zeros(n_b)
    live = np.flatnonzero(np.ptp(x, axis=0) > 0) if len(x) >= 2 else np.array([], int)
    if len(live) == 0 or len(x) <= len(live) + 1:
        return a, float(y.mean()) if len(y) else 0.0
    coef, *_ = np.linalg.lstsq(np.column_stack([x[:, live], np.ones(len(x))]), y, rcond=None)
    a[live] = coef[:-1]
    return a, float(coef[-1])


METRIC_ALPHAS = (1e-3, 1e-2, 1e-1, 1.0)  # ridge penalties of the lexical metric, relative to tr(G) / d


def _metric_sums(vr: np.ndarray, vc: np.ndarray, rows: np.ndarray, cols: np.ndarray, y: np.ndarray,
                 chunk: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, int]:  # fmt: skip
    """The uncentred sums of ``y ~ F w + b``, ``F[p] = vr[rows[p]] * vc[cols[p]]``, accumulated over ``chunk``
    pairs at a time: (F^T F (d, d), F^T y (d,), sum of F (d,), sum of y, pairs). Sums of disjoint pair sets add."""
    d, n = vr.shape[1], len(y)
    gram, fy, fsum = np.zeros((d, d)), np.zeros(d), np.zeros(d)
    for s in range(0, n, chunk):
        f = vr[rows[s : s + chunk]].astype(np.float64) * vc[cols[s : s + chunk]]
        gram += f.T @ f
        fy += f.T @ y[s : s + chunk]
        fsum += f.sum(0)
    return gram, fy, fsum, float(y.sum()), n


def _metric_normal(sums: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, int]:
    """The centred normal equations from :func:`_metric_sums`: (centred Gram, centred F^T y, mean of F, mean of
    y, pairs)."""
    gram, fy, fsum, ysum, n = sums
    fm, ym = fsum / max(n, 1), ysum / max(n, 1)
    return gram - n * np.outer(fm, fm), fy - n * fm * ym, fm, ym, n


def _metric_solve(normal: tuple, prior: np.ndarray, alpha: float | None) -> tuple[np.ndarray, float]:
    """Weights and intercept of the metric at penalty ``alpha`` x tr(G) / d toward ``prior`` (None: the prior)."""
    gc, gy, fm, ym, _ = normal
    w = prior.copy()
    if alpha is not None:
        scale = max(float(np.trace(gc)) / len(prior), 1e-30)
        w = prior + np.linalg.solve(gc + alpha * scale * np.eye(len(prior)), gy - gc @ prior)
    return w, float(ym - fm @ w)


def metric_form(vr: np.ndarray, vc: np.ndarray, rows: np.ndarray, cols: np.ndarray, y: np.ndarray,
                prior: np.ndarray, alphas: tuple[float, ...] = METRIC_ALPHAS, chunk: int = 16384
                ) -> tuple[np.ndarray, float, dict[str, Any]]:  # fmt: skip
    """A diagonal metric on a view: ``y ~ sum_k w_k v_i[k] v_j[k] + b``, ridge-shrunk toward ``prior``.

    A text teacher that tokenises or weighs terms differently from the view (character n-grams across word
    boundaries, raw counts) reads the view's dimensions with other weights than its cosine does; one weight
    per dimension, fitted on the training labels, recovers much of that (docs/fidelity.md: `char24`). The
    normal equations are accumulated over ``chunk`` pairs at a time (a (d, d) Gram, never a (P, d) matrix),
    once per fold of rows: the whole fit adds the two folds' sums. The penalty (``alpha x tr(G) / d`` for
    ``alpha`` in ``alphas``, or the prior itself) is the one whose fit on half of the labeled rows best orders
    the other half's labeled columns (:func:`within_row_spearman`, what selection reads; two folds of rows), so
    a teacher the prior already reads keeps the prior.

    Args:
        vr, vc: (M, d) / (C, d) float32 view vectors of the rows and columns.
        rows, cols, y: (P,) the training pairs and their raw labels.
        prior: (d,) float the weights the penalty shrinks toward (the blocks' calibration).

    Returns:
        ``(w, b, info)``: (d,) float64 weights, the intercept, and ``{"alpha"`` (None: the prior),
        ``"fold_spearman"}``.
    """
    rows, cols = np.asarray(rows, np.int64), np.asarray(cols, np.int64)
    y, prior = np.asarray(y, np.float64), np.asarray(prior, np.float64)
    fold = (rows * 2654435761 % 2**32) % 2  # each labeled row's pairs in one fold
    options: list[float | None] = [None, *sorted(alphas, reverse=True)]
    sums = [_metric_sums(vr, vc, rows[fold == k], cols[fold == k], y[fold == k], chunk) for k in (0, 1)]
    score = np.zeros(len(options))
    for k in (0, 1):
        fit, test = fold != k, fold == k
        if fit.sum() < 3 or test.sum() < 3:
            continue
        normal = _metric_normal(sums[1 - k])  # the fit fold's sums
        for i, alpha in enumerate(options):
            w, _ = _metric_solve(normal, prior, alpha)
            pred = np.concatenate([np.einsum("pd,pd,d->p", vr[rows[test][s : s + chunk]], vc[cols[test][s : s + chunk]], w)
                                   for s in range(0, int(test.sum()), chunk)])  # fmt: skip
            rho = within_row_spearman(rows[test], pred, y[test])
            score[i] += rho if np.isfinite(rho) else 0.0
    best = int(np.argmax(score))  # ties: the earlier option (the prior, then the stronger penalty)
    whole = tuple(a + b for a, b in zip(*sums, strict=True))
    w, b = _metric_solve(_metric_normal(whole), prior, options[best])
    return w, b, {"alpha": options[best], "fold_spearman": round(float(score[best]) / 2, 4)}


def ridge_gcv(x: np.ndarray, y: np.ndarray, lambdas=(1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3),
              score: bool = False) -> np.ndarray | tuple[np.ndarray, float]:  # fmt: skip
    """Ridge regression of ``y`` on ``[x, 1]`` (intercept not penalised), the penalty chosen by generalised
    cross-validation; returns (d + 1,) float32 weights on ``[x, 1]`` (constant prediction for < 3 samples), and
    with ``score`` also the chosen penalty's GCV error (an estimate of the squared error on new samples)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    d = x.shape[1]
    w = np.zeros(d + 1)
    if len(y) < 3:
        w[d] = y.mean() if len(y) else 0.0
        err = float(np.var(y)) if len(y) else 0.0
        return (w.astype(np.float32), err) if score else w.astype(np.float32)
    xm, ym = x.mean(0), y.mean()
    u, s, vt = np.linalg.svd(x - xm, full_matrices=False)
    uty = u.T @ (y - ym)
    best, best_gcv = None, np.inf
    for lam in lambdas:
        f = s**2 / (s**2 + lam)
        resid = (y - ym) - u @ (f * uty)
        gcv = float(np.mean(resid**2) / max(1e-12, (1 - f.sum() / len(y))) ** 2)
        if gcv < best_gcv:
            best, best_gcv = lam, gcv
    beta = vt.T @ (s / (s**2 + best) * uty)
    w[:d], w[d] = beta, ym - xm @ beta
    return (w.astype(np.float32), best_gcv) if score else w.astype(np.float32)


def shrinkage(groups: np.ndarray, x: np.ndarray, pred: np.ndarray, n: np.ndarray, cap: float = 1e4) -> float:
    """Empirical-Bayes pseudo-label count ``sigma_e^2 / sigma_g^2`` of per-group effects (method of moments).

    Args:
        groups: (P,) group of each label; x: (P,) its value; pred: (G,) the prior mean of each group's effect;
        n: (G,) labels per group.

    Returns:
        How many pseudo-labels at the prior mean a group's mean is shrunk with: small when the groups differ
        far beyond their noise, ``cap`` when the data show no between-group variance at all.
    """
    lab = n > 0
    if lab.sum() < 3 or len(x) <= lab.sum():
        return cap
    mean = np.bincount(groups, x, len(n)) / np.maximum(n, 1)
    within = float(((x - mean[groups]) ** 2).sum() / (len(x) - lab.sum()))
    between = float(np.mean((mean[lab] - pred[lab]) ** 2) - within * np.mean(1.0 / n[lab]))
    return cap if between <= within / cap else within / between


def additive_effects(rows: np.ndarray, cols: np.ndarray, resid: np.ndarray, n_rows: int, n_cols: int,
                     feat_rows: np.ndarray, feat_cols: np.ndarray, prior: float | None = None, rounds: int = 10
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:  # fmt: skip
    """Per-row and per-column effects of residual labels: ``resid[k] ~ r[rows[k]] + c[cols[k]]``.

    Effects are measured on the labeled items (each a mean of its own residuals, shrunk toward its ridge
    prediction) and predicted by ridge from the item features elsewhere. The shrinkage is ``prior``
    pseudo-labels, or with None the empirical-Bayes count of :func:`shrinkage` (per side, re-estimated every
    round): effects that vary little beyond their noise shrink to their prediction, so a teacher without row or
    column effects gets none.

    Args:
        rows, cols: (P,) indices of the labeled pairs; resid: (P,) their residual values.
        feat_rows: (n_rows, d) and feat_cols: (n_cols, d) item features.

    Returns:
        r (n_rows,), c (n_cols,) float32, the ridge weights r_w, c_w ((d + 1,) on ``[v, 1]``), and the features'
        expected squared error summed over the items whose effect is predicted, not measured (GCV error of each
        side's ridge x its unmeasured items): how well this feature view serves the items without labels.
    """
    rows, cols, resid = np.asarray(rows), np.asarray(cols), np.asarray(resid, np.float64)
    n_r, n_c = np.bincount(rows, minlength=n_rows), np.bincount(cols, minlength=n_cols)
    lab_r, lab_c = np.flatnonzero(n_r), np.flatnonzero(n_c)
    r, c = np.zeros(n_rows), np.zeros(n_cols)
    pr, pc = np.zeros(n_rows), np.zeros(n_cols)
    r_w = c_w = np.zeros(feat_rows.shape[1] + 1, np.float32)

    def step_c() -> np.ndarray:
        x = resid - r[rows]
        k = shrinkage(cols, x, pc, n_c) if prior is None else prior
        return pc + np.bincount(cols, x - pc[cols], n_cols) / (n_c + k)

    def step_r() -> np.ndarray:
        x = resid - c[cols]
        k = shrinkage(rows, x, pr, n_r) if prior is None else prior
        return pr + np.bincount(rows, x - pr[rows], n_rows) / (n_r + k)

    err = 0.0
    for it in range(rounds):
        c = step_c()
        r = step_r()
        if it in (rounds // 2, rounds - 1):  # refresh the ridge priors from the measured effects
            c_w, err_c = ridge_gcv(feat_cols[lab_c], c[lab_c], score=True)
            r_w, err_r = ridge_gcv(feat_rows[lab_r], r[lab_r], score=True)
            pc, pr = _aug(feat_cols) @ c_w, _aug(feat_rows) @ r_w
            err = err_c * (n_cols - len(lab_c)) + err_r * (n_rows - len(lab_r))
    c = step_c()
    r = step_r()
    return r.astype(np.float32), c.astype(np.float32), r_w, c_w, float(err)


# ------------------------------------------------------------------------------------------ candidates
def build_recipes(kernel: str, labels: tuple[np.ndarray, np.ndarray, np.ndarray], views: dict[str, tuple],
                  network: Any, scaler: Any, diag: bool, kinds: tuple[str, ...] = CANDIDATES,
                  probes: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
                  blocks: dict[str, list[slice]] | None = None) -> list[Recipe]:  # fmt: skip
    """The candidate recipes of one kernel.

    Args:
        kernel: "ff" or "ft".
        labels: (rows, cols, raw values) of the kernel's training pairs (Q1, self pairs excluded).
        probes: (rows, cols, raw values) of the probe columns (``label.probes``), or None: the additive estimate
            measures every row's effect from them (the network never trains on them).
        views: name -> (row vectors (M, d), column vectors (M or N, d)); ``embedding`` is required; views named
            ``lm<L>`` (teacher-LM hidden states of layer L) feed the ``additive_lm`` family.
        network: the fitted surrogate of this kernel (eval mode); scaler: its label scaler.
        diag: the exact K_FF diagonal is known (K_FF only).
        kinds: the candidate names to build (others, and those that do not apply, are skipped).
        blocks: view name -> the column slices of its blocks (the lexical view's analyzers,
            :meth:`~nncift.surrogate.views.LexicalView.block_slices`): each block's similarity gets its own weight
            when the view's cosine is calibrated. A view not named is one block.
    """
    from nncift.surrogate.network import BilinearNetwork

    rows, cols, y = labels
    has_diag = diag and kernel == "ff"  # K_FT has no diagonal: its candidates carry the K_FF names
    out: list[Recipe] = []
    blocks = blocks or {}
    cal: dict[str, tuple[np.ndarray, float]] = {}  # view -> (one weight per block, intercept)
    for view in ("embedding", "lexical"):  # the views whose cosine is a candidate (not the teacher-LM features)
        if view in views:
            vr, vc = views[view]
            cal[view] = calibrate_blocks(block_dots(vr[rows], vc[cols], blocks.get(view)), y, groups=rows)
    lex_w = {}  # the calibrated lexical form and its info
    if "lexical" in views:
        al, bl = cal["lexical"]
        lex_w = {"W": affine_form(views["lexical"][0].shape[1], al, bl, blocks.get("lexical")),
                 "info": {"a": al.tolist(), "b": bl}}  # fmt: skip
    d_emb = views["embedding"][0].shape[1]
    mu = float(np.mean(y)) if len(y) else 0.0

    def add(name: str, **kw: Any) -> None:
        if name in kinds:
            out.append(Recipe(name, kernel, **kw))

    if not diag:  # with the exact diagonal, diag_cosine / diag_lexical dominate the plain zero-label cosines
        add("cosine", free=True, view="embedding", W=affine_form(d_emb, 1.0, 0.0), info={"zero_label": True})
        if "lexical" in views:
            add("lexical", free=True, view="lexical", W=affine_form(views["lexical"][0].shape[1], 1.0, 0.0),
                info={"zero_label": True})  # fmt: skip
    else:
        add("diag_const", free=True, view="embedding", W=affine_form(d_emb, 0.0, mu), diag=has_diag)
    a, b = float(cal["embedding"][0][0]), cal["embedding"][1]
    add("diag_cosine", free=True, view="embedding", W=affine_form(d_emb, a, b), diag=has_diag, info={"a": a, "b": b})
    if "lexical" in views:
        add("diag_lexical", free=True, view="lexical", W=lex_w["W"], diag=has_diag, info=dict(lex_w["info"]))
    add("surrogate", free=False, network=True, diag=has_diag, info={"kind": getattr(network, "kind", None)})
    if isinstance(network, BilinearNetwork):
        s = np.float32(scaler.hi - scaler.lo)
        w_net = bilinear_form(network) * s
        w_net[-1, -1] += np.float32(scaler.lo)
        w_cos = affine_form(d_emb, a, b)
        for lam in SHRINK:
            add(f"shrink_{lam:g}", free=False, view="embedding", W=((1 - lam) * w_net + lam * w_cos).astype(np.float32),
                diag=has_diag, info={"lambda": lam})  # fmt: skip
    if {"additive", "additive_lexical", "additive_lm"} & set(kinds) and len(y):
        vr, vc = views["embedding"]
        if probes is not None and len(probes[0]):
            rows, cols, y = (np.concatenate([x, p]) for x, p in zip((rows, cols, y), probes, strict=True))
        resid = y - (a * np.einsum("pd,pd->p", vr[rows], vc[cols]) + b)
        feats = {"additive": "embedding"} if "additive" in kinds else {}
        if "additive_lm" in kinds:
            feats.update({f"additive_{v}": v for v in views if v.startswith("lm")})
        for name, view in feats.items():
            fr, fc = views[view]
            r, c, r_w, c_w, err = additive_effects(rows, cols, resid, len(vr), len(vc), fr, fc)
            out.append(Recipe(name, kernel, free=False, view="embedding", W=affine_form(d_emb, a, b), r=r, c=c,
                              r_w=r_w, c_w=c_w, diag=has_diag, effect_view=view,
                              info={"a": a, "b": b, "effect_error": err}))  # fmt: skip
        if "lexical" in views and "additive_lexical" in kinds:  # the same effects on the lexical view's cosine
            lr_, lc_ = views["lexical"]
            w_l = lex_w["W"]
            resid_l = y - np.einsum("pd,pd->p", _aug(lr_[rows]) @ w_l, _aug(lc_[cols]))
            r, c, r_w, c_w, _ = additive_effects(rows, cols, resid_l, len(vr), len(vc), vr, vc)
            out.append(Recipe("additive_lexical", kernel, free=False, view="lexical", W=w_l, r=r, c=c, r_w=r_w,
                              c_w=c_w, diag=has_diag, effect_view="embedding", info=dict(lex_w["info"])))  # fmt: skip
    if "lexical" in views and "metric_lexical" in kinds and len(y) >= 3:
        lr_, lc_ = views["lexical"]
        w0 = np.diag(lex_w["W"])[:-1].astype(np.float64)
        w_m, b_m, info = metric_form(lr_, lc_, labels[0], labels[1], labels[2], w0)
        form = np.zeros_like(lex_w["W"])
        form[np.arange(len(w_m)), np.arange(len(w_m))] = w_m
        form[-1, -1] = b_m
        add("metric_lexical", free=False, view="lexical", W=form, diag=has_diag, info=info)
    return out


def narrow_family(recipes: dict[str, list[Recipe]], keep: str | None = None) -> dict[str, list[Recipe]]:
    """One member of the additive family (``additive``, ``additive_lm<L>``: the same estimate, its per-item effects
    predicted from different features) takes part in the held-out choice: the one whose features predict the
    measured effects best (the least summed ``effect_error`` over the kernels), plus ``keep`` (a forced
    ``choose.mode``). Near-identical candidates only add noise to a choice that keeps the best-scoring one.

    Args:
        recipes: kernel -> its candidates (:func:`build_recipes`).

    Returns:
        The same mapping without the other members (the same names in every kernel).
    """
    err: dict[str, float] = {}
    for recs in recipes.values():
        for r in recs:
            if "effect_error" in r.info:
                err[r.name] = err.get(r.name, 0.0) + r.info["effect_error"]
    if len(err) < 2:
        return recipes
    best = min(err, key=lambda n: (err[n], _rank(n, PREFERENCE)))
    drop = set(err) - {best, keep}
    log.info("choose: the additive family's effects are predicted best from %s (summed GCV error %s)",
             best, ", ".join(f"{n} {v:.3g}" for n, v in sorted(err.items(), key=lambda kv: kv[1])))  # fmt: skip
    return {k: [r for r in recs if r.name not in drop] for k, recs in recipes.items()}


class Estimates:
    """Rows of each candidate's estimate of one kernel, computed from its recipe (nothing of size M x M).

    Args:
        recipes: the kernel's candidates.
        views: name -> (row vectors (M, d), column vectors (C, d)).
        network_head: the surrogate's estimator factors (``Surrogate.estimator`` output) + ``lo`` / ``hi``.
        diag: (M,) float32 exact K_FF diagonal (or None).
    """

    def __init__(self, recipes: list[Recipe], views: dict[str, tuple], network_head: dict | None,
                 diag: np.ndarray | None):  # fmt: skip
        self.recipes = {r.name: r for r in recipes}
        self.views, self.net, self.diag = views, network_head, diag

    def rows(self, name: str, rows: np.ndarray) -> np.ndarray:
        """(len(rows), C) float32 raw estimate of the given rows over every column (exact diagonal included)."""
        from nncift.surrogate.predict import predict_factors

        rec = self.recipes[name]
        rows = np.asarray(rows, np.int64)
        if rec.network:
            h = self.net
            sub = {**h, "p": np.asarray(h["p"])[rows]}
            out = predict_factors(sub) * np.float32(h["hi"] - h["lo"]) + np.float32(h["lo"])
        else:
            vr, vc = self.views[rec.view]
            p, q = dot_factors(rec, vr[rows], vc, None if rec.r is None else rec.r[rows], rec.c)
            out = p @ q.T
        out = np.asarray(out, np.float32)
        if rec.diag and self.diag is not None:
            out[np.arange(len(rows)), rows] = self.diag[rows]
        return out


# ------------------------------------------------------------------------------------------ the criterion
@dataclass
class Probe:
    """What one candidate picked for the held-out rows: ``picks`` (b,) column indices; ``top`` (R, L) the columns of
    its picks it ranks best for each row; ``near`` (R, L) its best columns of each row over the whole pool, the
    row's own column excluded; ``cap_top`` (R, L) its best K_FT columns per row (FLMI / FLCG caps), or None.
    These are the pairs the teacher labels."""

    picks: np.ndarray
    top: np.ndarray
    near: np.ndarray
    cap_top: np.ndarray | None = None


@dataclass
class Criterion:
    """The rows the criterion reads (``rows`` (R,) int64 sorted), the selection budget over them, whether they are
    the whole pool, and how many of each candidate's best-ranked picks per row the teacher labels (``top``).
    ``cols`` / ``tcols``: the pool / target columns the candidates may pick among (sorted int64; None: every
    column), for a teacher that pays per item (:func:`criterion_items`)."""

    rows: np.ndarray
    budget: int
    whole: bool
    top: int
    cols: np.ndarray | None = None
    tcols: np.ndarray | None = None


def criterion_rows(m: int, rows: int, whole_pool: int, fraction: float, seed: int, top: int = 5,
                   whole_top: int = 3) -> Criterion:  # fmt: skip
    """The rows the criterion reads and the selection budget over them.

    A pool of at most ``whole_pool`` items is read whole: every row, the selection's own budget
    (``fraction x M``), ``whole_top`` labeled picks per row, so each candidate's picks are its full selection and
    the score is the objective itself. A larger pool: ``min(rows, M // 3)`` seeded rows, the budget scaled to
    them, ``top`` labeled picks per row.
    """
    if m <= whole_pool:
        return Criterion(np.arange(m, dtype=np.int64), max(1, int(fraction * m)), True, whole_top)
    rng = np.random.default_rng([seed, 21])
    n_rows = int(min(rows, max(2, m // 3)))
    picked = np.sort(rng.choice(m, n_rows, replace=False)).astype(np.int64)
    return Criterion(picked, max(1, round(fraction * n_rows)), False, top)


def criterion_items(held_out: np.ndarray, pool_items: np.ndarray, target_items: np.ndarray, fraction: float,
                    top: int = 5) -> Criterion:  # fmt: skip
    """The criterion of a teacher that pays per item (one feature per distinct item, e.g. LESS): once an item is
    featurised, its pairs with every other featurised item are free. The rows are ``held_out`` (R,) new pool
    items (the only items the criterion featurises), the candidates pick among the items the label plan already
    featurised (``pool_items``, ``target_items``) and the held-out rows themselves, and the budget is scaled to
    the rows as in the sampled criterion. Without this, each candidate's picks over the whole pool would
    featurise items nothing else touches (the whole-pool criterion: every pool item)."""
    held_out = np.sort(np.asarray(held_out, np.int64))
    cols = np.union1d(np.asarray(pool_items, np.int64), held_out)
    tcols = np.sort(np.asarray(target_items, np.int64)) if len(target_items) else None
    return Criterion(held_out, max(1, round(fraction * len(held_out))), False, top, cols, tcols)


def probe_criterion(ff: Estimates, ft: Estimates | None, crit: Criterion, objective: str, eta: float = 1.0,
                    nu: float = 1.0) -> dict[str, Probe]:  # fmt: skip
    """:func:`probe_fl` on the criterion's rows and columns (the whole-pool criterion asks no neighbour pairs)."""
    return probe_fl(ff, ft, crit.rows, crit.budget, crit.top, objective, eta, nu, near=not crit.whole,
                    cols=crit.cols, tcols=crit.tcols)  # fmt: skip


def decide_criterion(crit: Criterion, fl: dict[str, np.ndarray], probes: dict[str, Probe], known_ff: Known,
                     free: dict[str, bool], z: float = 1.0, z_near: float = 1.0
                     ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:  # fmt: skip
    """The decision for the criterion's mode (:func:`decide_whole` on a whole pool, else :func:`decide` with the
    neighbour score) and the per-row second score it read (the objective itself on a whole pool)."""
    if crit.whole:
        return decide_whole(fl, free=free), fl
    near = score_near(probes, crit.rows, known_ff)
    return decide(fl, near, z, z_near, free=free), near


def probe_fl(ff: Estimates, ft: Estimates | None, rows: np.ndarray, budget: int, top: int, objective: str,
             eta: float = 1.0, nu: float = 1.0, near: bool = True, cols: np.ndarray | None = None,
             tcols: np.ndarray | None = None) -> dict[str, Probe]:  # fmt: skip
    """Each candidate's greedy selection for the held-out ``rows`` over every column (or over ``cols``), and the
    pairs to label.

    The rows' objective is the run's (FL, FLMI, FLCG) on each candidate's own estimate, min-max scaled over
    the rows' rectangle, with ``budget`` picks. Without ``near`` the probes ask no neighbour pairs (the
    whole-pool criterion reads the objective alone). ``cols`` / ``tcols`` (sorted int64; ``rows`` among
    ``cols``): the only pool / target columns a candidate may pick or rank (:func:`criterion_items`).

    Returns:
        name -> :class:`Probe` (global column indices).
    """
    from nncift.selection.greedy import OBJECTIVES, lazy_greedy, minmax_scale

    obj = OBJECTIVES.get(objective)
    own = np.asarray(rows, np.int64) if cols is None else np.searchsorted(cols, rows)  # each row's own column
    if cols is not None and not np.array_equal(cols[np.minimum(own, len(cols) - 1)], rows):
        raise ValueError("probe_fl: every criterion row must be one of the columns it may pick")
    glob = (lambda x: x) if cols is None else (lambda x: cols[x])
    out = {}
    for name in ff.recipes:
        e = ff.rows(name, rows)
        e = e if cols is None else e[:, cols]
        k, floor, cap_top = minmax_scale(e), None, None
        if obj.cap is not None or obj.floor is not None:  # FLMI / FLCG: each row's best K_FT value bounds it
            ef = ft.rows(name, rows)
            ef = ef if tcols is None else ef[:, tcols]
            best = minmax_scale(ef).max(axis=1)
            cap_top = np.argsort(-ef, axis=1, kind="stable")[:, :top]
            cap_top = cap_top if tcols is None else tcols[cap_top]
            if obj.cap is not None:
                k = np.minimum(k, obj.cap(eta, best)[:, None])
            if obj.floor is not None:
                floor = obj.floor(nu, best)
        picks, _ = lazy_greedy(k, min(budget, k.shape[1]), floor)
        picks = np.asarray(picks, np.int64)
        sub = e[:, picks]
        order = np.argsort(-sub, axis=1, kind="stable")[:, : min(top, len(picks))]
        nb = np.zeros((len(rows), 0), np.int64)
        if near:
            off = e.copy()
            off[np.arange(len(rows)), own] = -np.inf  # K_FF: the row's own column is not a neighbour
            nb = glob(np.argsort(-off, axis=1, kind="stable")[:, : min(top, e.shape[1] - 1)])
        out[name] = Probe(glob(picks), glob(picks[order]), nb, cap_top)
    return out


def probe_pairs(probes: dict[str, Probe], rows: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The distinct (row, col) pairs the probes need labeled, per kernel: ``{"ff": (rows, cols), "ft": ...}``."""
    out = {}
    for kernel, attrs in (("ff", ("top", "near")), ("ft", ("cap_top",))):
        parts = [getattr(p, a) for p in probes.values() for a in attrs if getattr(p, a) is not None]
        if not parts:
            continue
        r = np.concatenate([np.repeat(rows, x.shape[1]) for x in parts])
        c = np.concatenate([x.reshape(-1) for x in parts])
        pairs = np.unique(np.stack([r, c], 1), axis=0)
        out[kernel] = (pairs[:, 0].astype(np.int64), pairs[:, 1].astype(np.int64))
    return out


class Known:
    """Teacher values known for (row, col) pairs of one kernel (training, evaluation, diagonal, choose labels):
    vectorised lookup by sorted int64 keys."""

    def __init__(self, rows: np.ndarray, cols: np.ndarray, values: np.ndarray, n_cols: int):
        keys = np.asarray(rows, np.int64) * n_cols + np.asarray(cols, np.int64)
        keys, first = np.unique(keys, return_index=True)
        self.keys, self.values, self.n_cols = keys, np.asarray(values, np.float64)[first], n_cols

    def extended(self, rows: np.ndarray, cols: np.ndarray, values: np.ndarray) -> Known:
        """A lookup over these values and the new ones (a pair known twice keeps its first value)."""
        r, c = np.divmod(self.keys, self.n_cols)
        return Known(np.concatenate([r, rows]), np.concatenate([c, cols]), np.concatenate([self.values, values]),
                     self.n_cols)  # fmt: skip

    def lookup(self, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(values, found) for broadcastable ``rows`` x ``cols`` index arrays (values NaN where unknown)."""
        keys = np.asarray(rows, np.int64) * self.n_cols + np.asarray(cols, np.int64)
        at = np.clip(np.searchsorted(self.keys, keys), 0, max(0, len(self.keys) - 1))
        found = (self.keys[at] == keys) if len(self.keys) else np.zeros(keys.shape, bool)
        return np.where(found, self.values[at] if len(self.keys) else np.nan, np.nan), found


def score_probes(probes: dict[str, Probe], rows: np.ndarray, known_ff: Known, known_ft: Known | None,
                 objective: str, eta: float = 1.0, nu: float = 1.0) -> dict[str, np.ndarray]:  # fmt: skip
    """Per-row objective contributions of each candidate's picks under the teacher's values.

    For row i, ``m_i`` = the best teacher value among the candidate's picks whose pair with i is known (its own
    top-L, the other candidates', the diagonal and any earlier label): FL ``m_i``; FLMI ``min(m_i, eta c_i)``;
    FLCG ``max(m_i - nu c_i, 0)``, with ``c_i`` the best known K_FT value of the row, both kernels min-max
    scaled over their known values as the selection scales the full kernels.

    Returns:
        name -> (R,) float64 per-row contributions (their mean is the candidate's held-out score).
    """
    from nncift.selection.greedy import OBJECTIVES

    obj = OBJECTIVES.get(objective)
    lo, hi = float(known_ff.values.min()), float(known_ff.values.max())
    span = hi - lo if hi > lo else 1.0
    best = None
    if obj.cap is not None or obj.floor is not None:
        vals, ok = known_ft.lookup(rows[:, None], np.arange(known_ft.n_cols)[None, :])
        lo_t, hi_t = float(known_ft.values.min()), float(known_ft.values.max())
        best = (np.where(ok, vals, -np.inf).max(axis=1) - lo_t) / (hi_t - lo_t if hi_t > lo_t else 1.0)
        best = np.where(np.isfinite(best), best, 0.0)
    out = {}
    for name, p in probes.items():
        vals, ok = known_ff.lookup(rows[:, None], p.picks[None, :])
        m = (np.where(ok, vals, -np.inf).max(axis=1) - lo) / span
        m = np.where(np.isfinite(m), m, 0.0)
        if obj.cap is not None:
            m = np.minimum(m, obj.cap(eta, best))
        if obj.floor is not None:
            m = np.maximum(m - obj.floor(nu, best), 0.0)
        out[name] = m
    return out


def score_near(probes: dict[str, Probe], rows: np.ndarray, known_ff: Known) -> dict[str, np.ndarray]:
    """Per-row neighbour quality of each candidate: the mean teacher value (min-max scaled over the known values)
    of the ``L`` columns it ranks best for the row over the whole pool, the row's own column excluded.

    Returns:
        name -> (R,) float64.
    """
    lo, hi = float(known_ff.values.min()), float(known_ff.values.max())
    span = hi - lo if hi > lo else 1.0
    out = {}
    for name, p in probes.items():
        vals, ok = known_ff.lookup(rows[:, None], p.near)
        out[name] = np.nanmean(np.where(ok, (vals - lo) / span, np.nan), axis=1)
        out[name] = np.where(np.isfinite(out[name]), out[name], 0.0)
    return out


def _compare(per_row: dict[str, np.ndarray], names: list[str], z: float, rank: dict[str, int]) -> dict[str, dict]:
    """Paired comparison of ``names`` with the best mean: mean, difference, its standard error, within noise."""
    means = {n: float(np.mean(per_row[n])) for n in names}
    best = max(names, key=lambda n: (means[n], -rank[n]))
    n_rows = len(per_row[best])
    out = {}
    for n in names:
        diff = per_row[best] - per_row[n]
        se = float(diff.std(ddof=1) / np.sqrt(n_rows)) if n_rows > 1 else 0.0
        out[n] = {"mean": means[n], "diff_to_best": means[best] - means[n], "se": se,
                  "within_noise": bool(means[best] - means[n] <= z * se + 1e-12)}  # fmt: skip
    return out


def _rank(name: str, order: tuple[str, ...]) -> float:
    """Position of a candidate in the preference order (a family member, e.g. ``additive_lm12``, ranks with its
    family, deeper layers after shallower ones)."""
    if name in order:
        return float(order.index(name))
    fam = next((f for f in order if name.startswith(f)), None)
    if fam is None:
        return float(len(order))
    tail = name[len(fam) :].lstrip("_lm")
    return order.index(fam) + (int(tail) if tail.isdigit() else 0) / 1e4


def decide_whole(fl: dict[str, np.ndarray], order: tuple[str, ...] = PREFERENCE,
                 free: dict[str, bool] | None = None) -> dict[str, Any]:  # fmt: skip
    """The choice when the criterion read the whole pool: each score is (a lower bound of) the candidate's own
    full selection's objective under the teacher's values, not a sample, so the best value is kept (exact ties:
    a free candidate first, then the preference order). Same output as :func:`decide` (``near`` = the
    objective).
    """
    free = {n: n in FREE for n in fl} if free is None else free
    names = list(fl)
    rank = {n: _rank(n, order) for n in names}
    c_fl = _compare(fl, names, 0.0, rank)
    chosen = max(names, key=lambda n: (round(c_fl[n]["mean"], 12), bool(free.get(n)), -rank[n]))
    scores = {n: {"fl": c_fl[n], "near": {"mean": c_fl[n]["mean"]}, "eligible": True} for n in names}
    return {"chosen": chosen, "best_fl": chosen, "best_near": chosen, "scores": scores,
            "rows": len(next(iter(fl.values()))), "z": 0.0, "z_near": 0.0, "whole_pool": True}  # fmt: skip


def decide(fl: dict[str, np.ndarray], near: dict[str, np.ndarray], z: float = 1.0, z_near: float = 1.0,
           order: tuple[str, ...] = PREFERENCE, free: dict[str, bool] | None = None) -> dict[str, Any]:  # fmt: skip
    """The choice among candidates from their per-row held-out scores.

    1. The facility-location score filters: a candidate more than ``z`` paired standard errors below the best
       is out (it provably covers the held-out rows worse, e.g. the plain cosine on DELIFT's kernel, whose
       self-utilities it does not know).
    2. Among the rest, neighbour quality decides (it tells apart estimates whose coverage differs by less than
       row sampling can resolve, e.g. a lexical view on a text-similarity teacher): of the candidates within
       ``z_near`` standard errors of the best, the best free one when there is one (a learned estimate must
       *prove* it is better: the one-standard-error rule with ``z_near = 1``), else the best.

    Args:
        fl, near: name -> (R,) per-row scores (:func:`score_probes`, :func:`score_near`).
        order: breaks exact ties. free: name -> needs no network (default: the names of :data:`FREE`).

    Returns:
        ``{"chosen", "best_fl", "best_near", "scores": {name: {"fl": {...}, "near": {...}, "eligible"}}}``.
    """
    free = {n: n in FREE for n in fl} if free is None else free
    names = list(fl)
    rank = {n: _rank(n, order) for n in names}
    c_fl = _compare(fl, names, z, rank)
    eligible = [n for n in names if c_fl[n]["within_noise"]]
    c_near = _compare(near, eligible, z_near, rank)
    tied = [n for n in eligible if c_near[n]["within_noise"]]
    # within noise of the best: the best free candidate if there is one (free before learned), else the best
    pool = [n for n in tied if free.get(n)] or tied
    chosen = max(pool, key=lambda n: (c_near[n]["mean"], c_fl[n]["mean"], -rank[n]))
    best_fl = max(names, key=lambda n: (c_fl[n]["mean"], -rank[n]))
    best_near = max(eligible, key=lambda n: (c_near[n]["mean"], -rank[n]))
    scores = {n: {"fl": c_fl[n], "near": c_near.get(n, {"mean": float(np.mean(near[n]))}), "eligible": n in eligible}
              for n in names}  # fmt: skip
    return {"chosen": chosen, "best_fl": best_fl, "best_near": best_near, "scores": scores,
            "rows": len(next(iter(fl.values()))), "z": z, "z_near": z_near, "whole_pool": False}  # fmt: skip
