"""A table teacher: influence values read from a Parquet file instead of computed.

Users who already have scores from another tool, or from an earlier full run (``nncift export-table``),
bring them in with ``label.function=table`` and ``table.path=PATH``. The file has one row per pair:

- ``example_id`` (string): the in-context example / training item e;
- ``target_id`` (string): the item it is scored for, t;
- ``value`` (float): U(e -> t), the same orientation as every teacher (positive = e helps t).

Ids are the run's row ids (``id`` of ``data/pool.parquet`` and ``data/target.parquet``), so
``K_FF[i, j] = U(pool j -> pool i)`` and ``K_FT[i, j] = U(pool i -> target j)``. A pair the plan needs that
the table lacks is a :class:`~nncift.errors.DataError` naming the ids.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nncift.config import _f
from nncift.errors import ConfigError, DataError
from nncift.influence.interface import InfluenceFunction, Items
from nncift.influence.plugins import register

TABLE_COLUMNS = ("example_id", "target_id", "value")


@dataclass
class TableConfig:
    """``table.*``: influence values read from a Parquet file (``label.function=table``)."""

    path: str | None = _f(None, "Parquet of example_id, target_id, value (one row per pair the run needs)")
    symmetric: bool = _f(False, "declare the values symmetric (the surrogate may share one tower)")

    def validate_selected(self) -> None:
        """With ``label.function=table``, the table file is required."""
        if not self.path:
            raise ConfigError("config field 'table.path': label.function=table needs table.path=PATH")


@register
class TableFunction(InfluenceFunction):
    """Lookup of U(example -> target) in a Parquet table (vectorised: sorted int64 keys + searchsorted).

    Args:
        path: Parquet file with columns ``example_id``, ``target_id``, ``value``.
        symmetric: declare the values symmetric (surrogates may share one tower).
    """

    name = "table"
    config = TableConfig
    exact_is_cheap = True

    @classmethod
    def resolve(cls, section: TableConfig, device: str) -> dict[str, Any]:
        """The file checked whole here, in the driver (columns, nulls, non-finite values, duplicate pairs), so
        a bad table stops the run before any worker reads it; the label workers' copies are then valid."""
        if not section.path:
            raise ConfigError("config field 'table.path': label.function=table needs table.path=PATH")
        kwargs = {"path": str(Path(section.path).resolve()), "symmetric": section.symmetric, "field": "table.path"}
        cls(**kwargs)  # raises the DataError a worker would; the parsed table is cached for this process
        return kwargs

    @classmethod
    def source(cls, section: TableConfig) -> tuple[str, dict[str, Any]]:
        """The registered function the table's provenance names (``function`` and ``teacher_config``, as
        :func:`write_table_file` and ``nncift export`` write them), else the table itself."""
        from nncift.influence.plugins import teachers

        prov = table_provenance(section.path) if section.path and Path(section.path).is_file() else None
        name = (prov or {}).get("function")
        if name and name != cls.name and name in teachers():
            return name, dict(prov.get("teacher_config") or {})
        return super().source(section)

    def __init__(self, path: str | Path, symmetric: bool = False, field: str | None = None):
        self.path = Path(path)
        self.symmetric = bool(symmetric)
        self.field = field = field or "table.path"
        if not self.path.is_file():
            raise DataError(f"{field}: file not found: {self.path}")
        st = self.path.stat()
        self.vocab, self.keys, self.values = _read_table(str(self.path), field, st.st_size, st.st_mtime_ns)

    @classmethod
    def check_pairs(cls, kwargs: dict[str, Any], sets: list[dict], pool_ids: Any, target_ids: Any) -> None:
        """Every pair of ``sets`` is in the table, checked in the driver before any block is labeled (the
        :meth:`lookup` error, counted over all the sets)."""
        table = cls.build(**kwargs)
        ids = {"pool": _str_ids(pool_ids), "target": _str_ids(target_ids)}
        codes = {side: table._codes(v) for side, v in ids.items()}
        missing, total, first = 0, 0, None
        for s in sets:
            if s["kernel"] not in ("ff", "ft"):
                continue
            ff = s["kernel"] == "ff"
            rows, cols = np.asarray(s["rows"], np.int64), np.asarray(s["cols"], np.int64)
            step = max(1, len(rows) if s.get("paired") else (1 << 22) // max(1, len(cols)))
            for a in range(0, len(rows), step):
                r = rows[a : a + step]
                if s.get("paired"):
                    c = cols[a : a + step]
                else:
                    r, c = np.repeat(r, len(cols)), np.tile(cols, len(r))
                # K_FF[i, j] = U(pool j -> pool i); K_FT[i, j] = U(pool i -> target j)
                (es, ei), (ts, ti) = (("pool", c), ("pool", r)) if ff else (("pool", r), ("target", c))
                bad = ~table._found(codes[es][0][ei], codes[es][1][ei], codes[ts][0][ti], codes[ts][1][ti])
                total += len(r)
                if bad.any():
                    k = int(np.flatnonzero(bad)[0])
                    missing += int(bad.sum())
                    if first is None:
                        first = (ids[es][ei[k]], ids[ts][ti[k]])
        if missing:
            raise table._missing_error(missing, total, *first)

    def __len__(self) -> int:
        return len(self.keys)

    def _codes(self, ids: list[str] | None) -> tuple[np.ndarray, np.ndarray]:
        if ids is None:
            raise DataError("label.function=table needs item ids (the run's data ids)")
        arr = np.asarray(ids, dtype=object).astype(str)
        pos = np.minimum(np.searchsorted(self.vocab, arr), len(self.vocab) - 1)
        found = self.vocab[pos] == arr
        return pos.astype(np.int64), found

    def lookup(self, example_ids: list[str], target_ids: list[str]) -> np.ndarray:
        """U(example_ids[k] -> target_ids[k]) for aligned id lists; (P,) float32.

        Raises:
            DataError: naming the first missing pair and how many are missing.
        """
        e, e_ok = self._codes(example_ids)
        t, t_ok = self._codes(target_ids)
        keys = e * len(self.vocab) + t
        pos = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        ok = e_ok & t_ok & (self.keys[pos] == keys)
        if not ok.all():
            bad = np.flatnonzero(~ok)
            k = int(bad[0])
            raise self._missing_error(len(bad), len(keys), example_ids[k], target_ids[k])
        return self.values[pos]

    def _found(self, e: np.ndarray, e_ok: np.ndarray, t: np.ndarray, t_ok: np.ndarray) -> np.ndarray:
        """Whether each aligned (example, target) pair of vocabulary codes (:meth:`_codes`) is in the table."""
        keys = e * len(self.vocab) + t
        pos = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        return e_ok & t_ok & (self.keys[pos] == keys)

    def _missing_error(self, missing: int, needed: int, example_id: str, target_id: str) -> DataError:
        return DataError(
            f"{self.field}: {self.path} has no value for {missing:,} of {needed:,} pairs needed, e.g. "
            f"example_id={example_id!r} -> target_id={target_id!r} (ids must be the run's data ids)"
        )

    def covers(self, example_ids: list[str], target_ids: list[str]) -> bool:
        """Whether every aligned pair is in the table."""
        try:
            self.lookup(example_ids, target_ids)
        except DataError:
            return False
        return True

    def utility(self, examples: Items, targets: Items) -> np.ndarray:
        """(E, T) float32 looked up by id."""
        ex = np.repeat(np.asarray(examples.ids, dtype=object), len(targets)).tolist() if examples.ids else None
        tg = np.tile(np.asarray(targets.ids, dtype=object), len(examples)).tolist() if targets.ids else None
        if not len(examples) or not len(targets):
            return np.zeros((len(examples), len(targets)), np.float32)
        return self.lookup(ex, tg).reshape(len(examples), len(targets))

    def utility_pairs(self, examples: Items, targets: Items) -> np.ndarray:
        """(P,) float32 looked up by id."""
        if not len(examples):
            return np.zeros(0, np.float32)
        return self.lookup(examples.ids, targets.ids)


def _str_ids(ids: Any) -> list[str]:
    """Row ids (an Arrow array or column, or a sequence) as a list of str."""
    if isinstance(ids, pa.ChunkedArray | pa.Array):
        ids = ids.to_pylist()
    return [str(x) for x in ids]


@functools.lru_cache(maxsize=2)
def _read_table(path: str, field: str, size: int, mtime_ns: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(vocab (V,) str, sorted pair keys (P,) int64, their values (P,) float32) of a table file, checked;
    cached per file version (``size``, ``mtime_ns``), so the driver's check and a worker of the same process
    parse the file once. The arrays are read-only."""
    import pyarrow.compute as pc

    try:
        schema = pq.read_schema(path)
    except Exception as exc:  # pyarrow raises several types for a non-Parquet file
        raise DataError(f"{field}: {path} is not a Parquet file ({exc})") from None
    missing = [c for c in TABLE_COLUMNS if c not in schema.names]
    if missing:
        raise DataError(f"{field}: {path} has no column '{missing[0]}' (needs {', '.join(TABLE_COLUMNS)})")
    t = pq.read_table(path, columns=list(TABLE_COLUMNS))
    if t.num_rows == 0:
        raise DataError(f"{field}: {path} is empty")
    for c in ("example_id", "target_id"):
        if t.column(c).null_count:
            raise DataError(f"{field}: {path} column '{c}' has {t.column(c).null_count} null ids")
    values = t.column("value").cast("float64").to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        raise DataError(f"{field}: {path} row {int(bad[0])}: value is {values[bad[0]]} (not finite)")
    ex = pc.cast(t.column("example_id"), "string").to_numpy(zero_copy_only=False).astype(object)
    tg = pc.cast(t.column("target_id"), "string").to_numpy(zero_copy_only=False).astype(object)
    vocab, codes = np.unique(np.concatenate([ex, tg]), return_inverse=True)
    vocab = vocab.astype(str)
    n = len(ex)
    keys = codes[:n].astype(np.int64) * len(vocab) + codes[n:].astype(np.int64)
    order = np.argsort(keys, kind="stable")
    keys, values = keys[order], values[order].astype(np.float32)
    dup = np.flatnonzero(keys[1:] == keys[:-1])
    if len(dup):
        i = order[dup[0] + 1]
        raise DataError(f"{field}: {path} row {int(i)}: duplicate pair ({ex[i]!r} -> {tg[i]!r})")
    for a in (vocab, keys, values):
        a.flags.writeable = False
    return vocab, keys, values


def labels_to_table(labels: pa.Table) -> pa.Table:
    """A label-stage table (kernel, row_id, col_id, value, ...) in the teacher orientation of a table file.

    ``K_FF[i, j] = U(j -> i)`` gives ``example_id = col_id, target_id = row_id``; ``K_FT[i, j] = U(i -> j)``
    gives ``example_id = row_id, target_id = col_id``. A pair labeled twice (a self pair of Q1 and of the
    diagonal) is kept once.
    """
    kern = np.asarray(labels.column("kernel").to_pylist())
    row_id = np.asarray(labels.column("row_id").to_pylist(), dtype=object)
    col_id = np.asarray(labels.column("col_id").to_pylist(), dtype=object)
    ff = kern == "ff"
    ex = np.where(ff, col_id, row_id)
    tg = np.where(ff, row_id, col_id)
    vals = labels.column("value").to_numpy().astype(np.float32)
    _, first = np.unique(np.char.add(np.char.add(ex.astype(str), "\x00"), tg.astype(str)), return_index=True)
    first = np.sort(first)
    return pa.table(
        {
            "example_id": pa.array(ex[first].tolist(), pa.string()),
            "target_id": pa.array(tg[first].tolist(), pa.string()),
            "value": pa.array(vals[first], pa.float32()),
        }
    )


def write_table_file(out: str | Path, labels: pa.Table, provenance: dict) -> int:
    """Write label-stage ``labels`` as a table file (:func:`labels_to_table`), its provenance in the Parquet
    metadata (``nncift_table``) and beside it in ``<out>.json``; returns the number of pairs written."""
    from nncift.store import write_json, write_parquet

    table = labels_to_table(labels)
    out = Path(out)
    write_parquet(out, table, metadata={"nncift_table": {"pairs": table.num_rows, **provenance}})
    write_json(out.with_suffix(".json"), {"pairs": table.num_rows, **provenance})
    return table.num_rows


def table_provenance(path: str | Path) -> dict | None:
    """The provenance a table file carries (:func:`write_table_file`: the Parquet metadata ``nncift_table``, or
    ``<path>.json`` beside it): ``pairs``, ``function``, ``M``, ``N``, ``label_seconds``, ...; None without one."""
    import json

    path = Path(path)
    try:
        meta = pq.read_metadata(path).metadata or {}
    except (OSError, ValueError):
        meta = {}
    if b"nncift_table" in meta:
        return json.loads(meta[b"nncift_table"])
    side = path.with_suffix(".json")
    return json.loads(side.read_text()) if side.is_file() else None
