"""The SQL catalog over real Parquet files written with the lake's real schemas: views over live files, the divergence
rollup, refresh, every protection of the sandbox, and the saved queries on empty and hand-made lakes."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ingest.contract import ENUMS, SCHEMA_VERSION
from ingest.tables import TABLES
from ingest.lake import file_name, partition_dir, write_parquet_atomic
from ingest.lake import to_lake_batch
from ingest.synth import synthetic_frames
from shadow.catalog import Catalog, QueryError, QueryRefused, connect, duckdb_columns, load_saved, saved_queries
from tests.lake_rows import rows

DAY, DAY2 = "2026-01-02", "2026-01-03"
TOPIC = "flywheel.frames"
TEACHER = "teacher-1.0"
PAIR_A, PAIR_B = f"{TEACHER}__student-1.0", f"{TEACHER}__student-1.1"
# drive d1: 4 day frames then 2 night frames on a clear highway; drive d2: 4 day frames on a rainy merge
FRAMES = [("d1", "v1", s, "highway", "day" if s < 4 else "night", "clear") for s in range(6)] + \
         [("d2", "v2", s, "merge", "day", "rain") for s in range(4)]
SCORE_A = [1.0, 1.0, 1.0, 1.0, 3.5, 4.5, 2.0, 2.0, 2.0, 2.0]  # mean 2.0; night 4.0, day-clear 1.0, rain 2.0


def write(lake: Path, table: str, data: pa.Table, first: int, last: int, date: str = DAY, partition: int = 0,
          **keys: str) -> Path:
    path = partition_dir(lake, table, date, **keys) / file_name(TOPIC, partition, first, last)
    return write_parquet_atomic(data, path)


def frames_table(drive: str, vehicle: str, conditions: list[tuple[str, str, str]], offset: int) -> pa.Table:
    """Frames of one drive through the sink's own conversion, with the given (road, lighting, weather) per frame."""
    f = synthetic_frames(len(conditions), agents=2, waypoints=3, seed=hash(drive) % 100)
    for i, enum in enumerate(("road_type", "lighting", "weather")):
        names = ENUMS[enum][1]
        f.cols[enum][:] = [names.index(c[i]) for c in conditions]
    batch = to_lake_batch(f, drive, vehicle, 0, SCHEMA_VERSION, 1_767_312_000_000, 0, offset)
    return pa.Table.from_batches([batch])


def divergence_rows(pair: str, scale: float) -> pa.Table:
    teacher, student = pair.split("__")
    recs = []
    for (drive, vehicle, seq, road, light, weather), score in zip(FRAMES, SCORE_A):
        recs.append({"drive_id": drive, "vehicle_id": vehicle, "seq": seq, "teacher_name": "teacher",
                     "teacher_version": teacher.split("-")[1], "student_name": "student",
                     "student_version": student.split("-")[1], "road_type": road, "lighting": light,
                     "weather": weather, "score": score * scale, "ade_4s": score * scale / 2,
                     "fde_4s": score * scale, "miss_4s": light == "night",
                     "maneuver_disagree": drive == "d2" and seq == 0, "teacher_ade_driver": 0.5,
                     "student_ade_driver": 0.5 + score * scale})
    return rows("divergences", recs)


@pytest.fixture
def lake(tmp_path: Path) -> Path:
    """A small lake: 10 frames, their divergences for two pairs, 3 scenario windows, noise floor, decisions."""
    lake = tmp_path / "lake"
    write(lake, "frames", frames_table("d1", "v1", [c[3:] for c in FRAMES[:6]], 0), 0, 0)
    write(lake, "frames", frames_table("d2", "v2", [c[3:] for c in FRAMES[6:]], 1), 1, 1)
    for pair, scale in ((PAIR_A, 1.0), (PAIR_B, 0.5)):
        write(lake, "divergences", divergence_rows(pair, scale), 0, 1, pair=pair)
    windows = [("d1", 0, 3, "highway", "day", "clear", 1.0, True, []),
               ("d1", 4, 5, "highway", "night", "clear", 4.5, False, ["miss_rate_4s"]),
               ("d2", 0, 3, "merge", "day", "rain", 2.5, False, ["max_score"])]
    write(lake, "scenarios", rows("scenarios", [
        {"drive_id": d, "window_start_seq": a, "window_end_seq": b, "road_type": r, "lighting": li, "weather": w,
         "max_score": m, "mean_score": m / 2, "passed": p, "failed_criteria": fc, "frames": b - a + 1}
        for d, a, b, r, li, w, m, p, fc in windows]), 0, 1, pair=PAIR_A)
    write(lake, "noise_floor", rows("noise_floor", [
        {"drive_id": "d1", "seq": s, "model_name": "teacher", "model_version": "1.0", "runtime_a": "a",
         "runtime_b": "b", "score": 0.001 * (s + 1), "ade_4s": 0.01} for s in range(4)]), 0, 0, model=TEACHER)
    write(lake, "decisions", rows("decisions", [{"drive_id": "d1", "seq": 0, "model_name": "student",
                                                 "model_version": "1.0"}]), 0, 0, model="student-1.0")
    return lake


def scalar(catalog: Catalog, query: str):
    return catalog.arrow(query).to_pylist()[0]


# ------------------------------------------------------------------------------------------------------- views


def test_views_return_rows_with_partition_columns(lake: Path) -> None:
    with Catalog(lake) as c:
        assert scalar(c, "SELECT count(*) AS n FROM frames")["n"] == 10
        assert scalar(c, "SELECT count(DISTINCT drive_id) AS n, min(date) AS d FROM frames") == \
            {"n": 2, "d": datetime(2026, 1, 2).date()}
        got = c.arrow("SELECT pair, count(*) AS n FROM divergences GROUP BY pair ORDER BY pair").to_pylist()
        assert got == [{"pair": PAIR_A, "n": 10}, {"pair": PAIR_B, "n": 10}]
        assert scalar(c, "SELECT model FROM noise_floor")["model"] == TEACHER
        assert scalar(c, "SELECT model FROM decisions")["model"] == "student-1.0"
        assert c.table("scenarios").count("*").fetchall()[0][0] == 3
        assert [r["lighting"] for r in c.arrow("SELECT lighting FROM frames WHERE drive_id = 'd1' ORDER BY seq")
                .to_pylist()] == ["day"] * 4 + ["night"] * 2


def test_empty_tables_have_the_fixed_schema(tmp_path: Path, lake: Path) -> None:
    with Catalog(tmp_path / "no-lake-here") as empty, Catalog(lake) as full:
        for table in TABLES:
            described = empty.arrow(f"DESCRIBE {table}").to_pylist()
            assert [(r["column_name"], r["column_type"]) for r in described] == list(duckdb_columns(table))
            assert scalar(empty, f"SELECT count(*) AS n FROM {table}")["n"] == 0
            assert empty.arrow(f"SELECT * FROM {table}").schema == full.arrow(f"SELECT * FROM {table} LIMIT 0").schema


def test_compaction_leftovers_are_not_double_counted(lake: Path) -> None:
    both = pa.concat_tables([pq.read_table(p) for p in sorted((lake / "frames" / f"date={DAY}").glob("*.parquet"))])
    merged = write(lake, "frames", both, 0, 1)  # the compactor's output; the small inputs are still there
    assert len(list(merged.parent.glob("*.parquet"))) == 3
    div = lake / "divergences" / f"pair={PAIR_A}" / f"date={DAY}"
    small = write(lake, "divergences", divergence_rows(PAIR_A, 1.0).slice(0, 6), 0, 0, pair=PAIR_A)
    assert len(list(div.glob("*.parquet"))) == 2  # a leftover covered by the wider [0, 1] file
    with Catalog(lake) as c:
        assert scalar(c, "SELECT count(*) AS n FROM frames")["n"] == 10
        assert [str(f.path) for f in c.files["frames"]] == [str(merged)]
        assert scalar(c, f"SELECT count(*) AS n FROM divergences WHERE pair = '{PAIR_A}'")["n"] == 10
        assert scalar(c, f"SELECT sum(frames) AS n FROM divergence_summary WHERE pair = '{PAIR_A}'")["n"] == 10
        assert str(small) not in {str(f.path) for f in c.files["divergences"]}


def test_refresh_picks_up_new_files_and_keeps_the_rollup_exact(lake: Path) -> None:
    with Catalog(lake) as c:
        assert scalar(c, "SELECT sum(frames) AS n FROM divergence_summary")["n"] == 20  # builds the rollup
        extra = divergence_rows(PAIR_A, 2.0).slice(6, 4)
        write(lake, "divergences", extra, 2, 2, date=DAY2, pair=PAIR_A)
        write(lake, "frames", frames_table("d3", "v3", [("urban", "dusk", "fog")] * 3, 2), 2, 2, date=DAY2)
        assert scalar(c, "SELECT count(*) AS n FROM frames")["n"] == 10  # not until refresh
        assert c.refresh()["divergences"] == 3
        assert scalar(c, "SELECT count(*) AS n FROM frames")["n"] == 13
        assert scalar(c, "SELECT sum(frames) AS n FROM divergence_summary")["n"] == 24
        # compaction of pair A's two files into one: the rollup drops both and aggregates the merged file once
        a_dir = lake / "divergences" / f"pair={PAIR_A}"
        merged = pa.concat_tables([pq.read_table(p) for p in sorted(a_dir.rglob("*.parquet"))])
        write(lake, "divergences", merged, 0, 2, date=DAY2, pair=PAIR_A)
        for p in sorted(a_dir.rglob("*.parquet")):
            if "-00000000000000000002.parquet" not in p.name or f"date={DAY}" in str(p):
                p.unlink()
        c.refresh()
        assert scalar(c, "SELECT sum(frames) AS n FROM divergence_summary")["n"] == 24
        raw = c.arrow("SELECT pair, road_type, lighting, weather, count(*) AS frames, avg(score) AS mean_score "
                      "FROM divergences GROUP BY ALL ORDER BY ALL").to_pylist()
        rolled = c.arrow("SELECT pair, road_type, lighting, weather, frames, mean_score FROM divergence_by_condition "
                         "ORDER BY ALL").to_pylist()
        assert [{**r, "mean_score": pytest.approx(r["mean_score"])} for r in raw] == rolled
        # a file rewritten under its own name (a replay re-run) replaces its part of the rollup
        write(lake, "divergences", divergence_rows(PAIR_B, 3.0), 0, 1, pair=PAIR_B)
        c.refresh()
        got = scalar(c, f"SELECT sum(sum_score) / sum(frames) AS m FROM divergence_summary WHERE pair = '{PAIR_B}'")
        assert got["m"] == pytest.approx(6.0)


# ------------------------------------------------------------------------------------------------- protections

REFUSED_BY_PARSER = [
    ("INSERT INTO frames SELECT * FROM frames", "INSERT"),
    ("CREATE TABLE t AS SELECT 1", "CREATE"),
    ("CREATE TEMP VIEW frames AS SELECT 1", "CREATE"),
    ("CREATE MACRO m(a) AS a", "CREATE"),
    ("DROP VIEW frames", "DROP"),
    ("UPDATE frames SET seq = 0", "UPDATE"),
    ("DELETE FROM frames", "DELETE"),
    ("ALTER VIEW frames RENAME TO f2", "ALTER"),
    ("COPY (SELECT 1) TO '{lake}/out.csv'", "COPY"),  # inside the lake: only the statement check stops it
    ("COPY frames FROM '{lake}/x.csv'", "COPY"),
    ("EXPORT DATABASE '{outside}'", "EXPORT"),
    ("ATTACH ':memory:' AS m", "ATTACH"),
    ("DETACH memory", "DETACH"),
    ("INSTALL httpfs", "INSTALL"),
    ("LOAD httpfs", "LOAD"),
    ("SET enable_external_access = true", "SET"),
    ("RESET lock_configuration", "RESET"),
    ("SET VARIABLE x = 1", "SET"),
    ("PRAGMA version", "PRAGMA"),
    ("CALL pragma_version()", "CALL"),
    ("CHECKPOINT", "CHECKPOINT"),
    ("BEGIN TRANSACTION", "BEGIN"),
    ("PREPARE p AS SELECT 1", "PREPARE"),
    ("VACUUM", "VACUUM"),
    ("USE memory", "USE"),
    ("EXPLAIN ANALYZE CREATE TABLE t AS SELECT 1", "CREATE"),
    ("EXPLAIN (FORMAT json) INSERT INTO frames SELECT * FROM frames", "INSERT"),
    ("SELECT count(*) FROM frames; INSERT INTO frames SELECT * FROM frames", "INSERT"),
    ("SELECT 1; /* harmless */ SELECT 2; DROP VIEW frames", "DROP"),
]


@pytest.mark.parametrize("query,what", REFUSED_BY_PARSER, ids=[q for q, _ in REFUSED_BY_PARSER])
def test_writes_and_settings_are_refused_by_statement_type(lake: Path, tmp_path: Path, query: str, what: str) -> None:
    with Catalog(lake) as c:
        with pytest.raises(QueryRefused, match=what) as info:
            c.arrow(query.format(lake=c.lake, outside=tmp_path / "exported"))
        assert "read-only" in str(info.value)
        assert scalar(c, "SELECT count(*) AS n FROM frames")["n"] == 10  # nothing ran, the catalog still works
    assert not (lake / "out.csv").exists() and not (tmp_path / "exported").exists()


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    path = tmp_path / "secret" / "outside.parquet"
    path.parent.mkdir()
    pq.write_table(pa.table({"secret": ["s3cr3t"]}), path)
    return path


def test_files_outside_the_lake_cannot_be_read(lake: Path, outside: Path) -> None:
    (lake / "frames" / "link.parquet").symlink_to(outside)  # a link planted in the lake
    sibling = lake.parent / (lake.name + "2")  # shares the lake's path as a string prefix
    sibling.mkdir()
    pq.write_table(pa.table({"secret": ["s"]}), sibling / "x.parquet")
    attempts = [
        "SELECT * FROM read_csv('/etc/passwd')",
        "SELECT * FROM read_csv_auto('/etc/passwd', sep = ':')",
        f"SELECT * FROM read_parquet('{outside}')",
        f"SELECT * FROM '{outside}'",
        f"SELECT * FROM read_parquet('{lake}/../secret/outside.parquet')",
        f"SELECT * FROM read_parquet('{lake}/frames/link.parquet')",
        f"SELECT * FROM read_parquet('{sibling}/x.parquet')",
        "SELECT * FROM read_text('/etc/hostname')",
        "SELECT * FROM read_blob('/etc/hostname')",
        "SELECT * FROM glob('/etc/*')",
        f"SELECT * FROM glob('{outside.parent}/*')",
        f"SELECT * FROM parquet_metadata('{outside}')",
        "SELECT * FROM read_json('/etc/os-release')",
        "SELECT * FROM read_parquet('https://example.com/x.parquet')",
        f"SELECT count(*) FROM frames WHERE drive_id IN (SELECT secret FROM read_parquet('{outside}'))",
        f"WITH s AS (SELECT * FROM read_text('{outside}')) SELECT * FROM s",
        "SELECT * FROM query('SELECT * FROM read_text(''/etc/hostname'')')",
    ]
    with Catalog(lake) as c:
        for query in attempts:
            with pytest.raises(QueryRefused, match="Permission|disabled") as info:
                c.arrow(query)
            assert "s3cr3t" not in str(info.value)
        # reads inside the lake still work, through the views or directly
        assert scalar(c, f"SELECT count(*) AS n FROM read_parquet('{lake}/frames/date={DAY}/*.parquet')")["n"] == 10
        assert scalar(c, f"SELECT count(*) AS n FROM glob('{lake}/divergences/**/*.parquet')")["n"] == 2
        assert scalar(c, "SELECT count(*) AS n FROM frames")["n"] == 10


def test_engine_settings_are_locked_independently_of_the_parser(lake: Path) -> None:
    """Each engine-level protection holds even for SQL that never went through the statement check."""
    with Catalog(lake) as c:
        got = c.arrow("SELECT name, value FROM duckdb_settings() WHERE name IN ('enable_external_access', "
                      "'lock_configuration', 'autoload_known_extensions', 'autoinstall_known_extensions', "
                      "'allow_community_extensions', 'python_enable_replacements', 'allowed_directories')").to_pylist()
        assert {r["name"]: r["value"] for r in got} == {
            "enable_external_access": "false", "lock_configuration": "true", "autoload_known_extensions": "false",
            "autoinstall_known_extensions": "false", "allow_community_extensions": "false",
            "python_enable_replacements": "false",
            # the lake, and the catalog's private spill directory (DuckDB allows its temp directory itself)
            "allowed_directories": f"[{c.spill_dir}/, {c.lake}/]"}
        raw = c._con  # behind the parser check
        for sql, error, match in [("SET enable_external_access = true", duckdb.InvalidInputException, "locked"),
                                  ("RESET allowed_directories", duckdb.InvalidInputException, "locked"),
                                  ("COPY (SELECT 1) TO '/tmp/flywheel-catalog-test.csv'", duckdb.PermissionException, ""),
                                  ("ATTACH '/tmp/flywheel-catalog-test.db' AS x", duckdb.PermissionException, ""),
                                  ("INSTALL httpfs", duckdb.PermissionException, ""),
                                  ("LOAD httpfs", duckdb.PermissionException, "")]:
            c._rollback()  # a failed statement aborts the transaction it ran in
            with pytest.raises(error, match=match):
                raw.execute(sql)
        c._begin_read_only()
        with pytest.raises(duckdb.TransactionException, match="read-only"):
            raw.execute("CREATE TABLE t AS SELECT 1")  # the read-only transaction every user statement runs in
        c._begin_read_only()
    assert not Path("/tmp/flywheel-catalog-test.csv").exists() and not Path("/tmp/flywheel-catalog-test.db").exists()


def test_python_variables_are_not_reachable(lake: Path) -> None:
    secret_table = pa.table({"password": ["hunter2"]})  # noqa: F841  (what a replacement scan would find)
    with Catalog(lake) as c:
        with pytest.raises(QueryError, match="secret_table"):
            c.arrow("SELECT * FROM secret_table")


def test_reads_of_every_kind_are_allowed(lake: Path) -> None:
    with Catalog(lake) as c:
        for query in ["VALUES (1), (2)", "FROM frames LIMIT 1", "TABLE scenarios", "DESCRIBE divergences",
                      "SHOW TABLES", "SUMMARIZE SELECT score FROM divergences", "EXPLAIN SELECT * FROM frames",
                      "EXPLAIN ANALYZE SELECT count(*) FROM frames", "PIVOT frames ON lighting USING count(*)",
                      "UNPIVOT (SELECT 1 AS a, 2 AS b) ON a, b", "WITH x AS (SELECT 1 AS a) SELECT * FROM x",
                      "EXPLAIN (SELECT 1)", "EXPLAIN ANALYZE (SELECT 1)", "-- a comment\nSELECT 1;"]:
            assert c.arrow(query).num_rows >= 1, query
        assert c.sql("SELECT 42 AS a").fetchall() == [(42,)]
        with pytest.raises(QueryError, match="one statement"):
            c.arrow("SELECT 1; SELECT 2")
        assert c.split("SELECT 1; SELECT 2;") == ["SELECT 1;", "SELECT 2;"]
        with pytest.raises(QueryError, match="syntax"):
            c.arrow("SELEC 1")


def test_timeout_interrupts_a_long_query(lake: Path) -> None:
    with connect(lake, timeout_s=0.2) as c:
        with pytest.raises(QueryError, match="interrupted"):
            c.arrow("SELECT count(*) FROM range(10000000000) a, range(10) b WHERE a.range * b.range = -1")
        assert scalar(c, "SELECT count(*) AS n FROM frames")["n"] == 10


# ----------------------------------------------------------------------------------------------- saved queries


def test_saved_queries_declare_their_parameters() -> None:
    queries = saved_queries()
    assert {"top_divergent_scenarios", "divergence_by_pair", "divergence_trend", "pass_rates", "noise_floor",
            "frames_per_condition", "divergence_by_condition", "top_divergent_frames"} <= set(queries)
    for q in queries.values():
        assert q.description and q.sql.startswith("--"), q.name
        assert set(duckdb.extract_statements(q.sql)[0].named_parameters) == set(q.params), q.name


def test_saved_query_header_must_match_sql(tmp_path: Path) -> None:
    bad = tmp_path / "bad.sql"
    bad.write_text("-- Declares nothing.\nSELECT $limit\n")
    with pytest.raises(ValueError, match="limit"):
        load_saved(bad)


@pytest.mark.parametrize("name", sorted(saved_queries()))
def test_saved_queries_run_on_an_empty_lake(tmp_path: Path, name: str) -> None:
    with Catalog(tmp_path / "empty") as c:
        assert c.saved(name).num_rows == 0


def test_saved_queries_on_a_hand_made_lake(lake: Path) -> None:
    with Catalog(lake) as c:
        by_pair = {r["pair"]: r for r in c.saved("divergence_by_pair").to_pylist()}
        assert by_pair[PAIR_A]["frames"] == 10 and by_pair[PAIR_A]["mean_score"] == pytest.approx(2.0)
        assert by_pair[PAIR_B]["mean_score"] == pytest.approx(1.0)
        assert by_pair[PAIR_A]["miss_rate_4s"] == pytest.approx(0.2)
        assert by_pair[PAIR_A]["disagree_rate"] == pytest.approx(0.1)
        assert by_pair[PAIR_A]["student_version"] == "1.0" and by_pair[PAIR_B]["student_version"] == "1.1"

        cond = c.saved("divergence_by_condition", pair=PAIR_A).to_pylist()
        assert [(r["lighting"], r["weather"], r["frames"]) for r in cond] == \
            [("night", "clear", 2), ("day", "rain", 4), ("day", "clear", 4)]
        assert [r["lift"] for r in cond] == pytest.approx([2.0, 1.0, 0.5])
        assert cond[0]["miss_rate_4s"] == 1.0 and cond[0]["mean_score"] == pytest.approx(4.0)
        assert len(c.saved("divergence_by_condition", min_frames=3).to_pylist()) == 4

        trend = c.saved("divergence_trend").to_pylist()
        assert [(str(r["date"]), r["pair"], r["frames"]) for r in trend] == [(DAY, PAIR_A, 10), (DAY, PAIR_B, 10)]

        top = c.saved("top_divergent_frames", lighting="night", limit="1").to_pylist()
        assert [(r["pair"], r["drive_id"], r["seq"], r["score"]) for r in top] == [(PAIR_A, "d1", 5, 4.5)]

        scen = {(r["condition"], r["value"]): r for r in c.saved("top_divergent_scenarios", limit=1).to_pylist()}
        assert {k: (r["drive_id"], r["window_start_seq"]) for k, r in scen.items()} == {
            ("lighting", "day"): ("d2", 0), ("lighting", "night"): ("d1", 4), ("weather", "clear"): ("d1", 4),
            ("weather", "rain"): ("d2", 0), ("road_type", "highway"): ("d1", 4), ("road_type", "merge"): ("d2", 0)}
        assert len(c.saved("top_divergent_scenarios").to_pylist()) == 9  # day, clear, highway: 2 windows each

        passes = {(r["scenario_type"], r["lighting"]): r for r in c.saved("pass_rates").to_pylist()}
        assert passes[("highway", "day")]["pass_rate"] == 1.0
        assert passes[("highway", "day")]["top_failed_criterion"] is None
        assert passes[("highway", "night")]["top_failed_criterion"] == "miss_rate_4s"
        assert passes[("merge", "day")]["pass_rate"] == 0.0

        noise = c.saved("noise_floor").to_pylist()
        assert len(noise) == 1 and noise[0]["model"] == TEACHER and noise[0]["frames"] == 4
        assert noise[0]["mean_score"] == pytest.approx(0.0025) and noise[0]["max_score"] == pytest.approx(0.004)

        fpc = {(r["road_type"], r["lighting"], r["weather"]): (r["frames"], r["drives"])
               for r in c.saved("frames_per_condition").to_pylist()}
        assert fpc == {("highway", "day", "clear"): (4, 1), ("highway", "night", "clear"): (2, 1),
                       ("merge", "day", "rain"): (4, 1)}

        driver = c.saved("driver_error_by_pair", pair=PAIR_A).to_pylist()
        assert driver[0]["lighting"] == "night" and driver[0]["student_ade_driver"] == pytest.approx(4.5)


def test_saved_query_parameter_errors(lake: Path) -> None:
    with Catalog(lake) as c:
        with pytest.raises(QueryError, match="no parameter colour"):
            c.saved("top_divergent_frames", colour="red")
        with pytest.raises(QueryError, match="limit must be INTEGER"):
            c.saved("top_divergent_frames", limit="many")
        with pytest.raises(QueryError, match="no saved query"):
            c.saved("nope")


def test_catalog_reads_no_file_it_was_not_given(lake: Path) -> None:
    """Hidden temporary files of a writer in progress and foreign files are not part of any view."""
    tmp = partition_dir(lake, "frames", DAY) / f".{file_name(TOPIC, 0, 5, 5)}.abcd.tmp"
    tmp.write_bytes(b"partial")
    (partition_dir(lake, "frames", DAY) / "notes.parquet").write_bytes(b"not a lake file")
    with Catalog(lake) as c:
        assert scalar(c, "SELECT count(*) AS n FROM frames")["n"] == 10
    os.unlink(tmp)
