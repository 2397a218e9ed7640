"""The reference fleet: drives logged from the highway-env simulator, driven by its rule-based expert, seen through
an on-board perception that degrades at night, in rain and in glare at a tunnel exit.

    from ingest.fleet import FleetConfig, simulate_fleet
    summary = simulate_fleet(FleetConfig(vehicles=8, drives_per_vehicle=4), "data/drives")

Each drive is `<out>/<vehicle_id>/<drive_id>.drive.parquet` (what the vehicle uploads, `ingest.lake` format) with
the simulator's truth beside it in `<drive_id>.truth.parquet` (`ingest.fleet.truth`). `make_env` builds the same
scenarios for closed-loop evaluation.
"""

from ingest.fleet.config import (CONDITIONS, SCENARIOS, ConditionRates, FleetConfig, PerceptionConditions,
                                 PerceptionParams, ScenarioMix)
from ingest.fleet.env import ROAD_TYPES, SCENARIO_ENV_IDS, install_expert, make_env, reset_env, step_env
from ingest.fleet.sim import FleetSummary, plan_drive, simulate_drive, simulate_fleet
from ingest.fleet.truth import TRUTH_FORMAT_VERSION, TRUTH_SCHEMA, read_truth, truth_path

__all__ = [
    "CONDITIONS", "SCENARIOS", "SCENARIO_ENV_IDS", "ROAD_TYPES", "TRUTH_FORMAT_VERSION", "TRUTH_SCHEMA",
    "ConditionRates", "FleetConfig", "FleetSummary", "PerceptionConditions", "PerceptionParams", "ScenarioMix",
    "install_expert", "make_env", "plan_drive", "read_truth", "reset_env", "simulate_drive", "simulate_fleet",
    "step_env", "truth_path",
]
