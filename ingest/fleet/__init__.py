"""The reference fleet: drives logged from the highway-env simulator, driven by its rule-based expert, seen through
an on-board perception that degrades at night, in rain and in glare at a tunnel exit.

    from ingest.fleet import FleetConfig, simulate_fleet
    summary = simulate_fleet(FleetConfig(vehicles=8, drives_per_vehicle=4), "data/drives")

Each drive is `<out>/<vehicle_id>/<drive_id>.drive.parquet` (what the vehicle uploads, `ingest.lake` format) with
the simulator's truth beside it in `<drive_id>.truth.parquet` (`ingest.fleet.truth`). `make_env` builds the same
scenarios for closed-loop evaluation.

Names are imported on first use: importing the configuration (as the settings do) does not load the simulator.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ingest.fleet.config": ("CONDITIONS", "SCENARIOS", "ConditionRates", "FleetConfig", "PerceptionConditions",
                            "PerceptionParams", "ScenarioMix"),
    "ingest.fleet.env": ("ROAD_TYPES", "SCENARIO_ENV_IDS", "ExpertVehicle", "install_expert", "make_env",
                         "reset_env", "route_ended", "step_env"),
    "ingest.fleet.sim": ("FleetSummary", "plan_drive", "simulate_drive", "simulate_fleet"),
    "ingest.fleet.truth": ("TRUTH_FORMAT_VERSION", "TRUTH_SCHEMA", "read_truth", "truth_footer", "truth_path"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'ingest.fleet' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
