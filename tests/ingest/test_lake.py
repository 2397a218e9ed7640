"""Storage contract details: which temporary files are stale, live-file resolution after compaction."""

from __future__ import annotations

import os
import subprocess
import sys

from ingest.lake import HOST, remove_stale_temporaries


def test_only_temporaries_of_dead_writers_or_old_ones_are_removed(tmp_path):
    part = tmp_path / "frames" / "date=2026-01-01"
    part.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    gone = part / f".a.parquet.{HOST}.{dead.pid}.abcd1234.tmp"
    mine = part / f".b.parquet.{HOST}.{os.getpid()}.abcd1234.tmp"  # a live writer on this host
    remote = part / f".c.parquet.otherhost.{dead.pid}.abcd1234.tmp"  # a writer on another host: age decides
    old_remote = part / ".d.parquet.otherhost.1.abcd1234.tmp"
    for p in (gone, mine, remote, old_remote):
        p.write_text("x")
    os.utime(old_remote, (1, 1))
    assert remove_stale_temporaries(tmp_path, "frames", min_age_s=600) == 2
    assert sorted(p.name for p in part.iterdir()) == sorted([mine.name, remote.name])
