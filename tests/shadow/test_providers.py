"""Execution providers: chosen in the configuration, a missing one fails clearly unless fallback is allowed, and the
provider that ran is recorded with every replay (report and file footers)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from ingest.lake import live_files
from shadow.batch.replay import replay
from shadow.config import ExecutionConfig, ReplayConfig, RuntimeConfig, configure_execution, default_execution
from shadow.models import ProviderUnavailable, execution_record, load_model, resolve_providers, session
from tests.shadow.test_replay import models, small_lake  # noqa: F401  (the fixture)

REPO = Path(__file__).resolve().parents[2]
MISSING = next(p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider", "ROCMExecutionProvider")
               if p not in ort.get_available_providers())


def test_names_and_options_normalised() -> None:
    cfg = ExecutionConfig(providers=["cuda", "cpu", "CUDAExecutionProvider"],
                          provider_options={"cuda": {"device_id": 1}})
    assert cfg.providers == ("CUDAExecutionProvider", "CPUExecutionProvider")
    assert cfg.provider_options == {"CUDAExecutionProvider": {"device_id": "1"}}
    with pytest.raises(ValidationError, match="not an execution provider"):
        ExecutionConfig(providers=["gpu"])
    with pytest.raises(ValidationError):
        ExecutionConfig(torch_device="cuda0")
    assert ExecutionConfig().providers == ("CPUExecutionProvider",)


def test_missing_provider_fails_unless_fallback(models, caplog) -> None:  # noqa: F811
    want = ExecutionConfig(providers=[MISSING, "cpu"])
    with pytest.raises(ProviderUnavailable, match=f"{MISSING}.*available: .*CPUExecutionProvider.*allow_fallback"):
        resolve_providers(want)
    with pytest.raises(ProviderUnavailable, match=MISSING):
        session(models["teacher"], execution=want)
    with pytest.raises(ProviderUnavailable, match=MISSING):
        load_model(models["teacher"], RuntimeConfig(execution=want))
    allowed = want.model_copy(update={"allow_fallback": True})
    with caplog.at_level(logging.WARNING, logger="shadow.models"):
        sess = session(models["teacher"], execution=allowed)
    assert MISSING in caplog.text
    rec = execution_record(sess, allowed)
    assert rec["providers"] == ["CPUExecutionProvider"] and rec["fallback"] is True
    assert rec["requested"] == [MISSING, "CPUExecutionProvider"]


def test_process_default_reaches_every_session(models) -> None:  # noqa: F811
    before = default_execution()
    try:
        configure_execution(ExecutionConfig(providers=[MISSING]))
        with pytest.raises(ProviderUnavailable):
            session(models["student"])
    finally:
        configure_execution(before)
    rec = execution_record(session(models["student"]))
    assert rec == {**rec, "providers": ["CPUExecutionProvider"], "fallback": False}


def test_replay_records_the_provider(tmp_path, models) -> None:  # noqa: F811
    lake = tmp_path / "lake"
    small_lake(lake, {"d0": 60, "d1": 40}, chunk=20, per_file=2)
    report = replay(lake, models["teacher"], models["student"], ReplayConfig(group_frames=64))
    assert report.frames_replayed == 100
    for role in ("teacher", "student", "noise_teacher"):
        assert report.execution[role]["providers"] == ["CPUExecutionProvider"]
        assert report.execution[role]["fallback"] is False
    for table in ("decisions", "divergences"):
        for f in live_files(lake, table):
            meta = pq.read_schema(f.path).metadata
            assert json.loads(meta[b"flywheel.shadow.providers"]) == {"teacher": ["CPUExecutionProvider"],
                                                                      "student": ["CPUExecutionProvider"]}


def test_cli_refuses_a_missing_provider(tmp_path, models) -> None:  # noqa: F811
    lake = tmp_path / "lake"
    small_lake(lake, {"d0": 40}, chunk=20, per_file=2)
    env = {**os.environ, "FLYWHEEL_EXECUTION__PROVIDERS": json.dumps(["cuda"])}
    out = subprocess.run([sys.executable, "-m", "flywheel", "shadow", "run", "--lake", str(lake),
                          "--teacher", str(models["teacher"]), "--student", str(models["student"])],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "CUDAExecutionProvider" in out.stderr and "allow_fallback" in out.stderr
    assert not live_files(lake, "divergences")
