"""Every stored format carries a version, and its reader refuses one it does not know with an error naming the file
and the version: lake tables (each reader of them), drive files, snapshots, the registry index, the job store,
cycle records and results, the fine-tune's state and result, model specs and checkpoints."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ingest.contract import SCHEMA_VERSION
from ingest.lake import (file_name, partition_dir, read_drive, to_lake_batch, write_drive, write_json_atomic,
                         write_parquet_atomic)
from ingest.lake_index import lake_positions
from ingest.synth import synthetic_drive, synthetic_frames
from ingest.tables import TABLES
from ingest.versions import UnknownVersion
from retrain.cycle.cycle import CycleError, read_record
from retrain.cycle.dataset import SnapshotError, Snapshot, load_snapshot, read_lake_frames
from retrain.cycle.finetune import FinetuneError, check_state, read_result, save_state
from retrain.cycle.registry import Registry
from retrain.cycle.report_data import load_data
from retrain.jobs.models import JobError
from retrain.jobs.store import JobStore
from retrain.models.architectures import Planner, PlannerConfig
from retrain.models.training import load_checkpoint, save_checkpoint
from shadow.batch.frames_index import PartitionIndex
from shadow.catalog import Catalog
from shadow.outputs import resume_context
from shadow.spec import read_spec, write_spec
from ingest.lake import live_files
from retrain.models.reference import reference_dir

TOPIC = "flywheel.frames"


def frames_file(lake: Path, version: str | None) -> Path:
    """One frames file of the lake whose footer says schema version `version` (None: no version at all)."""
    batch = to_lake_batch(synthetic_frames(20, agents=2, waypoints=3), "d1", "v1", 0, SCHEMA_VERSION,
                          1_767_312_000_000, 0, 0)
    table = pa.Table.from_batches([batch])
    meta = dict(table.schema.metadata)
    if version is None:
        meta.pop(b"flywheel.schema_version")
    else:
        meta[b"flywheel.schema_version"] = version.encode()
    path = partition_dir(lake, "frames", "2026-01-02") / file_name(TOPIC, 0, 0, 0)
    return write_parquet_atomic(table.replace_schema_metadata(meta), path,
                                metadata={"flywheel.drive_seq": json.dumps({"d1": [[0, 19]]})})


@pytest.mark.parametrize("version", ["99", None])
def test_lake_readers_refuse_a_table_of_another_schema_version(tmp_path, version):
    lake = tmp_path / "lake"
    path = frames_file(lake, version)
    expected = f"{path}: lake table 'frames' format version {version!r} is not {TABLES['frames'].version}"
    with pytest.raises(UnknownVersion, match=expected.replace("(", r"\(").replace(")", r"\)")):
        lake_positions(lake, TOPIC, {0})  # the sink's resume position
    with pytest.raises(UnknownVersion, match="lake table 'frames'"):
        PartitionIndex(live_files(lake, "frames"))  # the batch replay
    with pytest.raises(UnknownVersion, match="lake table 'frames'"):
        Catalog(lake)  # SQL
    with pytest.raises(UnknownVersion, match="lake table 'frames'"):
        read_lake_frames(lake, {"d1": [(0, 5)]})  # snapshots


def test_lake_readers_accept_the_current_version(tmp_path):
    lake = tmp_path / "lake"
    frames_file(lake, str(TABLES["frames"].version))
    assert lake_positions(lake, TOPIC, {0})[0].next_offset == 1
    with Catalog(lake) as cat:
        assert cat.arrow("SELECT count(*) AS n FROM frames").to_pylist() == [{"n": 20}]


def test_shadow_outputs_of_another_version_are_refused(tmp_path):
    lake = tmp_path / "lake"
    div = TABLES["divergences"].schema.empty_table()
    meta = {**div.schema.metadata, b"flywheel.schema_version": b"7"}
    path = partition_dir(lake, "divergences", "2026-01-02", pair="t-1__s-1") / file_name(TOPIC, 0, 0, 9)
    write_parquet_atomic(div.replace_schema_metadata(meta), path)
    files = live_files(lake / "divergences", "pair=t-1__s-1")
    with pytest.raises(UnknownVersion, match=f"{path}: lake table 'divergences' format version '7'"):
        resume_context(files, 60.0)  # the streaming worker's resume point


def test_drive_file_of_another_version_is_refused(tmp_path):
    path = write_drive(tmp_path, synthetic_drive("d1", "v1", 10))
    t = pq.read_table(path)
    pq.write_table(t.replace_schema_metadata({**t.schema.metadata, b"flywheel.format_version": b"3"}), path)
    with pytest.raises(UnknownVersion, match=f"{path}: drive file format version '3' is not 1"):
        read_drive(path)


def test_snapshot_of_another_version_is_refused(tmp_path):
    snap = tmp_path / "snap"
    snap.mkdir()
    write_json_atomic(snap / "manifest.json", {"format_version": 2, "snapshot_id": "x", "content_sha256": "y"})
    with pytest.raises(SnapshotError, match=r"manifest.json: snapshot format version 2 is not 1"):
        load_snapshot(snap)
    frames = snap / "frames.parquet"
    pq.write_table(pa.table({"x": [1]}, metadata={"flywheel.format_version": "5"}), frames)
    with pytest.raises(SnapshotError, match=r"frames.parquet: snapshot frames format version '5' is not 1"):
        Snapshot(snap, {"snapshot_id": "x"}).table()


def test_registry_index_of_another_version_is_refused(tmp_path):
    reg = Registry(tmp_path / "reg")
    reg.register("teacher", "v1", reference_dir("teacher"))
    index = tmp_path / "reg" / "index.json"
    doc = json.loads(index.read_text())
    index.write_text(json.dumps({**doc, "format_version": 4}))
    with pytest.raises(UnknownVersion, match=f"{index}: registry index format version 4 is not 1"):
        reg.list()


def test_job_store_of_another_version_is_refused(tmp_path):
    db = tmp_path / "jobs.sqlite"
    JobStore(db)
    con = sqlite3.connect(db)
    con.execute("UPDATE schema_version SET version = 9")
    con.commit()
    con.close()
    with pytest.raises(JobError, match=f"{db}: jobs schema version 9"):
        JobStore(db)


def test_cycle_records_and_results_of_another_version_are_refused(tmp_path):
    rec = write_json_atomic(tmp_path / "mine.json", {"format_version": 3, "step": "mine", "output": {}})
    with pytest.raises(CycleError, match=f"{rec}: cycle step record format version 3 is not 1"):
        read_record(rec, "cycle step record")
    old = write_json_atomic(tmp_path / "snapshot.json", {"step": "snapshot", "output": {}})  # before versions: 1
    assert read_record(old, "cycle step record")["step"] == "snapshot"
    with pytest.raises(UnknownVersion, match="cycle result format version 2 is not 1"):
        load_data({"format_version": 2, "work_dir": str(tmp_path)}, None)


def test_finetune_state_and_result_of_another_version_are_refused(tmp_path):
    out = tmp_path / "ft"
    out.mkdir()
    write_json_atomic(out / "result.json", {"format_version": 6})
    with pytest.raises(FinetuneError, match="result.json: fine-tune result format version 6 is not 1"):
        read_result(out / "result.json")
    save_state(out / "state.pt", {"key": "k"})
    blob = torch.load(out / "state.pt", weights_only=False)
    assert blob["format_version"] == 2
    torch.save({**blob, "format_version": 8}, out / "state.pt")
    with pytest.raises(FinetuneError, match="state.pt: fine-tune state format version 8 is not 2"):
        check_state(out / "state.pt", torch.load(out / "state.pt", weights_only=False))


def test_spec_and_checkpoint_of_another_version_are_refused(tmp_path):
    model = Planner(PlannerConfig(width=16, depth=1, heads=2, head_dim=8, ffn=32))
    ckpt = save_checkpoint(model, tmp_path / "c.pt")
    assert load_checkpoint(ckpt).config == model.config
    blob = torch.load(ckpt, weights_only=True)
    torch.save({**blob, "format_version": 2}, ckpt)
    with pytest.raises(UnknownVersion, match=f"{ckpt}: checkpoint format version 2 is not 1"):
        load_checkpoint(ckpt)
    src = reference_dir("teacher")
    (tmp_path / "m").mkdir()
    onnx = tmp_path / "m" / "model.onnx"
    onnx.write_bytes((src / "model.onnx").read_bytes())
    write_spec(read_spec(src), onnx)
    spec = tmp_path / "m" / "spec.json"
    spec.write_text(json.dumps({**json.loads(spec.read_text()), "format_version": 3}))
    with pytest.raises(UnknownVersion, match=f"{spec}: model spec format version 3 is not 1"):
        read_spec(onnx)
