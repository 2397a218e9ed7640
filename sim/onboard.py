"""The simulated fleet's on-board decision: what the deployed student computed in the vehicle, in shadow mode.

The expert drives (the ego's path, its commands); the deployed student runs passively beside it with its chip's
numerics, and what it decided is what the car logs as its on-board decision (`plan_x`, `plan_y`, `maneuver`,
`control_*`), with the deployed model's id and version in every frame (`decision_model`, `decision_model_version`).
The expert's own decision moves into the simulator's truth (`sim.truth.with_expert_decision`), for evaluation.

It runs once per drive after the simulation, batched over the drive's frames, so the simulator steps stay fast.

Which artifact a vehicle runs is `OnboardConfig` (part of `FleetConfig`): one model directory for the fleet, optionally
another per vehicle (a chip or software version whose artifact differs). `sim` may not import `shadow` (the layout's
rule: `shadow` builds on `sim`), so the model is run by a plug-in hook named in the configuration, `runner`
("module:function", imported when the first drive needs it): by default `shadow.onboard:run_deployed`, which
featurizes the frames as the fleet's featurizer does and runs the ONNX artifact through `shadow.models` (the exact
integer kernel of the host). The default model is the shipped reference student v0, found by path beside this
package (`retrain/reference/student-v0`, in a checkout and in the wheel alike), not imported.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from ingest.contract import ENUMS, FRAME_SCHEMA, arrow_to_frames, validate

REFERENCE_STUDENT = Path(__file__).resolve().parents[1] / "retrain" / "reference" / "student-v0"
_STEER_LIMIT, _ACCEL_LIMIT = 1.5, 30.0  # the contract's ranges of control_steer [rad] and control_accel [m/s^2]


class OnboardConfig(BaseModel):
    """Which deployed model each simulated vehicle runs in shadow mode, and how it is run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_dir: str | None = Field(str(REFERENCE_STUDENT), description="the fleet's deployed model (a directory with "
                                  "model.onnx and spec.json); None: no model on board, the expert's decision is "
                                  "logged as before and frames name no model")
    per_vehicle: dict[str, str] = Field(default_factory=dict, description="vehicle id (veh-0000, ...) -> the model "
                                        "directory that vehicle runs instead of model_dir")
    runner: str = Field("shadow.onboard:run_deployed", pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
                        description="plug-in hook 'module:function' that runs a model directory over a drive's frames "
                        "(FRAME_SCHEMA rows) -> {traj (n, T, 3) float32 [m, m, rad], maneuver (n,) int, name, "
                        "version, dt_s}")
    wheelbase_m: float = Field(2.5, gt=0, le=10, description="wheelbase of the pure-pursuit step that turns the plan's "
                               "first waypoint into the logged steering command [m]")

    def model_for(self, vehicle_id: str) -> str | None:
        return self.per_vehicle.get(vehicle_id, self.model_dir)

    def fingerprint(self) -> dict:
        """What shapes the logged decision: the runner and the content (sha256) of every artifact, not its path."""
        def digest(d: str | None) -> str | None:
            return None if d is None else _sha256(str(Path(d) / "model.onnx"))
        return {"runner": self.runner, "wheelbase_m": self.wheelbase_m, "model": digest(self.model_dir),
                "per_vehicle": {v: digest(d) for v, d in sorted(self.per_vehicle.items())}}


@functools.lru_cache(maxsize=32)
def _sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@functools.lru_cache(maxsize=4)
def _hook(spec: str) -> Callable:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def _lists(counts: np.ndarray, values: np.ndarray) -> pa.ListArray:
    off = np.zeros(counts.shape[0] + 1, np.int32)
    np.cumsum(counts, out=off[1:])
    return pa.ListArray.from_arrays(pa.array(off), pa.array(values.astype(np.float32)),
                                    type=FRAME_SCHEMA.field("plan_x").type)


def onboard_decision(config: OnboardConfig, drive: pa.Table, plan_waypoints: int, plan_dt_s: float) -> pa.Table:
    """The drive (FRAME_SCHEMA rows of one vehicle) with the deployed model's decision as its on-board one.

    plan_x, plan_y: the model's first `plan_waypoints` waypoints (its own spacing must be `plan_dt_s`); maneuver:
    the arg-max of its maneuver head; control: the commands the plan implies (acceleration reaching the first
    waypoint from the logged speed, pure-pursuit steering onto it), within the contract's ranges.
    """
    model = config.model_for(drive["vehicle_id"][0].as_py()) if drive.num_rows else None
    if model is None:
        return drive
    out = _hook(config.runner)(model, drive)
    if abs(out["dt_s"] - plan_dt_s) > 1e-9:
        raise ValueError(f"{model}: waypoints every {out['dt_s']} s, the fleet logs plans every {plan_dt_s} s")
    traj = np.asarray(out["traj"], np.float32)[:, :plan_waypoints]
    n, k = traj.shape[:2]
    x1, y1 = traj[:, 0, 0].astype(np.float64), traj[:, 0, 1].astype(np.float64)
    v = drive["ego_speed"].to_numpy().astype(np.float64)
    accel = np.clip(2.0 * (x1 - v * plan_dt_s) / plan_dt_s**2, -_ACCEL_LIMIT, _ACCEL_LIMIT)
    curvature = 2.0 * y1 / np.maximum(x1 * x1 + y1 * y1, 1e-6)
    steer = np.clip(np.arctan(config.wheelbase_m * curvature), -_STEER_LIMIT, _STEER_LIMIT)
    counts = np.full(n, k, np.int64)
    maneuver = pa.DictionaryArray.from_arrays(pa.array(np.asarray(out["maneuver"]).astype(np.int8)),
                                              pa.array(ENUMS["maneuver"][1]))
    cols = {"plan_x": _lists(counts, traj[..., 0].ravel()), "plan_y": _lists(counts, traj[..., 1].ravel()),
            "plan_dt_s": pa.array(np.full(n, plan_dt_s, np.float32)), "maneuver": maneuver,
            "control_steer": pa.array(steer.astype(np.float32)), "control_accel": pa.array(accel.astype(np.float32)),
            "decision_model": pa.array([out["name"]] * n, pa.string()),
            "decision_model_version": pa.array([out["version"]] * n, pa.string())}
    table = pa.Table.from_arrays([cols[f.name] if f.name in cols else drive[f.name] for f in FRAME_SCHEMA],
                                 schema=FRAME_SCHEMA)
    validate(arrow_to_frames(table))  # what the car logs obeys the contract like any vehicle's frames
    return table
