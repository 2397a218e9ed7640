"""SQL limits: every catalog has a timeout and a memory limit by default, `flywheel sql` takes them from the [sql]
settings, a query past its timeout is stopped, and Ctrl-C stops a running query with one line, no traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from shadow.catalog import Catalog, CatalogConfig, QueryInterrupted
from tests.shadow.test_cli_sql import sql
from tests.shadow.test_catalog import lake  # noqa: F401  (the fixture)

ENDLESS = "SELECT count(*) FROM range(1000000000000)"  # hours of work: only an interruption ends it in a test


def test_catalogs_have_a_timeout_and_a_memory_limit_by_default(lake: Path) -> None:
    assert CatalogConfig().timeout_s == 60.0 and CatalogConfig().memory_limit == "2GB"
    with Catalog(lake) as cat:
        limit = cat.arrow("SELECT current_setting('memory_limit') AS m")["m"][0].as_py()
        assert limit.endswith("GiB") and float(limit.split()[0]) < 2.0  # DuckDB reports 2 GB as 1.8 GiB
    with Catalog(lake, CatalogConfig(timeout_s=0.5)) as cat, pytest.raises(QueryInterrupted, match="after 0.5 s"):
        cat.arrow(ENDLESS)


def test_a_query_past_the_configured_timeout_is_stopped(lake: Path) -> None:
    res = sql(lake, ENDLESS, env={"FLYWHEEL_SQL__TIMEOUT_S": "0.5"})
    assert res.exit_code == 1, res.output
    assert "interrupted after 0.5 s" in res.output and "Traceback" not in res.output
    res = sql(lake, "--timeout", "0.3", ENDLESS)  # the option overrides the configuration
    assert res.exit_code == 1 and "interrupted after 0.3 s" in res.output


def test_ctrl_c_stops_a_running_query_with_one_line(lake: Path) -> None:
    # as a terminal's foreground process gets it: a test run in the background (`cmd &` in a non-interactive
    # shell, as a CI script may) starts its children with SIGINT ignored, and Python then keeps ignoring it
    proc = subprocess.Popen([sys.executable, "-m", "flywheel", "-v", "sql", "--lake", str(lake), ENDLESS],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "FLYWHEEL_SQL__TIMEOUT_S": "600"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for line in proc.stderr:  # the query is running once the catalog says so
            if "running SELECT count(*)" in line:
                break
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)  # the query alone would run for hours, its timeout for 600 s
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert [line for line in err.splitlines() if "interrupted" in line] == ["query interrupted"]
