"""Directory versions swapped atomically, so that a reader listing a lake directory (DuckDB's or polars'
`read_parquet('frames/**/*.parquet')`, Spark, Trino, pyarrow datasets) sees the files before a compaction or the files
after it, never both and never neither.

Compaction builds the next version of a partition directory beside the lake (the merged files, and hard links of every
file it keeps) and exchanges it with the live one in one `renameat2(RENAME_EXCHANGE)` (Linux 3.15+, ext4, xfs, btrfs,
tmpfs). Writers of the directory hold its lock shared (`dir_lock`, an flock on `<dir>/.lock`) from their temporary
file to their rename, and the compactor holds it exclusively from listing the directory to the exchange, so no file
is written into a version that is being replaced. The lock file is hard-linked into the next version too: it is one
inode whichever version a writer opened it in.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import os
from pathlib import Path

LOCK_NAME = ".lock"
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


class ExchangeUnsupported(OSError):
    """The platform or filesystem cannot exchange two directories atomically."""


@contextlib.contextmanager
def dir_lock(directory: Path, exclusive: bool):
    """Hold `directory`'s lock: shared for a writer adding a file, exclusive for a compactor replacing the
    directory's version. Released when the block ends (or the process dies: it is an flock)."""
    fd = os.open(Path(directory) / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # closing releases the flock


def _renameat2():
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        raise ExchangeUnsupported(errno.ENOSYS, "this C library has no renameat2")
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


def exchange_dirs(a: Path, b: Path) -> None:
    """Swap the directories at paths `a` and `b` in one atomic step (both must exist, on one filesystem)."""
    rc = _renameat2()(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc != 0:
        err = ctypes.get_errno()
        if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise ExchangeUnsupported(err, f"cannot exchange {a} and {b} atomically: {os.strerror(err)}")
        raise OSError(err, f"exchanging {a} and {b}: {os.strerror(err)}")


def exchange_supported(directory: Path) -> bool:
    """Whether `exchange_dirs` works on the filesystem of `directory` (tried on two empty scratch directories)."""
    scratch = [Path(directory) / f".exchange-probe-{os.getpid()}-{i}" for i in (0, 1)]
    try:
        for d in scratch:
            d.mkdir(parents=True, exist_ok=True)
        exchange_dirs(*scratch)
        return True
    except OSError:
        return False
    finally:
        for d in scratch:
            with contextlib.suppress(OSError):
                d.rmdir()
