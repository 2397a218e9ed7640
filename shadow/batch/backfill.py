"""Backfill replay on Ray: the batch replay of the lake's frames files for a model pair, spread over Ray actors.

    report = backfill("data/lake", "models/teacher", "models/student", ReplayConfig(), BackfillConfig())

By default on a local Ray started in this process (and shut down after); with `BackfillConfig.address` on a Ray
cluster the user already runs (`ray://head:10001`, or `auto` on one of its nodes), whose workers have this package
installed and reach the lake at the same path or URI (a shared filesystem or object storage).

The work is cut into shares: runs of `files_per_task` consecutive frames files of one Kafka partition. Ray actors
(as many as the cluster has room for, `task_cpus` each) load the models once and replay one share after another
with the batch replayer itself (`shadow.batch.replay.replay` restricted to the share's files, `ReplayConfig.files`;
the other live files of the partition still give context).
So the files a backfill writes, their names (from the frames' Kafka offsets) and rows are exactly the batch
replayer's: a backfill, a batch replay and the streaming workers skip each other's offsets, and a killed backfill
resumes where its tasks stopped: the rerun replays only the offsets no `divergences` file covers yet, and a unit
half-written when it died is written again under the same names. Files the pair has replayed already are not
even sent to a task.

Why actors over shares and not Ray Data's Parquet reader: a frame's features and metrics need its drive's frames before and
after it (history, logged future, the rest of its scenario window), and which file holds them comes from the
footers of the whole partition; a replay unit is the natural piece of work, and the output names must be those of
the batch replayer. Actors, because loading the three sessions (teacher, student, noise-floor teacher) costs
seconds, as much as replaying a few thousand frames.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Callable

from pydantic import BaseModel, ConfigDict, Field

from ingest.lake import LakeFile, live_files, model_id, pair_id
from shadow.config import BackfillConfig, ExecutionConfig, ReplayConfig, configure_execution, default_execution
from shadow.outputs import Coverage
from shadow.spec import model_file, read_spec

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


class BackfillError(RuntimeError):
    """A backfill task failed; what the other tasks wrote stays and a rerun resumes."""


class BackfillReport(BaseModel):
    """What a backfill did: the sum of its tasks' replay reports."""

    model_config = ConfigDict(extra="forbid")

    pair: str
    ray_address: str = Field(description="the Ray cluster it ran on (local: started in this process)")
    ray_cpus: float = Field(description="CPUs of the Ray cluster")
    tasks: int = Field(0, description="shares of the lake (runs of frames files of one partition) replayed")
    actors: int = Field(0, description="Ray actors that replayed them, each with the models loaded once")
    files_covered: int = Field(0, description="frames files the pair had replayed already: no task")
    frames_replayed: int = 0
    units: int = 0
    units_deferred: int = 0
    files_written: int = 0
    windows: int = 0
    seconds: float = 0.0
    startup_seconds: float = Field(0.0, description="until every actor had its models loaded (Ray start included "
                                   "when the backfill started it)")
    frames_per_s: float = 0.0
    frames_per_s_after_startup: float = 0.0
    execution: dict = Field(default_factory=dict, description="providers each model ran on, from a task")
    numerics: dict = Field(default_factory=dict, description="integer kernel and host features, from a task")


def plan(lake: Path, teacher: Path, student: Path, config: ReplayConfig, files_per_task: int
         ) -> tuple[str, list[tuple[str, int, list[str]]], int]:
    """(pair id, tasks as (topic, partition, frames file names), frames files already covered by the pair)."""
    ids = [model_id(s.name, s.version) for s in (read_spec(model_file(Path(teacher))),
                                                  read_spec(model_file(Path(student))))]
    pair = pair_id(*ids)
    coverage = Coverage(Path(lake))
    parts: dict[tuple[str, int], list[LakeFile]] = {}
    for f in live_files(Path(lake), "frames", config.topic):
        if config.partitions is None or f.partition in config.partitions:
            parts.setdefault((f.topic, f.partition), []).append(f)
    tasks, covered = [], 0
    for (topic, partition), files in sorted(parts.items()):
        done = coverage.get("divergences", "pair", pair, topic, partition)
        todo = []
        for f in sorted(files):
            if done.missing(f.first, f.last):
                todo.append(f.path.name)
            else:
                covered += 1
        tasks += [(topic, partition, todo[i:i + files_per_task]) for i in range(0, len(todo), files_per_task)]
    return pair, tasks, covered


class Replayer:
    """A Ray actor: the models loaded once (`shadow.compute.Shadow`), then batch replays of one share of the lake
    after another. Each process loads the models once, not once per share."""

    def __init__(self, teacher: str, student: str, config_json: str, execution_json: str) -> None:
        from shadow.compute import Shadow

        configure_execution(ExecutionConfig.model_validate_json(execution_json))
        self.config = ReplayConfig.model_validate_json(config_json)
        self.shadow = Shadow(Path(teacher), Path(student), self.config)

    def ready(self) -> bool:
        return True

    def replay(self, lake: str, topic: str, partition: int, files: list[str]) -> dict:
        from shadow.batch.replay import replay

        cfg = self.config.model_copy(update={"topic": topic, "partitions": [partition], "files": files})
        return replay(Path(lake), None, None, cfg, shadow=self.shadow).model_dump(mode="json")


def backfill(lake: Path, teacher: Path, student: Path, config: ReplayConfig | None = None,
             backfill_config: BackfillConfig | None = None, progress: Progress | None = None) -> BackfillReport:
    """Replay every frame of the lake the pair has not replayed yet, on Ray; see the module docstring.

    Shares of the lake (`files_per_task` frames files of one partition) go to Ray actors, as many as the cluster
    has room for (`task_cpus` each, at most one per share), each with the models loaded once; `progress(shares
    done, shares)` after each. A Ray already initialised in this process is used as it is; otherwise one is
    started (local, or connected to `address`) and shut down at the end.
    """
    import ray

    config = config or ReplayConfig()
    bf = backfill_config or BackfillConfig()
    t0 = time.perf_counter()
    pair, tasks, covered = plan(lake, teacher, student, config, bf.files_per_task)
    threads = max(1, math.ceil(bf.task_cpus))
    # one batch at a time on the actor's CPUs: Ray runs as many actors as the cluster has room for side by side
    runtime = config.runtime.model_copy(update={"intra_op_threads": threads, "workers": 1})
    if not tasks:  # everything replayed already: no cluster needed
        report = BackfillReport(pair=pair, ray_address=bf.address or "local", ray_cpus=0.0, files_covered=covered,
                                seconds=time.perf_counter() - t0)
        log.info("backfill of %s: nothing to do (%d frames files already covered)", pair, covered)
        return report
    started = not ray.is_initialized()
    if started:
        if bf.address:
            ray.init(address=bf.address, log_to_driver=False)
        else:
            ray.init(num_cpus=bf.num_cpus, include_dashboard=False, log_to_driver=False)
    actors = []
    try:
        cpus = float(ray.cluster_resources().get("CPU", 0.0))
        report = BackfillReport(pair=pair, ray_address=bf.address or "local", ray_cpus=cpus, tasks=len(tasks),
                                files_covered=covered)
        n = min(len(tasks), bf.actors or max(1, int(cpus // bf.task_cpus)))
        actor_cls = ray.remote(num_cpus=bf.task_cpus, max_restarts=0)(Replayer)
        cfg_json = config.model_copy(update={"runtime": runtime}).model_dump_json()
        actors = [actor_cls.remote(str(teacher), str(student), cfg_json, default_execution().model_dump_json())
                  for _ in range(n)]
        ray.get([a.ready.remote() for a in actors])  # models loaded: from here on the shares replay
        report.startup_seconds = time.perf_counter() - t0
        todo = list(tasks)
        running = {}
        for a in actors:
            if todo:
                topic, partition, names = todo.pop(0)
                running[a.replay.remote(str(lake), topic, partition, names)] = a
        done = 0
        if progress:
            progress(0, len(tasks))
        while running:
            ready, _ = ray.wait(list(running), num_returns=1)
            actor = running.pop(ready[0])
            try:
                r = ray.get(ready[0])
            except Exception as exc:
                raise BackfillError(f"a backfill share failed ({exc}); the files written stay, rerun to resume"
                                    ) from exc
            if todo:
                topic, partition, names = todo.pop(0)
                running[actor.replay.remote(str(lake), topic, partition, names)] = actor
            for k in ("frames_replayed", "units", "units_deferred", "files_written", "windows"):
                setattr(report, k, getattr(report, k) + r[k])
            report.execution = report.execution or r["execution"]
            report.numerics = report.numerics or r["numerics"]
            done += 1
            if progress:
                progress(done, len(tasks))
        report.actors = n
    finally:
        for a in actors:
            ray.kill(a)
        if started:
            ray.shutdown()
    report.seconds = time.perf_counter() - t0
    report.frames_per_s = report.frames_replayed / report.seconds if report.seconds else 0.0
    busy = report.seconds - report.startup_seconds
    report.frames_per_s_after_startup = report.frames_replayed / busy if busy > 0 else 0.0
    log.info("backfill of %s: %d frames in %d shares on %d actors (%s Ray, %d files already covered), %.0f frames/s",
             pair, report.frames_replayed, report.tasks, report.actors, report.ray_address, covered,
             report.frames_per_s)
    return report
