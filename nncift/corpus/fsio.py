"""Input files on local disks or object stores, through ``pyarrow.fs``.

An input spec is a plain path (``/data/c.jsonl``, ``shards/``, ``data/*.parquet``: the local filesystem) or a
URI that :meth:`pyarrow.fs.FileSystem.from_uri` understands (``s3://bucket/prefix/*.parquet``, ``gs://...``,
``hdfs://host:port/...``, ``file:///abs/path``). :func:`resolve` turns either into a
``(pyarrow FileSystem, path)`` pair; the helpers below are what the readers need: :func:`info` / :func:`stat`
(size and modification time), :func:`list_files` (a directory or prefix, recursively), :func:`glob` (a pattern
matched on the listing: object stores have no glob), :func:`open_input` / :func:`read_bytes` (bytes, or a byte
range) and :func:`parquet_file`.

Specs stay strings: a worker re-resolves the filesystem from the URI itself (filesystem objects are never
passed between processes). The filesystem of a URI is built once per process and per root
(``scheme://host/`` and any ``?key=value`` options), then reused; credentials come from whatever the pyarrow
filesystem reads in that process's environment (``AWS_*`` for S3, ``GOOGLE_APPLICATION_CREDENTIALS`` for GCS,
``HADOOP_HOME`` / ``CLASSPATH`` for HDFS).

URI syntax: the path is percent-decoded (``%20`` is a space); ``*``, ``?`` and ``[...]`` are glob characters in
the path; a trailing ``?key=value[&key=value]`` is passed to ``from_uri`` as filesystem options (S3
``region``, ``endpoint_override``, ...). Messages name the URI as given (``s3://b/x.jsonl:137: ...``);
files found under a prefix or by a pattern are named ``<scheme>://<host>/<their path>``.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple
from urllib.parse import quote, unquote

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from nncift.errors import DataError

log = logging.getLogger(__name__)

_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://([^/]*)(.*)$", re.S)
_OPTIONS = re.compile(r"\?([A-Za-z_][A-Za-z0-9_]*=[^/?&]*(?:&[A-Za-z_][A-Za-z0-9_]*=[^/?&]*)*)$")
_GLOB = re.compile(r"[*?\[]")
_SAFE = "/=:@!$&'()*+,;~"  # kept literal when a listed path is written back as a URI

Spec = str | os.PathLike


def is_uri(spec: Spec) -> bool:
    """Whether ``spec`` is a URI (``scheme://...``) rather than a plain local path."""
    return isinstance(spec, str) and _URI.match(spec) is not None


@dataclass(frozen=True)
class _Uri:
    """A URI cut into the root its filesystem is built from and the path below it (percent-decoded)."""

    scheme: str
    netloc: str
    rest: str  # the path below the root, no leading "/"
    options: str  # "?key=value..." or ""

    @property
    def root(self) -> str:
        return f"{self.scheme}://{self.netloc}/{self.options}"

    def child(self, rel: str) -> str:
        """The URI of ``rel`` (a filesystem path relative to the root)."""
        return f"{self.scheme}://{self.netloc}/{quote(rel, safe=_SAFE)}{self.options}"


def _split(spec: str) -> _Uri:
    m = _URI.match(spec)
    if m is None:  # pragma: no cover - callers check is_uri
        raise ValueError(spec)
    scheme, netloc, path = m.groups()
    opt = _OPTIONS.search(path)
    options = ""
    if opt is not None:
        options, path = "?" + opt.group(1), path[: opt.start()]
    return _Uri(scheme.lower(), netloc, unquote(path.lstrip("/")), options)


@functools.lru_cache(maxsize=64)
def _root_filesystem(root: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, its path of the root) of a URI root, built once per process."""
    fs, path = pafs.FileSystem.from_uri(root)
    log.debug("filesystem of %s: %s", root, fs.type_name)
    return fs, path


def _reason(exc: BaseException) -> str:
    """The first line of ``exc``'s message, at most 300 characters."""
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def resolve(spec: Spec) -> tuple[pafs.FileSystem, str]:
    """The ``(pyarrow FileSystem, path)`` of ``spec``: a plain path is the local filesystem (made absolute),
    a URI that of :meth:`pyarrow.fs.FileSystem.from_uri` (cached per process and root).

    Raises:
        DataError: pyarrow cannot build the URI's filesystem (unknown scheme, missing driver or credentials),
            naming the URI and pyarrow's reason.
    """
    if not is_uri(spec):
        return _LOCAL, os.path.abspath(os.fspath(spec))
    u = _split(str(spec))
    try:
        fs, base = _root_filesystem(u.root)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... by scheme
        raise DataError(f"{spec}: cannot open the filesystem of this URI ({_reason(exc)})") from None
    return fs, _join(base, u.rest)


_LOCAL = pafs.LocalFileSystem()


def _join(base: str, rest: str) -> str:
    if not rest:
        return base
    if not base:
        return rest
    return base.rstrip("/") + "/" + rest


FileType = pafs.FileType


def join(spec: Spec, child: str) -> str:
    """The spec of ``child`` (a relative path) below the directory or prefix ``spec``."""
    if not is_uri(spec):
        return os.path.join(os.fspath(spec), child)
    u = _split(str(spec))
    return u.child(_join(u.rest, child))


def name(spec: Spec) -> str:
    """The last component of ``spec``'s path (``s3://b/d/x.jsonl`` -> ``x.jsonl``)."""
    if is_uri(spec):
        return _split(str(spec)).rest.rstrip("/").rsplit("/", 1)[-1]
    return Path(spec).name


def suffix(spec: Spec) -> str:
    """The suffix of ``spec``'s last component, lower-cased (``.jsonl``; ``""`` for none)."""
    if not is_uri(spec):
        return Path(spec).suffix.lower()
    n = name(spec)
    i = n.rfind(".")
    return n[i:].lower() if 0 < i < len(n) - 1 else ""


def info(spec: Spec) -> pafs.FileInfo:
    """The ``FileInfo`` of ``spec`` (its ``type`` is ``FileType.NotFound`` when there is nothing there).

    Raises:
        DataError: the store refused the request (credentials, permissions, network), naming ``spec``.
    """
    fs, path = resolve(spec)
    try:
        return fs.get_file_info(path)
    except OSError as exc:
        raise DataError(f"{spec}: cannot read ({_reason(exc)})") from None


def stat(spec: Spec) -> tuple[int, int]:
    """``(size in bytes, modification time in ns)`` of the file ``spec``.

    The pair is the resume check of the data stage (staged parts are reused only while it is unchanged). The
    local filesystem gives both; an object store gives the size and, when it reports one, the last-modified
    time, else -1: then an unchanged size alone counts as unchanged.

    Raises:
        DataError: ``spec`` is not a file.
    """
    fi = info(spec)
    if fi.type != pafs.FileType.File:
        raise DataError(f"{spec}: no such file")
    return _entry(spec, fi)[1:]


class Entry(NamedTuple):
    """A listed file: its spec (a plain path under a plain path, a URI under a URI) and :func:`stat`."""

    spec: str
    size: int
    mtime_ns: int


def _entry(spec: Spec, fi: pafs.FileInfo) -> Entry:
    size = fi.size
    if size is None:  # pragma: no cover - every pyarrow filesystem reports file sizes
        with open_input(spec) as fh:
            size = fh.size()
    return Entry(os.fspath(spec), int(size), int(fi.mtime_ns) if fi.mtime_ns is not None else -1)


def list_files(spec: Spec) -> list[Entry]:
    """The files under the directory (object store: prefix) ``spec``, at any depth, sorted by path components,
    with their size and modification time from the listing (no request per file).

    Raises:
        DataError: the store refused the listing.
    """
    fs, path = resolve(spec)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    except OSError as exc:
        raise DataError(f"{spec}: cannot list ({_reason(exc)})") from None
    found = sorted((fi for fi in infos if fi.type == pafs.FileType.File), key=lambda fi: fi.path.split("/"))
    return [_entry(_spec_of(spec, fi.path), fi) for fi in found]


def relative(spec: Spec, child: Spec) -> list[str]:
    """The path components of the spec ``child`` (from :func:`list_files` of ``spec``) below ``spec``."""
    base = resolve(spec)[1].rstrip("/")
    path = resolve(child)[1]
    return [c for c in path[len(base) :].split("/") if c]


def _spec_of(spec: Spec, path: str) -> str:
    """The spec naming the filesystem path ``path`` found from ``spec`` (same filesystem)."""
    if not is_uri(spec):
        return path
    u = _split(str(spec))
    base = _root_filesystem(u.root)[1]
    rel = path[len(base) :] if base and path.startswith(base) else path
    return u.child(rel.lstrip("/"))


def has_glob(spec: Spec) -> bool:
    """Whether the path of ``spec`` holds a glob character (``*``, ``?``, ``[``)."""
    path = _split(spec).rest if is_uri(spec) else os.fspath(spec)
    return _GLOB.search(path) is not None


def glob(spec: str) -> list[Entry]:
    """The files matching the pattern ``spec``, sorted by path components (with size and modification time
    from the listing, as :func:`list_files`).

    The directory before the first component with a glob character is listed (recursively only when the
    pattern goes deeper, or has ``**``) and every listed file is matched component by component with
    :func:`fnmatch.fnmatchcase`, as :func:`glob.glob` with ``recursive=True`` matches: ``*`` / ``?`` / ``[...]``
    stay inside one component, ``**`` spans any number of them, and a name starting with ``.`` is matched only
    by a pattern component starting with ``.``.

    Raises:
        DataError: the store refused the listing.
    """
    fs, path = resolve(spec)
    parts = path.split("/")
    k = next(i for i, p in enumerate(parts) if _GLOB.search(p))
    base, pattern = "/".join(parts[:k]), parts[k:]
    deep = len(pattern) > 1 or "**" in pattern
    if not base and path.startswith("/"):
        base = "/"
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=deep, allow_not_found=True))
    except OSError as exc:
        raise DataError(f"{spec}: cannot list ({_reason(exc)})") from None
    prefix = base.rstrip("/") + "/" if base else ""
    found = [
        fi
        for fi in infos
        if fi.type == pafs.FileType.File
        and fi.path.startswith(prefix)
        and _match([c for c in fi.path[len(prefix) :].split("/") if c], pattern)
    ]
    found.sort(key=lambda fi: fi.path.split("/"))
    return [_entry(_spec_of(spec, fi.path), fi) for fi in found]


def _match(names: list[str], pattern: list[str]) -> bool:
    """Whether the path components ``names`` match the pattern components (``**``: zero or more)."""
    if not pattern:
        return not names
    head, tail = pattern[0], pattern[1:]
    if head == "**":
        return any(
            _match(names[i:], tail) for i in range(len(names) + 1) if not any(n.startswith(".") for n in names[:i])
        )
    if not names or (names[0].startswith(".") and not head.startswith(".")):
        return False
    return fnmatch.fnmatchcase(names[0], head) and _match(names[1:], tail)


@contextlib.contextmanager
def open_input(spec: Spec) -> Iterator:
    """A random-access binary file of ``spec`` (``pyarrow.NativeFile``: ``read``, ``seek``, ``tell``, ``size``).

    Raises:
        DataError: the file cannot be opened (missing, refused).
    """
    fs, path = resolve(spec)
    try:
        fh = fs.open_input_file(path)
    except (OSError, ValueError) as exc:
        raise DataError(f"{spec}: cannot open ({_reason(exc)})") from None
    try:
        yield fh
    finally:
        fh.close()


def read_bytes(spec: Spec, start: int = 0, length: int | None = None) -> bytes:
    """The bytes of ``spec`` from ``start``: ``length`` of them (fewer at the end), or all the rest."""
    with open_input(spec) as fh:
        if start:
            fh.seek(start)
        return fh.read() if length is None else fh.read(length)


def read_text(spec: Spec, data: bytes | None = None) -> str:
    """The text of ``spec`` (or of its bytes ``data``) as :meth:`pathlib.Path.read_text` with
    ``encoding="utf-8", errors="replace"`` reads it: undecodable bytes replaced, ``\r\n`` and ``\r`` read as
    ``\n``."""
    raw = read_bytes(spec) if data is None else data
    return raw.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n")


@contextlib.contextmanager
def parquet_file(spec: Spec) -> Iterator[pq.ParquetFile]:
    """A ``pyarrow.parquet.ParquetFile`` reading ``spec`` through its filesystem (errors propagate as pyarrow
    raises them: callers name the file)."""
    with open_input(spec) as fh:
        pf = pq.ParquetFile(fh)
        try:
            yield pf
        finally:
            pf.close()
