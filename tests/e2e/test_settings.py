"""One configuration: precedence (defaults < TOML < environment < explicit), validation errors, hidden secrets."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from pydantic import ValidationError

from flywheel.settings import load_settings


def test_precedence(tmp_path, monkeypatch):
    cfg = tmp_path / "flywheel.toml"
    cfg.write_text('[kafka]\nbootstrap_servers = "toml:9092"\npartitions = 9\n[sink]\nmax_rows = 123\n')
    monkeypatch.setenv("FLYWHEEL_KAFKA__PARTITIONS", "11")
    s = load_settings(cfg)
    assert s.kafka.bootstrap_servers == "toml:9092"  # from TOML
    assert s.kafka.partitions == 11  # env beats TOML
    assert s.sink.max_rows == 123
    assert s.server.max_chunk_bytes == 4 << 20  # default from the component model
    assert load_settings(cfg, sink={"max_rows": 7}).sink.max_rows == 7  # explicit beats all


def test_validation_names_the_key(tmp_path, monkeypatch):
    bad = tmp_path / "bad.toml"
    bad.write_text("[kafka]\npartitions = 0\n")
    with pytest.raises(ValidationError, match="kafka.partitions"):
        load_settings(bad)
    typo = tmp_path / "typo.toml"
    typo.write_text("[sink]\nmax_rowz = 5\n")
    with pytest.raises(ValidationError, match="max_rowz"):
        load_settings(typo)
    with pytest.raises(FileNotFoundError):
        load_settings(tmp_path / "missing.toml")
    monkeypatch.setenv("FLYWHEEL_SERVER__TLS_CLIENT_CA", "/ca.pem")
    with pytest.raises(ValidationError, match="mTLS"):
        load_settings()


def test_config_show_hides_secrets(tmp_path):
    cfg = tmp_path / "f.toml"
    cfg.write_text('[kafka]\nsasl_mechanism = "PLAIN"\nsasl_username = "u"\nsasl_password = "hunter2"\n')
    out = subprocess.run([sys.executable, "-m", "flywheel", "--config", str(cfg), "config", "show", "--json"],
                         capture_output=True, text=True, check=True).stdout
    assert "hunter2" not in out
    assert json.loads(out)["kafka"]["sasl_password"] == "**********"
    table = subprocess.run([sys.executable, "-m", "flywheel", "--config", str(cfg), "config", "show"],
                           capture_output=True, text=True, check=True).stdout
    assert "hunter2" not in table and "sasl_username" in table


def test_a_partial_demo_fleet_changes_only_those_fields_of_the_demos_fleet(tmp_path, monkeypatch):
    default = load_settings().demo.fleet
    assert default.scenario_mix.roundabout == 0.5 and default.scenario_mix.highway == 0.0
    monkeypatch.setenv("FLYWHEEL_DEMO__FLEET__VEHICLES", "24")
    fleet = load_settings().demo.fleet
    assert fleet.vehicles == 24  # the one field given
    assert fleet.model_dump(exclude={"vehicles"}) == default.model_dump(exclude={"vehicles"})  # the demo's city mix
    cfg = tmp_path / "flywheel.toml"
    cfg.write_text("[demo.fleet]\ndrive_duration_s = 10.0\n[demo.fleet.scenario_mix]\nhighway = 1.0\n")
    monkeypatch.delenv("FLYWHEEL_DEMO__FLEET__VEHICLES")
    fleet = load_settings(cfg).demo.fleet
    assert (fleet.drive_duration_s, fleet.vehicles, fleet.scenario_mix.highway) == (10.0, default.vehicles, 1.0)
    with pytest.raises(ValidationError, match="vehicle"):
        load_settings(demo={"fleet": {"vehicles": 0}})
