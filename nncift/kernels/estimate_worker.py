"""Blockwise estimation kernels: pure functions over explicit index ranges (no Ray here)."""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from nncift.kernels.kernel_io import write_block, write_sparse_block
from nncift.labels.plan import Block
from nncift.store import memmap_safetensors, read_parquet_metadata
from nncift.surrogate.numba_kernels import TopK
from nncift.surrogate.predict import TILE_BYTES, head_of, predict_factors

log = logging.getLogger(__name__)

DEVICE_TILE_BYTES = 256 << 20  # the same on an accelerator: large enough that kernel launches do not dominate
DEVICE_CHUNK_PAIRS = 1 << 27  # sparse stripes off the CPU: at least this many pairs (512 MiB float32) per chunk
TOPK_GROUP = 32  # columns per group of the two-step chunk top-k (:func:`_chunk_topk`)
ENGINES = ("auto", "numpy", "torch")
PRECISIONS = ("fp32", "tf32", "bf16")


def _ordered(vals: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of (vals, cols) sorted by value descending, then column ascending (:meth:`TopK.result`'s order)."""
    by_col = torch.argsort(cols, dim=1, stable=True)
    vals, cols = vals.gather(1, by_col), cols.gather(1, by_col)
    vals, by_val = torch.sort(vals, dim=1, descending=True, stable=True)
    return vals, cols.gather(1, by_val)


def _write_diagonal(out: torch.Tensor, diag: torch.Tensor, r0: int, r1: int, c0: int, c1: int) -> None:
    """:func:`overwrite_diagonal` on a device tile."""
    lo, hi = max(r0, c0), min(r1, c1, len(diag))
    if hi > lo:
        i = torch.arange(lo, hi, device=out.device)
        out[i - r0, i - c0] = diag[lo:hi]


def _diag_kept(vals: torch.Tensor, cols: torch.Tensor, diag: torch.Tensor | None, r0: int) -> torch.Tensor:
    """Kept entries (R, k) of rows [r0, r0 + R) with the exact diagonal value wherever a kept column is the row's
    own (raw units)."""
    if diag is None:
        return vals
    rows = torch.arange(r0, r0 + len(cols), device=cols.device)[:, None]
    hit = (cols == rows) & (rows < len(diag))
    return torch.where(hit, diag[rows.clamp(max=len(diag) - 1)], vals)


def _chunk_topk(chunk: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row top-k of an (R, C) chunk, and its minimum and maximum: (vals (R, k) descending, column offsets
    (R, k) int64, min, max).

    The columns are cut into groups of :data:`TOPK_GROUP` (group j: columns j, j + G, j + 2G, ..., so that
    one coalesced pass gives every group's min and max); the k groups with the largest maxima hold the row's
    top-k values (a value in another group is at most that group's max, so below k group maxima of k distinct
    groups), and the top-k is taken among their ``k * TOPK_GROUP`` entries (plus the columns past the last
    whole group). Which of several columns tied at the k-th value is kept is unspecified, as with
    ``torch.topk``."""
    r, c = chunk.shape
    g = TOPK_GROUP
    n_groups = c // g
    if n_groups < 4 * k or chunk.stride(1) != 1:
        mn, mx = torch.aminmax(chunk)
        v, i = torch.topk(chunk, k, dim=1)
        return v, i, mn, mx
    gmin, gmax = torch.aminmax(chunk[:, : n_groups * g].view(r, g, n_groups), dim=1)
    mn, mx = gmin.amin(), gmax.amax()
    _, top_groups = torch.topk(gmax, k, dim=1)
    cand = (top_groups[:, :, None] + n_groups * torch.arange(g, device=chunk.device)).reshape(r, k * g)
    if c > n_groups * g:
        rest = chunk[:, n_groups * g :]
        rmn, rmx = torch.aminmax(rest)
        mn, mx = torch.minimum(mn, rmn), torch.maximum(mx, rmx)
        cand = torch.cat([cand, torch.arange(n_groups * g, c, device=chunk.device).expand(r, -1)], 1)
    v, i = torch.topk(chunk.gather(1, cand), k, dim=1)
    return v, cand.gather(1, i), mn, mx


def _merge_topk(
    vals: torch.Tensor, cols: torch.Tensor, new_vals: torch.Tensor, new_cols: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of a running per-row top-k and a chunk's, both in :func:`_ordered` order, in that order.

    A stable sort keeps the running entries (earlier, so lower, columns) ahead of equal chunk values: as in
    :class:`~nncift.surrogate.numba_kernels.TopK`, a value replaces a kept one only when strictly greater."""
    allv, allc = torch.cat([vals, new_vals], 1), torch.cat([cols, new_cols], 1)
    allv, idx = torch.sort(allv, dim=1, descending=True, stable=True)
    return allv[:, :k], allc.gather(1, idx[:, :k])


class EstimateWorker:
    """Callable class: a batch of block specs -> Parquet blocks of estimated influence (raw label units).

    Runs unchanged in a plain loop (local executor) or as a Ray Data actor. Two engines:

    * ``numpy`` (the CPU default): the ``mlp`` factors go through the compiled
      :func:`~nncift.surrogate.numba_kernels.predict_block_np` kernel and the ``dot`` factors through one BLAS GEMM per chunk;
      a sparse stripe merges each chunk into the compiled :class:`~nncift.surrogate.numba_kernels.TopK`.
    * ``torch`` (the default off the CPU, and on the CPU for ``precision="bf16"`` or when asked for): everything
      stays on the device. A sparse stripe computes each column chunk there (``dot``: ``p @ q.T``; ``mlp``:
      :func:`predict_block`) with the exact diagonal written in, takes the chunk's extent and per-row top-k
      (:func:`_chunk_topk`) and merges it into a running top-k (a stable sort of the (R, 2k) union, so kept
      entries win ties as in ``TopK``); row sums accumulate in float64 (see :meth:`_stripe_torch`). Only the
      (R, k) columns and values, the (R,) row sums and the extent are copied back. Which of several columns
      tied at the k-th value a chunk keeps may differ from the numpy engine; the kept values and the row
      order (value descending, then column) do not. Off the CPU a chunk spans at least
      :data:`DEVICE_CHUNK_PAIRS` pairs (``col_chunk`` is the floor). A dense tile is computed on the device
      too but must come back whole: dense tiles are bounded by that copy and by the Parquet write (about 85%
      of a 4096 x 4096 tile's time on an H200), not by the compute.

    Args:
        heads: per kernel ("ff" / "ft") the surrogate's factors (:meth:`~nncift.surrogate.network.Surrogate.estimator`,
            or ``factors``: the path of a safetensors file holding ``<kernel>.p`` / ``<kernel>.q``, memory-mapped;
            ``type`` names its :data:`~nncift.surrogate.predict.HEADS` entry: "mlp" with ``p`` (M, h), ``q`` (M or
            N, h), ``w2`` (h,), ``b2``; or "dot" with ``p`` (M, k), ``q`` (M or N, k)), plus ``lo`` / ``hi`` (the
            label scaler: outputs are written in raw label units) and optionally ``diag`` ((M,) float32 raw teacher values of K_FF[i, i], written
            in place of the estimate on the diagonal).
        out_dir: folder receiving ``<kernel>_<block_id>.parquet``.
        device: torch device.
        layout: "dense" (a block is a tile) or "sparse" (a block is a row stripe reduced to its per-row top-k).
        topk: entries kept per row (sparse). col_chunk: columns predicted at once before each top-k merge.
        candidates: per kernel, the path of a MIPS index over its column factors (:mod:`nncift.surrogate.mips`); a
            sparse stripe of such a kernel scores only each row's candidates (and, for K_FF, the row's own
            column), exactly, instead of every column. Needs ``dot`` heads on the CPU.
        nprobe: IVF cells scanned per row. extent_sample: columns (a seeded sample, the same for every
            stripe) scored exhaustively for the kernel's value extent when candidates are used.
        engine: "auto" (numpy on the CPU at fp32 / tf32, torch otherwise) | "numpy" (CPU only) | "torch".
        precision: matmul precision of the torch engine's ``dot`` heads: "fp32" (default: results as the numpy
            engine's), "tf32" (TensorFloat-32 GEMMs on CUDA, set only for the duration of each call; the
            same as fp32 on the CPU) or "bf16" (p and q cast to bfloat16, float32 output). With tf32 / bf16
            the kept top-k entries are re-scored in float32, so only which columns are kept (near-ties),
            the extent and the row means carry the reduced precision. ``mlp`` heads always run in float32
            (their ``relu(p + q)`` does not survive bfloat16); candidate stripes always in numpy float32.
    """

    def __init__(
        self,
        heads: dict[str, dict],
        out_dir: str,
        device: str = "cpu",
        layout: str = "dense",
        topk: int = 32,
        col_chunk: int = 8192,
        candidates: dict[str, str] | None = None,
        nprobe: int = 32,
        extent_sample: int = 4096,
        seed: int = 0,
        engine: str = "auto",
        precision: str = "fp32",
    ):
        self.device = torch.device(device)
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if engine == "auto":
            engine = "numpy" if self.device.type == "cpu" and precision != "bf16" else "torch"
        if engine == "numpy" and (self.device.type != "cpu" or precision == "bf16"):
            raise ValueError(f"the numpy engine runs float32 on the CPU (device {device}, precision {precision})")
        self.engine, self.precision = engine, precision
        self._t: dict[str, dict] = {}  # per kernel, the torch engine's tensors (built on first use)
        self._qsum: dict[tuple, torch.Tensor] = {}  # (kernel, c0, c1) -> float64 column-factor sums (dot heads)
        self.out_dir = Path(out_dir)
        self.layout, self.topk, self.col_chunk = layout, topk, col_chunk
        self.candidates, self.nprobe, self.extent_sample, self.seed = (
            dict(candidates or {}),
            nprobe,
            extent_sample,
            seed,
        )
        self._index: dict[str, Any] = {}
        for k in self.candidates:
            if not head_of(heads[k]).factorised or self.device.type != "cpu":
                raise ValueError(f"candidate search needs a factorised ('dot') surrogate on the CPU (kernel {k})")
        self.heads = {}
        self._qbar: dict[str, np.ndarray] = {}
        for k, v in heads.items():
            if "factors" in v:  # the factors file the estimate stage wrote: memory-mapped, shared between workers
                mm = memmap_safetensors(v["factors"])
                v = {**v, "p": mm[f"{k}.p"], "q": mm[f"{k}.q"]}
            head_type = head_of(v)
            head = {"type": v["type"], "lo": float(v["lo"]), "hi": float(v["hi"])}
            head["diag"] = None if v.get("diag") is None else np.asarray(v["diag"], np.float32)
            names = ("p", "q", *head_type.arrays)
            head.update({n: float(v[n]) for n in head_type.scalars})
            if self.device.type == "cpu":
                head.update({n: np.ascontiguousarray(v[n], np.float32) for n in names})
                if head_type.q_t:
                    head["q_t"] = np.ascontiguousarray(head.pop("q").T)
            else:
                head.update({n: torch.from_numpy(np.array(v[n], np.float32)).to(self.device) for n in names})
            self.heads[k] = head

    def predict(self, kernel: str, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        """(r1-r0, c1-c0) float32 surrogate outputs (scaled label space)."""
        if self.engine == "numpy":
            return predict_factors(self.heads[kernel], r0, r1, c0, c1)
        with torch.no_grad(), self._matmul_precision():
            return self._scores(kernel, r0, r1, c0, c1).cpu().numpy()

    def predict_raw(self, kernel: str, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        """Like :meth:`predict` in raw label units, with exact diagonal values where the head has them.

        On the torch engine the scaling and the diagonal are applied on the device, then the whole tile is
        copied back (the dense layout's bound, with its Parquet write)."""
        if self.engine == "torch":
            with torch.no_grad(), self._matmul_precision():
                return self._raw(kernel, r0, r1, c0, c1).cpu().numpy()
        head = self.heads[kernel]
        vals = self.predict(kernel, r0, r1, c0, c1) * np.float32(head["hi"] - head["lo"]) + np.float32(head["lo"])
        if head["diag"] is not None:
            overwrite_diagonal(vals, head["diag"], r0, r1, c0, c1)
        return vals

    def run_block(self, block: Block) -> int:
        path = self.out_dir / f"{block.name}.parquet"
        if self.layout == "sparse" and block.kernel in self.candidates:
            return self._run_candidates(block, path)
        if self.layout == "dense":
            vals = self.predict_raw(block.kernel, block.r0, block.r1, block.c0, block.c1)
            write_block(path, block, vals)
            return vals.size
        tk = TopK(block.r1 - block.r0, min(self.topk, block.c1 - block.c0))
        lo, hi, sums = self.stripe(block, tk)
        # the torch engine leaves tk in result order already (no host sort)
        cols, vals = (tk.cols, tk.vals) if self.engine == "torch" else tk.result()
        write_sparse_block(path, block, cols, vals, self.topk, (lo, hi), sums / (block.c1 - block.c0))
        return (block.r1 - block.r0) * (block.c1 - block.c0)

    def stripe(
        self, block: Block, tk: TopK, lo: float = np.inf, hi: float = -np.inf, sums: np.ndarray | None = None
    ) -> tuple[float, float, np.ndarray]:
        """Stream columns [c0, c1) of rows [r0, r1) into ``tk`` (per-row top-k) in ``col_chunk`` chunks.

        Args:
            lo, hi, sums: running extent and (r1-r0,) float64 row sums to continue (default: none yet).

        Returns:
            (lo, hi, sums): the extent of every estimated value, kept ones or not (the kernel's scaling), and
            each row's sum over every column (exact top-k-objective means).
        """
        if self.engine == "torch":
            return self._stripe_torch(block, tk, lo, hi, sums)
        sums = np.zeros(block.r1 - block.r0) if sums is None else sums
        for c0 in range(block.c0, block.c1, self.col_chunk):
            c1 = min(block.c1, c0 + self.col_chunk)
            chunk = self.predict_raw(block.kernel, block.r0, block.r1, c0, c1)
            lo, hi = min(lo, float(chunk.min())), max(hi, float(chunk.max()))
            sums += chunk.sum(axis=1, dtype=np.float64)
            tk.update(chunk, c0)
        return lo, hi, sums

    # ------------------------------------------------------------------ torch engine
    @contextmanager
    def _matmul_precision(self):
        """precision="tf32" on CUDA: TensorFloat-32 float32 GEMMs for the duration of the block (restored after;
        the process-wide setting, so one block at a time per process, as workers run)."""
        if self.precision != "tf32" or self.device.type != "cuda":
            yield
            return
        old = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(old)

    def _tensors(self, kernel: str) -> dict[str, Any]:
        """The torch engine's view of a head on the device: ``p``, ``q`` (C, f), ``w2``, ``diag`` (or None) and,
        for bf16 ``dot`` heads, bfloat16 copies ``p16`` / ``q16`` (made once)."""
        t = self._t.get(kernel)
        if t is not None:
            return t
        h = self.heads[kernel]

        def tensor(x):
            if isinstance(x, torch.Tensor):
                return x.to(self.device)
            with warnings.catch_warnings():  # read-only memory maps: never written through
                warnings.simplefilter("ignore", UserWarning)
                return torch.from_numpy(np.asarray(x)).to(self.device)

        head_type = head_of(h)
        t = {"p": tensor(h["p"]), "q": tensor(h["q"]) if "q" in h else tensor(h["q_t"]).T}
        t.update({n: tensor(h[n]) for n in head_type.arrays})
        t["diag"] = None if h["diag"] is None else tensor(h["diag"])
        scale = float(np.float32(h["hi"] - h["lo"]))
        if h["diag"] is not None and scale > 0:  # the exact diagonal in the scaled label space (chunks kept there)
            scaled = (h["diag"].astype(np.float64) - float(np.float32(h["lo"]))) / scale
            t["diag_scaled"] = tensor(scaled.astype(np.float32))
        if head_type.factorised and self.precision == "bf16":  # the head's GEMMs in bfloat16 (float32 output)
            t["p16"], t["q16"] = t["p"].to(torch.bfloat16), t["q"].to(torch.bfloat16)
        self._t[kernel] = t
        return t

    def _scores(self, kernel: str, r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
        """(r1-r0, c1-c0) float32 surrogate outputs (scaled label space) on the device."""
        h, t = self.heads[kernel], self._tensors(kernel)
        tile = TILE_BYTES if self.device.type == "cpu" else DEVICE_TILE_BYTES
        return head_of(h).scores_torch(t, h, r0, r1, c0, c1, tile)

    def _raw(self, kernel: str, r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
        """:meth:`_scores` in raw label units with the exact diagonal (as :meth:`predict_raw`), on the device."""
        h, t = self.heads[kernel], self._tensors(kernel)
        out = self._scores(kernel, r0, r1, c0, c1)
        out.mul_(float(np.float32(h["hi"] - h["lo"]))).add_(float(np.float32(h["lo"])))
        if t["diag"] is not None:
            _write_diagonal(out, t["diag"], r0, r1, c0, c1)
        return out

    @torch.no_grad()
    def _rescore(self, kernel: str, r0: int, vals: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The kept entries of rows [r0, r0 + R) of a ``dot`` head re-scored in float32 (elementwise products,
        no reduced-precision GEMM), the exact diagonal kept; re-ordered."""
        h, t = self.heads[kernel], self._tensors(kernel)
        scale, lo0 = float(np.float32(h["hi"] - h["lo"])), float(np.float32(h["lo"]))
        out = torch.empty_like(vals)
        step = max(1, DEVICE_CHUNK_PAIRS // max(1, cols.shape[1] * t["p"].shape[1]))
        for a in range(0, len(cols), step):
            c = cols[a : a + step].clamp_min(0)
            p = t["p"][r0 + a : r0 + a + len(c)]
            out[a : a + len(c)] = (t["q"][c] * p[:, None, :]).sum(-1)
        out = _diag_kept(out.mul_(scale).add_(lo0), cols, t["diag"], r0)
        out = torch.where(cols >= 0, out, torch.full_like(out, -np.inf))
        return _ordered(out, cols)

    def _dot_row_sums(self, kernel: str, block: Block) -> torch.Tensor:
        """(R,) float64 raw-unit row sums of a ``dot`` head's stripe from its factors, in float64:
        ``scale * p_i . sum_j q_j + lo * C``, the exact diagonal in place of the estimate (no pass over the
        scores; as the candidate stripes' row means)."""
        h, t = self.heads[kernel], self._tensors(kernel)
        key = (kernel, block.c0, block.c1)
        if key not in self._qsum:
            q, step = t["q"], 1 << 16
            self._qsum[key] = sum(
                q[a : min(a + step, block.c1)].double().sum(0) for a in range(block.c0, block.c1, step)
            )
        scale, lo0 = float(np.float32(h["hi"] - h["lo"])), float(np.float32(h["lo"]))
        p = t["p"][block.r0 : block.r1].double()
        out = (p @ self._qsum[key]) * scale + lo0 * (block.c1 - block.c0)
        if t["diag"] is not None:
            d_lo, d_hi = max(block.r0, block.c0), min(block.r1, block.c1, len(t["diag"]))
            if d_hi > d_lo:
                est = (t["p"][d_lo:d_hi].double() * t["q"][d_lo:d_hi].double()).sum(1) * scale + lo0
                out[d_lo - block.r0 : d_hi - block.r0] += t["diag"][d_lo:d_hi].double() - est
        return out

    @torch.no_grad()
    def _stripe_torch(
        self, block: Block, tk: TopK, lo: float, hi: float, sums: np.ndarray | None
    ) -> tuple[float, float, np.ndarray]:
        """:meth:`stripe` on the device: only the (R, k) top-k, the row sums and the extent come back (into
        ``tk``, left in :meth:`TopK.result` order).

        With a positive scale (``hi > lo``) the chunks stay in the scaled label space, which the raw units
        (``x * scale + lo``, rounded as the numpy engine rounds) preserve the order of: the top-k and the
        extent are taken there and converted at the end; the exact diagonal competes scaled and is written
        exactly into the kept entries. That spares two passes over every chunk. Row sums: ``dot`` heads from
        the factors (:meth:`_dot_row_sums`, no pass), ``mlp`` heads as float32 chunk sums accumulated in
        float64. Each chunk's top-k comes from the k column groups of :data:`TOPK_GROUP` with the largest
        maxima (one pass gives the group maxima and minima, i.e. the extent too); these hold the chunk's top-k.
        """
        dev, n, k, kernel = self.device, block.r1 - block.r0, tk.k, block.kernel
        h, t = self.heads[kernel], self._tensors(kernel)
        factorised = head_of(h).factorised
        scale, lo0 = np.float32(h["hi"] - h["lo"]), np.float32(h["lo"])
        deferred = bool(scale > 0)  # else: raw units in every chunk
        a, b = (float(scale), float(lo0)) if deferred else (1.0, 0.0)
        vals = torch.full((n, k), -np.inf, dtype=torch.float32, device=dev)
        cols = torch.full((n, k), -1, dtype=torch.int64, device=dev)
        acc = torch.zeros(n, dtype=torch.float64, device=dev)
        ext = torch.tensor([np.inf, np.inf], dtype=torch.float32, device=dev)  # running (min, -max), chunk units
        step = self.col_chunk if dev.type == "cpu" else max(self.col_chunk, DEVICE_CHUNK_PAIRS // max(1, n))
        with self._matmul_precision():
            for c0 in range(block.c0, block.c1, step):
                c1 = min(block.c1, c0 + step)
                if deferred:
                    chunk = self._scores(kernel, block.r0, block.r1, c0, c1)
                    if t["diag"] is not None:
                        _write_diagonal(chunk, t["diag_scaled"], block.r0, block.r1, c0, c1)
                else:
                    chunk = self._raw(kernel, block.r0, block.r1, c0, c1)
                if not factorised:  # float32 chunk sums, accumulated in float64 (factorised: from the factors)
                    acc += chunk.sum(1).double().mul_(a).add_(b * (c1 - c0))
                cv, ci, mn, mx = _chunk_topk(chunk, min(k, c1 - c0))
                ext = torch.minimum(ext, torch.stack([mn, -mx]))
                cv, cc = _ordered(cv, ci + c0)
                vals, cols = _merge_topk(vals, cols, cv, cc, k)
                del chunk
        if factorised:
            acc = self._dot_row_sums(kernel, block)
        ext = ext.cpu().numpy()
        ext_lo, ext_hi = (float(np.float32(v) * np.float32(a) + np.float32(b)) for v in (ext[0], -ext[1]))
        if self.precision != "fp32" and factorised:
            vals, cols = self._rescore(kernel, block.r0, vals, cols)  # exact float32 raw values, exact diagonal
        else:
            vals = _diag_kept(vals.mul_(a).add_(b) if deferred else vals, cols, t["diag"], block.r0)
            vals, cols = _ordered(vals, cols)
        if t["diag"] is not None:  # the exact diagonal values of the stripe count in the extent as they are
            d_lo, d_hi = max(block.r0, block.c0), min(block.r1, block.c1, len(t["diag"]))
            if d_hi > d_lo:
                d = h["diag"][d_lo:d_hi]
                ext_lo, ext_hi = min(ext_lo, float(d.min())), max(ext_hi, float(d.max()))
        if np.isfinite(tk.vals).any():  # a running top-k to continue (ExtendWorker): its entries come first
            old_v, old_c = _ordered(torch.from_numpy(tk.vals).to(dev), torch.from_numpy(tk.cols).to(dev))
            vals, cols = _merge_topk(old_v, old_c, vals, cols, k)
        tk.vals[:], tk.cols[:] = vals.cpu().numpy(), cols.cpu().numpy()
        sums = acc.cpu().numpy() if sums is None else np.asarray(sums, np.float64) + acc.cpu().numpy()
        return min(lo, ext_lo), max(hi, ext_hi), sums

    def _run_candidates(self, block: Block, path: Path) -> int:
        """A sparse stripe from candidate search: each row's MIPS candidates (plus its own column for K_FF, which
        holds the exact diagonal) scored exactly, the top-k kept; row means exact from the column factors' mean;
        the extent from the kept values and a fixed column sample. Returns the columns scored per row x rows."""
        from nncift.surrogate import mips

        h, kernel = self.heads[block.kernel], block.kernel
        if kernel not in self._index:
            self._index[kernel] = mips.load_index(self.candidates[kernel])
        n_cols = len(h["q"])
        if (block.c0, block.c1) != (0, n_cols):
            raise ValueError(f"candidate search needs whole row stripes, got columns [{block.c0}, {block.c1})")
        rows = np.arange(block.r0, block.r1)
        p = h["p"][block.r0 : block.r1]
        k = min(self.topk, n_cols)
        has_diag = h["diag"] is not None
        cand = mips.search(self._index[kernel], p, min(k + has_diag, n_cols), self.nprobe)
        if has_diag:  # the row's own column, with its exact value, always competes
            cand = np.where(cand == rows[:, None], -1, cand)
            cand = np.concatenate([cand, rows[:, None]], axis=1)
        scale, lo0 = np.float32(h["hi"] - h["lo"]), np.float32(h["lo"])
        valid = cand >= 0
        q_c = h["q"][np.where(valid, cand, 0)]  # (R, k', kf)
        vals = np.einsum("rf,rcf->rc", p, q_c, dtype=np.float32) * scale + lo0
        if h["diag"] is not None:
            vals[:, -1] = h["diag"][rows]
        vals[~valid] = -np.inf
        order = np.lexsort((np.where(valid, cand, np.iinfo(np.int64).max), -vals), axis=1)[:, :k]
        cols, vals = np.take_along_axis(cand, order, 1), np.take_along_axis(vals, order, 1)
        cols[~np.isfinite(vals)] = -1
        # extent: every kept value and a fixed seeded column sample scored exhaustively
        sample = self._sample_cols(kernel, n_cols)
        vs = (p @ h["q"][sample].T) * scale + lo0
        if h["diag"] is not None:
            hit = sample[None, :] == rows[:, None]
            vs = np.where(hit, h["diag"][rows][:, None], vs)
        kept = vals[np.isfinite(vals)]
        lo = float(min(vs.min(), kept.min() if kept.size else np.inf))
        hi = float(max(vs.max(), kept.max() if kept.size else -np.inf))
        if kernel not in self._qbar:
            self._qbar[kernel] = h["q"].mean(axis=0, dtype=np.float64)
        means = (p.astype(np.float64) @ self._qbar[kernel]) * float(scale) + float(lo0)
        if h["diag"] is not None:  # the diagonal holds the teacher's value, not the estimate
            est = np.einsum("rf,rf->r", p, h["q"][rows], dtype=np.float64) * float(scale) + float(lo0)
            means += (h["diag"][rows].astype(np.float64) - est) / n_cols
        write_sparse_block(path, block, cols, vals.astype(np.float32), self.topk, (lo, hi), means)
        return (block.r1 - block.r0) * cand.shape[1]

    def exact_topk(self, kernel: str, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exhaustive top-k of any rows (raw units, exact diagonal): (cols (R, k) int64, vals (R, k) float32)."""
        h = self.heads[kernel]
        rows = np.asarray(rows, np.int64)
        n_cols = len(h["q"] if "q" in h else h["q_t"].T)
        tk = TopK(len(rows), min(self.topk, n_cols))
        sub = {**h, "p": h["p"][rows]}
        scale, lo0 = np.float32(h["hi"] - h["lo"]), np.float32(h["lo"])
        for c0 in range(0, n_cols, self.col_chunk):
            c1 = min(n_cols, c0 + self.col_chunk)
            chunk = predict_factors(sub, 0, None, c0, c1) * scale + lo0
            if h["diag"] is not None:
                hit = np.flatnonzero((rows >= c0) & (rows < c1))
                chunk[hit, rows[hit] - c0] = h["diag"][rows[hit]]
            tk.update(chunk, c0)
        return tk.result()

    def _sample_cols(self, kernel: str, n_cols: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 1 if kernel == "ff" else 2])
        n = min(n_cols, self.extent_sample)
        return np.arange(n_cols) if n == n_cols else np.sort(rng.choice(n_cols, n, replace=False))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pairs = []
        for i in range(len(batch["block_id"])):
            block = Block(
                **{k: (str(batch[k][i]) if k == "kernel" else int(batch[k][i])) for k in Block.__annotations__}
            )
            pairs.append(self.run_block(block))
        return {"block_id": np.asarray(batch["block_id"]), "pairs": np.asarray(pairs, dtype=np.int64)}


class ExtendWorker(EstimateWorker):
    """:class:`EstimateWorker` for kernels grown by new items (``nncift score``).

    A sparse K_FF block of existing rows whose columns start at ``c0 > 0`` covers only the new columns
    [c0, c1): it is merged with the row stripe of the same name in ``base_dir`` (those rows' top-k, row means
    and extent over the old columns [0, c0)) into one stripe over [0, c1), keeping k per row. Every other block
    is estimated as :class:`EstimateWorker` does.

    Args:
        base_dir: the estimate stage's block folder. Others: as :class:`EstimateWorker`.
    """

    def __init__(self, heads: dict[str, dict], out_dir: str, base_dir: str, **kwargs):
        super().__init__(heads, out_dir, **kwargs)
        self.base_dir = Path(base_dir)

    def run_block(self, block: Block) -> int:
        if self.layout != "sparse" or block.c0 == 0:
            return super().run_block(block)
        base = self.base_dir / f"{block.name}.parquet"
        old = Block(**read_parquet_metadata(base)["block"])
        if (old.kernel, old.r0, old.r1, old.c0, old.c1) != (block.kernel, block.r0, block.r1, 0, block.c0):
            raise RuntimeError(f"{base}: stripe {old} does not cover rows [{block.r0}, {block.r1}) x [0, {block.c0})")
        t = pq.read_table(base)
        lo, hi = read_parquet_metadata(base)["extent"]
        n, k_old = block.r1 - block.r0, len(t.column("cols").combine_chunks().flatten()) // (block.r1 - block.r0)
        tk = TopK(n, min(self.topk, block.c1))
        tk.cols[:, :k_old] = t.column("cols").combine_chunks().flatten().to_numpy().reshape(n, k_old)
        tk.vals[:, :k_old] = t.column("values").combine_chunks().flatten().to_numpy().reshape(n, k_old)
        sums = t.column("row_mean").to_numpy() * float(block.c0)
        lo, hi, sums = self.stripe(block, tk, float(lo), float(hi), sums)
        cols, vals = tk.result()
        whole = Block(block.kernel, block.block_id, block.r0, block.r1, 0, block.c1)
        write_sparse_block(
            self.out_dir / f"{block.name}.parquet", whole, cols, vals, self.topk, (lo, hi), sums / block.c1
        )
        return n * (block.c1 - block.c0)


def overwrite_diagonal(vals: np.ndarray, diag: np.ndarray, r0: int, r1: int, c0: int, c1: int) -> None:
    """Write ``diag[i]`` into ``vals`` (the tile rows [r0, r1) x columns [c0, c1)) wherever row i == column i
    and i < len(diag) (items beyond ``diag``, e.g. scored new items, keep the estimate)."""
    lo, hi = max(r0, c0), min(r1, c1, len(diag))
    if hi > lo:
        i = np.arange(lo, hi)
        vals[i - r0, i - c0] = diag[lo:hi]
