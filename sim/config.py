"""Typed configuration of the reference fleet: traffic scenarios, long-tail conditions and on-board perception.

Every number that shapes a simulated drive lives here with its default and unit. `drive_hash` fingerprints the
fields that change a drive's content, so a drive already on disk for the same fingerprint is reused and growing the
fleet (more vehicles or drives) or changing the worker count re-simulates nothing.
"""

from __future__ import annotations

import hashlib
import json

from pydantic import BaseModel, ConfigDict, Field, model_validator

from sim.onboard import OnboardConfig

# Bump when the generator changes what a drive contains for the same configuration: it invalidates cached drives.
GENERATOR_VERSION = 2  # 2: the on-board decision is the deployed student's (sim.onboard), the expert's in the truth

SCENARIOS: tuple[str, ...] = ("highway", "merge", "roundabout", "intersection")
CONDITIONS: tuple[str, ...] = ("nominal", "night", "rain", "glare")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ScenarioMix(_Model):
    """Relative weights of the highway-env scenarios a drive is drawn from (normalised; 0 disables one)."""

    highway: float = Field(0.4, ge=0, description="weight of highway-v0: multi-lane highway with dense traffic")
    merge: float = Field(0.2, ge=0, description="weight of merge-v0: highway with an on-ramp merging into it")
    roundabout: float = Field(0.2, ge=0, description="weight of roundabout-v0: two-lane roundabout, random exit")
    intersection: float = Field(0.2, ge=0, description="weight of intersection-v0: unsignalised four-way crossing")

    @model_validator(mode="after")
    def _some_weight(self) -> "ScenarioMix":
        if sum(self.weights()) <= 0:
            raise ValueError("scenario mix: at least one scenario needs a positive weight")
        return self

    def weights(self) -> list[float]:
        """Weights in the order of `SCENARIOS`."""
        return [getattr(self, s) for s in SCENARIOS]


class ConditionRates(_Model):
    """Probability that a drive segment is driven under each degraded condition; the rest is nominal (day, clear).

    The defaults are long-tail rates: a few percent of driving happens at night, in rain, or into glare at a tunnel
    exit. The conditions are exclusive per segment, so each one can be measured on its own.
    """

    night: float = Field(0.04, ge=0, le=1, description="share of segments at night (lighting=night)")
    rain: float = Field(0.04, ge=0, le=1, description="share of segments in rain (weather=rain)")
    glare: float = Field(0.03, ge=0, le=1, description="share of segments into glare at a tunnel exit "
                         "(lighting=glare, tag 'tunnel_exit')")

    @model_validator(mode="after")
    def _at_most_one(self) -> "ConditionRates":
        if self.night + self.rain + self.glare > 1.0 + 1e-9:
            raise ValueError(f"condition rates sum to {self.night + self.rain + self.glare:.3f} > 1")
        return self

    @classmethod
    def only(cls, condition: str) -> "ConditionRates":
        """Every segment under `condition` (one of `CONDITIONS`; "nominal" turns all degradation off)."""
        if condition not in CONDITIONS:
            raise ValueError(f"unknown condition {condition!r}; known: {list(CONDITIONS)}")
        return cls(**{c: float(c == condition) for c in CONDITIONS[1:]})

    def probabilities(self) -> list[float]:
        """Probabilities in the order of `CONDITIONS` (nominal first, the remainder)."""
        rest = max(0.0, 1.0 - self.night - self.rain - self.glare)
        return [rest, self.night, self.rain, self.glare]


class PerceptionParams(_Model):
    """How on-board perception reports the true agents under one condition.

    A true agent is reported from the state it had `latency_frames` frames ago (stale tracks), only if it was within
    `max_range_m` of the ego then, and is missed with probability `drop_prob` per frame; reported positions,
    velocities and headings carry zero-mean Gaussian noise. Spurious detections appear at `false_positive_rate` per
    frame (Poisson) within range, with low confidence. Confidence falls with distance and is scaled by
    `confidence_scale`.
    """

    position_noise_std_m: float = Field(0.15, ge=0, le=5, description="std of the reported x and y error [m]")
    velocity_noise_std_mps: float = Field(0.2, ge=0, le=10, description="std of the reported vx and vy error [m/s]")
    heading_noise_std_rad: float = Field(0.02, ge=0, le=1, description="std of the reported heading error [rad]")
    drop_prob: float = Field(0.02, ge=0, le=1, description="probability that an in-range agent is missed in a frame")
    latency_frames: int = Field(0, ge=0, le=20, description="age of the reported agent states [frames]")
    max_range_m: float = Field(150.0, gt=0, le=500, description="agents farther from the ego are not reported [m]")
    false_positive_rate: float = Field(0.02, ge=0, le=10, description="mean spurious detections per frame")
    confidence_scale: float = Field(1.0, gt=0, le=1, description="multiplies every reported confidence")


def _params(**kw) -> PerceptionParams:
    return PerceptionParams(**kw)


class PerceptionConditions(_Model):
    """Perception degradation per condition. Defaults follow the usual ordering of camera-led stacks: glare at a
    tunnel exit is worst (saturated imager), night and rain shorten range, add latency and spurious returns."""

    nominal: PerceptionParams = Field(default_factory=PerceptionParams, description="day, clear weather")
    night: PerceptionParams = Field(default_factory=lambda: _params(
        position_noise_std_m=0.4, velocity_noise_std_mps=0.5, heading_noise_std_rad=0.05, drop_prob=0.15,
        latency_frames=1, max_range_m=70.0, false_positive_rate=0.1, confidence_scale=0.75),
        description="night: short headlight range, more misses")
    rain: PerceptionParams = Field(default_factory=lambda: _params(
        position_noise_std_m=0.35, velocity_noise_std_mps=0.5, heading_noise_std_rad=0.05, drop_prob=0.12,
        latency_frames=1, max_range_m=90.0, false_positive_rate=0.2, confidence_scale=0.8),
        description="rain: spray ghosts (false positives), shorter range")
    glare: PerceptionParams = Field(default_factory=lambda: _params(
        position_noise_std_m=0.6, velocity_noise_std_mps=0.8, heading_noise_std_rad=0.08, drop_prob=0.35,
        latency_frames=2, max_range_m=45.0, false_positive_rate=0.3, confidence_scale=0.55),
        description="glare at a tunnel exit: saturated camera, many misses, stale tracks")

    def by_condition(self) -> list[PerceptionParams]:
        """Parameters in the order of `CONDITIONS`."""
        return [getattr(self, c) for c in CONDITIONS]


class FleetConfig(_Model):
    """The reference fleet: how many vehicles drive what, under which conditions, seen through which perception."""

    seed: int = Field(0, ge=0, lt=2**31, description="root seed; every drive is a pure function of it and its indices")
    vehicles: int = Field(4, ge=1, le=100_000, description="number of vehicles in the fleet (veh-0000, ...)")
    drives_per_vehicle: int = Field(3, ge=1, le=10_000, description="drives logged by each vehicle")
    drive_duration_s: float = Field(40.0, gt=0, le=3600, description="length of every drive [s]")
    frame_rate_hz: int = Field(10, ge=1, le=100, description="logged frames per second; one env step per frame")
    simulation_substeps: int = Field(1, ge=1, le=10, description="simulator integration steps per frame "
                                     "(simulation_frequency = frame_rate_hz * substeps)")
    scenario_mix: ScenarioMix = Field(default_factory=ScenarioMix, description="weights of the scenario types")
    condition_rates: ConditionRates = Field(default_factory=ConditionRates, description="long-tail condition rates")
    segment_s: float = Field(10.0, gt=0, le=3600, description="a condition holds for one segment of this length [s]")
    perception: PerceptionConditions = Field(default_factory=PerceptionConditions,
                                             description="perception degradation per condition")
    plan_waypoints: int = Field(8, ge=1, le=100, description="planned waypoints per frame (fewer at a drive's end)")
    plan_dt_s: float = Field(0.5, gt=0, le=5, description="spacing of the planned waypoints [s]; a whole number of "
                             "frames")
    lane_change_offset_m: float = Field(0.5, gt=0, le=4, description="a lane change is reported while the ego is "
                                        "farther than this from the centre of its target lane [m]")
    accel_threshold_mps2: float = Field(0.5, gt=0, le=10, description="commanded acceleration beyond which the "
                                        "maneuver is accelerate/decelerate [m/s^2]")
    sim_radius_m: float = Field(500.0, ge=100, le=10_000, description="traffic farther than this from the ego is "
                                "removed from the simulation (it cannot reach perception range within a drive; "
                                "keeps a step O(nearby vehicles^2)) [m]")
    truth_range_m: float = Field(200.0, gt=0, le=10_000, description="true agents within this distance of the ego "
                                 "are kept in the truth file [m]; must cover every perception range")
    stall_s: float = Field(20.0, gt=0, le=3600, description="a scene in which the ego stands still this long ends "
                            "(deadlocked junction) and the drive continues in a new scene [s]")
    workers: int = Field(2, ge=1, le=256, description="parallel simulator processes; 1 simulates in-process")
    onboard: OnboardConfig = Field(default_factory=OnboardConfig, description="the deployed model each vehicle runs "
                                   "in shadow mode; its decision is the logged on-board one (sim.onboard)")

    @model_validator(mode="after")
    def _consistent(self) -> "FleetConfig":
        for name in ("plan_dt_s", "drive_duration_s", "segment_s"):
            frames = getattr(self, name) * self.frame_rate_hz
            if abs(frames - round(frames)) > 1e-6 or round(frames) < 1:
                raise ValueError(f"{name}={getattr(self, name)} is not a whole number (>= 1) of frames at "
                                 f"{self.frame_rate_hz} Hz")
        far = max(p.max_range_m for p in self.perception.by_condition())
        if self.truth_range_m < far:
            raise ValueError(f"truth_range_m={self.truth_range_m} is shorter than the longest perception range {far}")
        if self.sim_radius_m < self.truth_range_m:
            raise ValueError(f"sim_radius_m={self.sim_radius_m} must be >= truth_range_m={self.truth_range_m}")
        return self

    @property
    def dt_s(self) -> float:
        return 1.0 / self.frame_rate_hz

    @property
    def frames_per_drive(self) -> int:
        return int(round(self.drive_duration_s * self.frame_rate_hz))

    @property
    def frames_per_segment(self) -> int:
        return int(round(self.segment_s * self.frame_rate_hz))

    @property
    def frames_per_waypoint(self) -> int:
        return int(round(self.plan_dt_s * self.frame_rate_hz))

    @property
    def total_drives(self) -> int:
        return self.vehicles * self.drives_per_vehicle

    def drive_hash(self) -> str:
        """Fingerprint of everything that shapes one drive's content (not fleet size, not workers)."""
        import highway_env  # the simulator's version shapes the drives too

        fields = self.model_dump(mode="json", exclude={"vehicles", "drives_per_vehicle", "workers", "onboard"})
        fields["onboard"] = self.onboard.fingerprint()  # the artifacts' content, not where they lie
        blob = json.dumps({"config": fields, "generator": GENERATOR_VERSION,
                           "highway_env": getattr(highway_env, "__version__", "?")}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

