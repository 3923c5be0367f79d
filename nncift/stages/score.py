"""``nncift score``: new rows scored against a finished run without relabeling, and ``nncift select --scored``.

Stage ``score`` (folder ``score/<name>/``) reads a new corpus with the run's data config, embeds it as the
embed stage embedded the pool, and extends the run's estimated kernels with the fitted networks: the new rows
of K_FF (over pool + new) and K_FT, and the K_FF columns of the pool rows against the new items, in the run's
estimate layout. The kernels of the combined M + M' items follow the estimate stage's format, so the select
stage's functions run on them unchanged. No teacher is called: the K_FF diagonal of a new item is the
surrogate's own estimate (the pool's diagonal keeps the teacher's exact values).

Reads: ``estimate/`` (kernels.json, blocks or scores.parquet), ``fit/network_*``, ``embed/``, ``data/``,
``label/labels.parquet`` (the exact diagonal).
Writes: ``score/<name>/rows.parquet`` (``id``, ``prompt``, ``response``, ``idx`` from M), ``embeddings.safetensors``
(``new`` (M', d)), ``blocks/`` (the combined kernels; unchanged tiles are hard links to the estimate stage's),
``kernels.json``, ``scores.parquet`` (pointwise runs), ``provenance.json``; stage ``score_select``:
``score/<name>/select/selection.parquet`` and ``selected.jsonl``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nncift.errors import ConfigError, DataError, NnciftError, ProvenanceError, RunDirBusyError
from nncift.kernels.kernel_io import write_meta
from nncift.stages.base import Context, Stage
from nncift.store import atomic_path, read_parquet_metadata, valid_parquet, write_json, write_parquet

if TYPE_CHECKING:
    from nncift.labels.plan import Block
    from nncift.runner import Runner

from nncift.store import todo_blocks

log = logging.getLogger(__name__)

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


# ----------------------------------------------------------------------------------------- provenance helpers
@functools.lru_cache(maxsize=32)
def _sha256_file(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_path(path: Path) -> str:
    """sha256 of a file, or of a directory's files (relative names and contents, sorted)."""
    if path.is_file():
        st = path.stat()
        return _sha256_file(str(path), st.st_size, st.st_mtime_ns)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode() + b"\0" + sha256_path(f).encode())
    return h.hexdigest()


def score_name(input_path: str | Path, name: str | None) -> str:
    """The score's name: ``name``, or derived from the input file's stem; checked to be a plain folder name."""
    if name is None:
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(input_path).stem).lstrip("._-") or "new"
    if not NAME.match(name):
        raise ConfigError(f"--name {name!r}: use letters, digits, '.', '_' or '-' (a folder name under score/)")
    return name


def _network_files(ctx: Context, layout: str) -> list[Path]:
    kernels = ("item",) if layout == "items" else ("ff", "ft")
    return [ctx.path("fit", f"network_{k}{ext}") for k in kernels for ext in (".safetensors", ".json")]


def _estimate_meta(ctx: Context) -> dict[str, Any]:
    """The run's ``estimate/kernels.json``, or a one-line error when the run is not estimated yet."""
    done = ctx.store.done_info("estimate")
    if done is None:
        raise NnciftError(
            f"{ctx.store.root}: the run has no finished estimate stage; run "
            f"`nncift estimate --run-dir {ctx.store.root}` before scoring new data"
        )
    from nncift.kernels.kernel_io import read_meta

    return read_meta(ctx.store.stage_dir("estimate"))


def _link(src: Path, dst: Path) -> None:
    """``dst`` as a hard link to ``src`` (a copy where links are not possible), put in place atomically."""
    with atomic_path(dst) as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def _shift(blocks: list[Block], start_id: int, dr: int = 0, dc: int = 0) -> list[Block]:
    """``blocks`` moved by ``dr`` rows and ``dc`` columns, renumbered from ``start_id``."""
    return [
        dataclasses.replace(b, block_id=start_id + i, r0=b.r0 + dr, r1=b.r1 + dr, c0=b.c0 + dc, c1=b.c1 + dc)
        for i, b in enumerate(blocks)
    ]


# ----------------------------------------------------------------------------------------- the stages
class ScoreStage(Stage):
    """New rows scored against a finished run (params: ``name``, ``input``); see the module docstring."""

    name = "score"
    sections = ()  # the run's configuration enters through the estimate stage's fingerprint (identity)
    reads = ("estimate/", "fit/", "embed/embeddings.safetensors", "data/pool.parquet", "label/labels.parquet")
    writes = (
        "score/<name>/rows.parquet",
        "score/<name>/embeddings.safetensors",
        "score/<name>/blocks/",
        "score/<name>/kernels.json",
        "score/<name>/scores.parquet",
        "score/<name>/provenance.json",
    )

    def folder(self, **params: Any) -> str:
        return f"score/{params['name']}"

    def identity(self, ctx: Context, **params: Any) -> dict[str, Any]:
        """The run's estimate fingerprint, the input's content hash and the networks' content hashes."""
        meta = _estimate_meta(ctx)
        path = Path(params["input"])
        if not path.exists():
            raise DataError(f"{path}: no such file or directory")
        return {
            "estimate": ctx.store.done_info("estimate")["fingerprint"],
            "input_sha256": sha256_path(path),
            "networks": {p.name: sha256_path(p) for p in _network_files(ctx, meta["layout"])},
        }

    def validate(self, ctx: Context, **params: Any) -> None:
        """Read the new rows with the run's data config; refuse ids of the pool or target, or a wrong
        embedding dimension, before anything is written."""
        from nncift.corpus.readers import read_corpus

        path = Path(params["input"])
        new = read_corpus(path, ctx.cfg.data)
        pool, target = ctx.tables()
        ids = new.column("id").to_numpy(zero_copy_only=False).astype(str)
        for side, table in (("pool", pool), ("target", target)):
            known = table.column("id").to_numpy(zero_copy_only=False).astype(str)
            shared = np.intersect1d(ids, known)
            if len(shared):
                raise DataError(
                    f"{path}: id {str(shared[0])!r} is already in the run's {side} (data/{side}.parquet; "
                    f"{len(shared)} colliding ids); new rows need ids of their own"
                )
        e_pool, _ = ctx.embeddings()
        if "embedding" in pool.column_names:
            if "embedding" not in new.column_names:
                raise DataError(f"{path}: no field '{ctx.cfg.data.embedding_field}' (the run's precomputed embeddings)")
            dim = new.column("embedding").type.list_size
            if dim != e_pool.shape[1]:
                raise DataError(
                    f"{path}: field '{ctx.cfg.data.embedding_field}' has {dim} dimensions, the run's embeddings "
                    f"{e_pool.shape[1]}"
                )
        m = pool.num_rows
        new = new.append_column("idx", pa.array(np.arange(m, m + new.num_rows, dtype=np.int64)))
        self._rows = new.select(pool.column_names).cast(pool.schema)

    def run(self, ctx: Context, **params: Any) -> dict[str, Any]:
        from nncift.corpus.embedder import embed_sources
        from nncift.store import write_safetensors

        rows = self._rows
        del self._rows
        folder = ctx.store.root / self.folder(**params)
        m, n = ctx.size()
        m_new = rows.num_rows
        write_parquet(folder / "rows.parquet", rows, row_group_size=1024)
        # the embedders read rows numbered 0..M'-1 (the Ray path checks it): a scratch copy with local idx
        local = rows.set_column(rows.column_names.index("idx"), "idx", pa.array(np.arange(m_new, dtype=np.int64)))
        write_parquet(folder / "embed_in" / "new.parquet", local, row_group_size=1024)
        emb, model = embed_sources(ctx, {"new": folder / "embed_in" / "new.parquet"}, folder / "embed_parts")
        shutil.rmtree(folder / "embed_in", ignore_errors=True)
        e_new = np.asarray(emb["new"], np.float32)
        e_pool, _ = ctx.embeddings()
        if e_new.shape != (m_new, e_pool.shape[1]) or not np.isfinite(e_new).all():
            raise DataError(f"{params['input']}: embeddings of shape {e_new.shape} do not fit the run's {e_pool.shape}")
        write_safetensors(folder / "embeddings.safetensors", {"new": e_new}, metadata={"model": model})
        meta = _estimate_meta(ctx)
        t0 = time.perf_counter()
        if meta["layout"] == "items":
            info = self._items(ctx, folder, e_new, rows)
        else:
            texts = (rows.column("prompt").to_pylist(), rows.column("response").to_pylist())
            info = self._pairs(ctx, folder, meta, e_new, texts)
        info.update(M=m, new=m_new, N=n, layout=meta["layout"], map_seconds=time.perf_counter() - t0)
        write_json(
            folder / "provenance.json",
            {
                "run_dir": str(ctx.store.root.resolve()),
                "input": str(Path(params["input"]).resolve()),
                "input_sha256": sha256_path(Path(params["input"])),
                "networks": {str(p): sha256_path(p) for p in _network_files(ctx, meta["layout"])},
                # the estimate stage's fingerprint: every config section the run's kernels depend on
                "config_fingerprint": ctx.store.done_info("estimate")["fingerprint"],
                "pool": m,
                "new": m_new,
                "diagonal": "pool items: the teacher's exact K_FF[i, i] (where the chosen estimate uses it); new "
                "items: the estimate's own",
                "estimate": json.loads(ctx.path("choose", "choice.json").read_text())["chosen"],
            },
        )
        return info

    def _items(self, ctx: Context, folder: Path, e_new: np.ndarray, rows: pa.Table) -> dict[str, Any]:
        """Pointwise run: the new items' scores from the chosen candidate, after the pool's estimated ones."""
        from nncift.kernels.kernel_io import item_scores, write_item_scores
        from nncift.surrogate.item_choice import new_item_scores

        old = item_scores(ctx.store.stage_dir("estimate"))
        chosen = json.loads(ctx.path("choose", "choice.json").read_text())["chosen"]
        new = new_item_scores(
            ctx, chosen, e_new, rows.column("prompt").to_pylist(), rows.column("response").to_pylist()
        )
        scores = np.concatenate([old, new])
        write_item_scores(folder, scores, pool=len(old), new=len(new))
        return {"pairs": len(new), "blocks": 1}

    def _pairs(
        self, ctx: Context, folder: Path, meta: dict[str, Any], e_new: np.ndarray, texts: tuple[list, list]
    ) -> dict[str, Any]:
        """K_FF / K_FT of the combined items: the run's own blocks linked, the new blocks estimated through the
        run's executor (:class:`~nncift.kernels.estimate_worker.ExtendWorker`)."""
        from nncift.kernels.estimate_worker import ExtendWorker
        from nncift.labels.plan import Block, block_grid
        from nncift.surrogate.recipes import estimator_heads

        c = ctx.cfg.estimate
        m, n = ctx.size()
        m_new = len(e_new)
        total = m + m_new
        lay, topk = meta["layout"], int(meta.get("topk", c.topk))
        sparse = lay == "sparse"
        base, out = ctx.path("estimate", "blocks"), folder / "blocks"
        start = int(meta["blocks"])
        new_rows = _shift(block_grid("ff", m_new, total, c.block_size, col_size=total if sparse else None), start, m)
        if sparse:  # every pool row's K_FF stripe gains the new columns: merged with its stripe over the pool
            olds = [Block(**read_parquet_metadata(p)["block"]) for p in sorted(base.glob("ff_*.parquet"))]
            old_cols = [dataclasses.replace(b, c0=m, c1=total) for b in olds]
        else:
            old_cols = _shift(block_grid("ff", m, m_new, c.block_size), start + len(new_rows), 0, m)
        start += len(new_rows) + (0 if sparse else len(old_cols))
        ft_rows = _shift(block_grid("ft", m_new, n, c.block_size, col_size=n if sparse else None), start, m)
        blocks = [*new_rows, *old_cols, *ft_rows]
        # the run's blocks that do not change: every tile (dense); the K_FT stripes (sparse)
        keep = sorted(base.glob("ft_*.parquet")) if sparse else sorted(base.glob("*_*.parquet"))
        for src in keep:
            if not valid_parquet(out / src.name):
                _link(src, out / src.name)
        todo = [b.to_dict() for b in todo_blocks(out, blocks, lambda b: (f"{b.name}.parquet", b.r1 - b.r0))]
        pairs = sum((b.r1 - b.r0) * (b.c1 - b.c0) for b in blocks)
        log.info(
            "score: %d new items, %d blocks (%d already done), %d pairs",
            m_new,
            len(blocks),
            len(blocks) - len(todo),
            pairs,
        )
        worker_kwargs = {
            "heads": estimator_heads(ctx, e_new, texts),
            "out_dir": str(out),
            "base_dir": str(base),
            "device": c.device,
            "layout": lay,
            "topk": topk,
            "col_chunk": c.col_chunk,
            "engine": c.engine,
            "precision": c.precision,
        }
        ctx.fan_out(ExtendWorker, worker_kwargs, todo, "score", c)
        write_meta(
            folder,
            {
                "ff": {"shape": [total, total]},
                "ft": {"shape": [total, n]},
                "layout": lay,
                "topk": topk,
                "blocks": len(list(out.glob("*_*.parquet"))),
                "pool": m,
                "new": m_new,
            },
        )
        return {"pairs": pairs, "blocks": len(blocks)}


class ScoredSelectStage(Stage):
    """``nncift select --scored NAME``: the configured selection over pool + scored rows (param ``name``)."""

    name = "score_select"
    sections = ("select",)
    reads = ("data/pool.parquet", "score/<name>/")
    writes = ("score/<name>/select/selection.parquet", "score/<name>/select/selected.jsonl")

    def folder(self, **params: Any) -> str:
        return f"score/{params['name']}/select"

    def identity(self, ctx: Context, **params: Any) -> dict[str, Any]:
        """The scored kernels' fingerprint (which holds the run's, the input's and the networks')."""
        name = params["name"]
        done = ctx.store.done_info(f"score/{name}")
        if done is None:
            root = ctx.store.root / "score"
            known = sorted(p.parent.name for p in root.glob("*/_DONE.json")) if root.is_dir() else []
            raise NnciftError(
                f"{ctx.store.root}: no scored data named {name!r} (known: {', '.join(known) or 'none'}); run "
                f"`nncift score --run-dir {ctx.store.root} --input FILE --name {name}` first"
            )
        return {"score": done["fingerprint"]}

    def run(self, ctx: Context, **params: Any) -> dict[str, Any]:
        from nncift.selection.from_kernels import select_on

        folder = ctx.store.root / "score" / params["name"]
        pool, _ = ctx.tables()
        rows = pa.concat_tables([pool, pq.read_table(folder / "rows.parquet").cast(pool.schema)])
        return select_on(ctx, folder, rows, folder / "select")


# ----------------------------------------------------------------------------------------- drivers (CLI)
def check_run_config(runner: Runner) -> None:
    """Refuse a configuration other than the one the run was estimated with (it would read, embed or score the
    new rows differently), naming the changed fields; refuse a run without a finished estimate stage."""
    from nncift.store import _diff

    done = runner.store.done_info("estimate")
    if done is None:
        _estimate_meta(runner.ctx)  # raises the one-line error
    fp, prov = runner.identity("estimate")
    if done["fingerprint"] != fp:
        changes = "; ".join(_diff(done.get("provenance") or {}, prov)) or "fingerprint differs"
        raise ProvenanceError(
            f"{runner.store.root}: the configuration differs from the one the run was estimated with ({changes}); "
            f"score with the run's own configuration (omit --config to use {runner.store.root / 'config.yaml'})"
        )


def score(runner: Runner, input_path: str | Path, name: str | None = None) -> dict[str, Any]:
    """Score a new corpus against the finished run of ``runner`` into ``score/<name>/``.

    A rerun with the same input, networks and run configuration is skipped; a changed one is refused unless
    the runner overwrites. A user error leaves nothing under ``score/<name>/``.

    Returns:
        the stage's facts (``M``, ``new``, ``N``, ``layout``, ``pairs``, ``blocks``, ...) plus ``folder``.
    """
    name = score_name(input_path, name)
    check_run_config(runner)
    folder = f"score/{name}"
    with runner.session():
        done = runner.store.done_info(folder)
        fp, prov = runner.identity("score", name=name, input=str(input_path))
        if done is not None and done.get("fingerprint") != fp and not runner.overwrite:
            from nncift.store import _diff

            changes = "; ".join(_diff(done.get("provenance") or {}, prov)) or "fingerprint differs"
            raise ProvenanceError(
                f"{runner.store.root / folder}: was scored from another input, network or run configuration "
                f"({changes}); rerun with --overwrite to replace it, or choose another --name"
            )
        try:
            res = runner.run_stage("score", name=name, input=str(input_path))
        except RunDirBusyError:
            raise
        except NnciftError:
            path = runner.store.root / folder
            if path.exists() and runner.store.done_info(folder) is None:
                shutil.rmtree(path)  # bad input found while scoring: nothing half-written
            raise
    return {**res, "folder": str(runner.store.root / folder), "skipped": folder in runner.skipped}


def select_scored(runner: Runner, name: str) -> dict[str, Any]:
    """``nncift select --scored NAME``: the configured selection over pool + the scored rows of ``name``,
    written to ``score/<name>/select/`` (the run's own ``select/`` is not touched)."""
    if not NAME.match(name):
        raise ConfigError(f"--scored {name!r}: not a score name (letters, digits, '.', '_' or '-')")
    res = runner.run_stage("score_select", name=name)
    return {**res, "folder": str(runner.store.root / "score" / name / "select")}
