"""A model registry on disk, safe against crashes and concurrent writers on one machine.

Layout:

    <registry>/index.json                       every version of every model: status, hashes, lineage, metrics
    <registry>/<name>/<version>/model.onnx
    <registry>/<name>/<version>/spec.json       shadow.spec.ModelSpec, with the sha256 of model.onnx

A version is immutable once registered: its files are written into a hidden temporary directory, fsynced and renamed
into place, and only then entered into the index (itself replaced atomically under an exclusive lock). A crash leaves
either no trace in the index or a complete version. Status moves candidate -> promoted | rejected; promoting a
version retires the previously promoted version of the same name.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field

from ingest.lake import fsync_dir, write_json_atomic
from ingest.versions import check_version
from shadow.spec import MODEL_FILE, SPEC_FILE, read_spec, sha256_file, write_spec

log = logging.getLogger(__name__)

INDEX_FILE = "index.json"
INDEX_FORMAT_VERSION = 1
Status = Literal["candidate", "promoted", "rejected", "retired"]


class ModelEntry(BaseModel):
    """One registered model version."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="model name")
    version: str = Field(description="version, unique within the name")
    status: Status = Field("candidate", description="candidate | promoted | rejected | retired")
    sha256: str = Field(description="sha256 of model.onnx")
    spec_sha256: str = Field(description="sha256 of spec.json")
    size_bytes: int = Field(description="size of model.onnx")
    precision: str = Field(description="from the spec: fp32 | fp16 | int8")
    featurizer_version: str = Field(description="from the spec")
    parents: list[str] = Field(default_factory=list, description='lineage: "name:version" of the models it came from')
    recipe: str = Field("", description="what produced it, e.g. retrain.recipes.student")
    dataset_sha256: str = Field("", description="hash of the training data")
    metrics: dict[str, float] = Field(default_factory=dict, description="measured figures at registration")
    created_at: float = Field(description="unix time of registration")
    status_changed_at: float = Field(description="unix time of the last status change")
    note: str = Field("", description="why the status was last changed")

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"


class Registry:
    """The registry rooted at `root` (created on first write)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # ------------------------------------------------------------------------------------------------ index plumbing

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict]:
        """Exclusive lock, the index loaded; the dict yielded is written back atomically when the block succeeds."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                index = self._read_index()
                yield index
                self._write_index(index)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read_index(self) -> dict:
        path = self.root / INDEX_FILE
        if not path.exists():
            return {"format_version": INDEX_FORMAT_VERSION, "models": {}}
        index = json.loads(path.read_text())
        check_version(path, "registry index", index.get("format_version"), INDEX_FORMAT_VERSION)
        return index

    def _write_index(self, index: dict) -> None:
        write_json_atomic(self.root / INDEX_FILE, index, indent=2)

    def version_dir(self, name: str, version: str) -> Path:
        return self.root / name / version

    # ------------------------------------------------------------------------------------------------------- writes

    def register(self, name: str, version: str, source: Path, parents: list[str] | None = None, recipe: str = "",
                 dataset_sha256: str = "", metrics: dict[str, float] | None = None) -> ModelEntry:
        """Copy a model (a directory with model.onnx + spec.json, or the .onnx path) in as `name:version`.

        The spec is rewritten with this name and version. Registering the same file again under the same version
        returns the existing entry; a different file under an existing version is refused (versions are immutable).
        """
        _check_name(name)
        _check_name(version)
        src_model = Path(source) / MODEL_FILE if Path(source).is_dir() else Path(source)
        spec = read_spec(src_model, verify=True)
        digest = spec.sha256
        with self._locked() as index:
            existing = index["models"].get(name, {}).get(version)
            if existing is not None:
                if existing["sha256"] != digest:
                    raise ValueError(f"{name}:{version} is already registered with another file")
                return ModelEntry.model_validate(existing)
            for p in parents or []:
                pn, _, pv = p.partition(":")
                if pv not in index["models"].get(pn, {}):
                    raise KeyError(f"parent {p} is not in the registry")
            final = self.version_dir(name, version)
            tmp = final.parent / f".{version}.{uuid.uuid4().hex[:8]}.tmp"
            tmp.mkdir(parents=True)
            try:
                shutil.copyfile(src_model, tmp / MODEL_FILE)
                _fsync_file(tmp / MODEL_FILE)
                spec.name, spec.version = name, version
                write_spec(spec, tmp / MODEL_FILE)
                if final.exists():  # left by a crash between rename and index update; it is not in the index
                    shutil.rmtree(final)
                os.rename(tmp, final)
                fsync_dir(final.parent)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp)
            now = time.time()
            entry = ModelEntry(name=name, version=version, sha256=digest, spec_sha256=sha256_file(final / SPEC_FILE),
                               size_bytes=spec.size_bytes, precision=spec.precision,
                               featurizer_version=spec.featurizer_version, parents=list(parents or []),
                               recipe=recipe, dataset_sha256=dataset_sha256, metrics=dict(metrics or {}),
                               created_at=now, status_changed_at=now)
            index["models"].setdefault(name, {})[version] = entry.model_dump()
        log.info("registered %s (%d bytes, sha256 %s)", entry.ref, entry.size_bytes, digest[:12])
        return entry

    def _set_status(self, name: str, version: str, status: Status, note: str) -> ModelEntry:
        with self._locked() as index:
            versions = index["models"].get(name, {})
            if version not in versions:
                raise KeyError(f"{name}:{version} is not registered")
            now = time.time()
            if status == "promoted":
                for v, e in versions.items():
                    if e["status"] == "promoted" and v != version:
                        e.update(status="retired", status_changed_at=now, note=f"superseded by {name}:{version}")
            versions[version].update(status=status, status_changed_at=now, note=note)
            return ModelEntry.model_validate(versions[version])

    def promote(self, name: str, version: str, note: str = "") -> ModelEntry:
        """Make `name:version` the promoted one (after verifying its files); the previous one is retired."""
        self.get(name, version, verify=True)
        return self._set_status(name, version, "promoted", note)

    def reject(self, name: str, version: str, note: str = "") -> ModelEntry:
        return self._set_status(name, version, "rejected", note)

    # -------------------------------------------------------------------------------------------------------- reads

    def list(self, name: str | None = None) -> list[ModelEntry]:
        """Entries of one model or of all, by name then registration time."""
        models = self._read_index()["models"]
        entries = [ModelEntry.model_validate(e) for n, vs in models.items() if name in (None, n) for e in vs.values()]
        return sorted(entries, key=lambda e: (e.name, e.created_at, e.version))

    def get(self, name: str, version: str | None = None, verify: bool = True) -> ModelEntry:
        """One entry: `version`, else the promoted one, else the latest. With `verify`, the files' hashes are checked."""
        entries = self.list(name)
        if not entries:
            raise KeyError(f"no model {name!r} in {self.root}")
        if version is None:
            promoted = [e for e in entries if e.status == "promoted"]
            entry = promoted[-1] if promoted else entries[-1]
        else:
            found = [e for e in entries if e.version == version]
            if not found:
                raise KeyError(f"{name}:{version} is not registered")
            entry = found[0]
        if verify:
            d = self.version_dir(entry.name, entry.version)
            for file, want in ((MODEL_FILE, entry.sha256), (SPEC_FILE, entry.spec_sha256)):
                got = sha256_file(d / file)
                if got != want:
                    raise ValueError(f"{entry.ref}: {file} has sha256 {got}, the index says {want}")
        return entry

    def model_path(self, name: str, version: str | None = None, verify: bool = True) -> Path:
        """Path of model.onnx of a version (resolved like `get`)."""
        e = self.get(name, version, verify)
        return self.version_dir(e.name, e.version) / MODEL_FILE

    def lineage(self, name: str, version: str) -> list[ModelEntry]:
        """The entry and all its ancestors, breadth first."""
        out, todo, seen = [], [f"{name}:{version}"], set()
        while todo:
            ref = todo.pop(0)
            if ref in seen:
                continue
            seen.add(ref)
            n, _, v = ref.partition(":")
            e = self.get(n, v, verify=False)
            out.append(e)
            todo.extend(e.parents)
        return out


def _check_name(s: str) -> None:
    if not s or "/" in s or s.startswith(".") or ":" in s or s != s.strip() or len(s) > 128:
        raise ValueError(f"{s!r} is not a valid registry name or version (no '/', ':', leading '.', spaces)")


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())

