"""The lake on object storage: `lake_dir` may be an `s3://bucket/prefix` URI, read and written through pyarrow's
S3 filesystem.

A lake path stays a `pathlib.Path` everywhere (joins, `.name`, `.parent`): `Path("s3://bucket/lake")` is
`s3:/bucket/lake`, which `is_remote` recognises, so configuration fields typed `Path` and code that wraps a lake
in `Path(...)` keep working. Only the operations on files branch: listing, reading Parquet and footers, writing
an object, deleting one.

On object storage there is no rename: a file is written under its final name in one PUT (`put_bytes`; pyarrow's
output stream with delayed open sends one PutObject below its part size, a multipart upload above it, and either
way the object appears whole, at once, or not at all). Names are derived from Kafka offsets, so writing the same
records again overwrites the same object: the lake stays exactly once without the rename.

The S3 endpoint and region come from the environment, as for every AWS tool: `AWS_ENDPOINT_URL_S3` or
`AWS_ENDPOINT_URL` (an S3-compatible server: MinIO, Ceph, moto...), `AWS_REGION` or `AWS_DEFAULT_REGION`; the
credentials from the standard chain (`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, a profile, an instance role).
Nothing about them is stored in the lake or the configuration files.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

SCHEMES = ("s3",)


def is_remote(path) -> bool:
    """Whether a lake path is on object storage: `s3://...` as given, or as `Path` writes it (`s3:/...`)."""
    return str(path).startswith("s3:/")


def key_of(path) -> str:
    """`bucket/key` of a remote path (pyarrow's S3 filesystem path)."""
    return str(path).removeprefix("s3:").lstrip("/")


def uri(path) -> str:
    """The path as a user reads it: `s3://bucket/key` for a remote one, the local path otherwise."""
    return f"s3://{key_of(path)}" if is_remote(path) else str(path)


def lake_path(path) -> Path:
    """A lake path from a configuration value or URI (`s3://...` kept recognisable, see the module doc)."""
    return Path(f"s3:/{key_of(path)}") if is_remote(path) else Path(path)


@dataclass(frozen=True)
class S3Settings:
    endpoint: str | None
    region: str | None

    @classmethod
    def from_env(cls) -> "S3Settings":
        return cls(os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None,
                   os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None)


_fs_lock = threading.Lock()
_fs_cache: dict[S3Settings, pafs.S3FileSystem] = {}


def s3() -> pafs.S3FileSystem:
    """pyarrow's S3 filesystem for the environment's endpoint and region (one per setting, shared)."""
    settings = S3Settings.from_env()
    with _fs_lock:
        fs = _fs_cache.get(settings)
        if fs is None:
            kw: dict = {"allow_delayed_open": True}  # one PutObject per file (below the part size)
            if settings.endpoint:
                scheme, _, host = settings.endpoint.partition("://")
                kw.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
            if settings.region:
                kw["region"] = settings.region
            fs = _fs_cache[settings] = pafs.S3FileSystem(**kw)
        return fs


def filesystem(path) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, its path) of a lake path, local or remote."""
    if is_remote(path):
        return s3(), key_of(path)
    return pafs.LocalFileSystem(), str(path)


@dataclass(frozen=True)
class Listed:
    path: Path
    size: int
    mtime_ns: int


def list_files(directory, recursive: bool = True) -> list[Listed]:
    """Files under a remote directory (none when it does not exist), as lake paths."""
    fs, root = filesystem(directory)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=recursive, allow_not_found=True))
    return [Listed(Path(f"s3:/{i.path}"), i.size or 0, i.mtime_ns or 0) for i in infos
            if i.type == pafs.FileType.File]


def exists(path) -> bool:
    fs, p = filesystem(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def stat(path) -> tuple[int, int]:
    """(size in bytes, modification time in ns) of a file; FileNotFoundError when there is none."""
    if not is_remote(path):
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    fs, p = filesystem(path)
    info = fs.get_file_info(p)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(uri(path))
    return info.size or 0, info.mtime_ns or 0


def put_bytes(path, data: bytes | pa.Buffer) -> Path:
    """Write one object under its final name, in one PUT: it appears whole or not at all."""
    fs, p = filesystem(path)
    with fs.open_output_stream(p) as out:
        out.write(data)
    return Path(path)


def get_bytes(path) -> bytes:
    fs, p = filesystem(path)
    with fs.open_input_stream(p) as f:
        return f.read()


def delete(path, missing_ok: bool = True) -> None:
    fs, p = filesystem(path)
    try:
        fs.delete_file(p)
    except FileNotFoundError:
        if not missing_ok:
            raise


def parquet_bytes(table: pa.Table, **write_options) -> pa.Buffer:
    """A Parquet file in memory (`pq.write_table` options), to PUT."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **write_options)
    return sink.getvalue()


# Parquet readers for any lake path: local paths go to pyarrow unchanged.

def read_table(path, **kw) -> pa.Table:
    if is_remote(path):
        return pq.read_table(key_of(path), filesystem=s3(), **kw)
    return pq.read_table(path, **kw)


def read_metadata(path) -> pq.FileMetaData:
    if is_remote(path):
        return pq.read_metadata(key_of(path), filesystem=s3())
    return pq.read_metadata(path)


def read_schema(path) -> pa.Schema:
    if is_remote(path):
        return pq.read_schema(key_of(path), filesystem=s3())
    return pq.read_schema(path)


def parquet_file(path) -> pq.ParquetFile:
    if is_remote(path):
        return pq.ParquetFile(s3().open_input_file(key_of(path)))
    return pq.ParquetFile(path)


def relative(path, root) -> PurePosixPath:
    """`path` relative to `root`, for either kind of path."""
    return PurePosixPath(str(path)).relative_to(PurePosixPath(str(root)))
