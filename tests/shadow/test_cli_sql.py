"""`flywheel sql` through typer's CliRunner on a small real lake: query, --file, --saved, formats, the interactive
prompt, refusals."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from flywheel.cli.main import app
from tests.shadow.test_catalog import PAIR_A, PAIR_B, lake  # noqa: F401  (the fixture)

runner = CliRunner()


def sql(lake_dir: Path, *args: str, stdin: str | None = None, env: dict | None = None):
    return runner.invoke(app, ["sql", "--lake", str(lake_dir), *args], input=stdin, env=env)


def test_query_argument_prints_a_table(lake: Path) -> None:
    res = sql(lake, "SELECT drive_id, count(*) AS n FROM frames GROUP BY drive_id ORDER BY drive_id")
    assert res.exit_code == 0, res.output
    assert "drive_id" in res.stdout and "d1" in res.stdout and "d2" in res.stdout and "2 rows" in res.stdout


def test_csv_and_json_parse_back(lake: Path) -> None:
    query = "SELECT pair, count(*) AS n, list(seq ORDER BY seq)[1:2] AS first FROM divergences GROUP BY pair ORDER BY pair"
    res = sql(lake, "--format", "csv", query)
    assert res.exit_code == 0, res.output
    got = list(csv.DictReader(io.StringIO(res.stdout)))
    assert got == [{"pair": PAIR_A, "n": "10", "first": "[0, 0]"}, {"pair": PAIR_B, "n": "10", "first": "[0, 0]"}]
    res = sql(lake, "--format", "json", query + " LIMIT 1")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == [{"pair": PAIR_A, "n": 10, "first": [0, 0]}]
    res = sql(lake, "--format", "json", "SELECT min(timestamp) AS t, min(date) AS d, 'nan'::DOUBLE AS x FROM frames")
    row = json.loads(res.stdout)[0]
    assert row["d"] == "2026-01-02" and row["t"].startswith("2026-01-01T") and row["x"] is None


def test_parquet_needs_out_and_reads_back(lake: Path, tmp_path: Path) -> None:
    res = sql(lake, "--format", "parquet", "SELECT 1")
    assert res.exit_code != 0 and "--out" in res.output
    out = tmp_path / "r.parquet"
    res = sql(lake, "--format", "parquet", "--out", str(out), "SELECT drive_id, seq, lighting FROM frames ORDER BY ALL")
    assert res.exit_code == 0, res.output
    table = pq.read_table(out)
    assert table.num_rows == 10 and table.column_names == ["drive_id", "seq", "lighting"]
    assert table["lighting"].to_pylist().count("night") == 2


def test_file_with_several_statements(lake: Path, tmp_path: Path) -> None:
    script = tmp_path / "q.sql"
    script.write_text("-- two reads\nSELECT count(*) AS frames_n FROM frames;\nSELECT count(*) AS scen_n FROM scenarios;\n")
    res = sql(lake, "--file", str(script), "--format", "csv")
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines() == ['"frames_n"', "10", '"scen_n"', "3"]
    script.write_text("SELECT 1;\nDROP VIEW frames;\n")
    res = sql(lake, "--file", str(script))
    assert res.exit_code == 3 and "DROP" in res.output and "1" not in res.stdout  # refused before anything ran


def test_saved_with_params_and_list(lake: Path) -> None:
    res = sql(lake, "--saved", "top_divergent_frames", "--param", "lighting=night", "--param", "limit=1",
              "--format", "json")
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    assert [(r["drive_id"], r["seq"], r["lighting"]) for r in got] == [("d1", 5, "night")]
    res = sql(lake, "--saved", "top_divergent_frames", "--param", "limit=lots")
    assert res.exit_code == 1 and "limit must be INTEGER" in res.output
    res = sql(lake, "--saved", "nope")
    assert res.exit_code == 1 and "no saved query" in res.output
    res = sql(lake, "--param", "a=1", "SELECT 1")
    assert res.exit_code != 0
    res = sql(lake, "--list-saved")
    assert res.exit_code == 0 and "divergence_by_condition" in res.stdout and "min_frames" in res.stdout


@pytest.mark.parametrize("query,what", [
    ("INSERT INTO frames SELECT * FROM frames", "INSERT"),
    ("SELECT * FROM read_csv('/etc/passwd')", "Permission"),
    ("SELECT 1; COPY (SELECT 1) TO 'x.csv'", "COPY"),
])
def test_refused_query_exits_non_zero_with_the_message(lake: Path, query: str, what: str) -> None:
    res = sql(lake, query)
    assert res.exit_code == 3
    assert what in res.output and "root:" not in res.output


def test_interactive_prompt(lake: Path) -> None:
    stdin = ("SELECT count(*) AS n\nFROM frames;\n"  # a statement over two lines
             "SELEC 1;\n"  # an error: printed, the prompt goes on
             "DROP VIEW frames;\n"  # refused: printed, the prompt goes on
             ".tables\n"
             ".bogus\n"
             "SELECT 'still here' AS s;\n"
             ".quit\n"
             "SELECT 'after quit' AS s;\n")
    res = sql(lake, "--format", "csv", stdin=stdin)
    assert res.exit_code == 0, res.output
    out = res.stdout.splitlines()
    assert out[:2] == ['"n"', "10"]
    assert "divergence_by_condition" in out and '"still here"' in out
    assert "after quit" not in res.output
    assert "syntax error" in res.output and "DROP" in res.output and "unknown command" in res.output


def test_interactive_ends_at_end_of_input(lake: Path) -> None:
    res = sql(lake, "--format", "csv", stdin="SELECT 7 AS x;\nSELECT 8")
    assert res.exit_code == 0 and res.stdout.splitlines() == ['"x"', "7"] and "unfinished" in res.output


def test_lake_from_settings_when_not_given(lake: Path) -> None:
    res = runner.invoke(app, ["sql", "--format", "csv", "SELECT count(*) AS n FROM frames"],
                        env={"FLYWHEEL_SINK__LAKE_DIR": str(lake)})
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines() == ['"n"', "10"]
