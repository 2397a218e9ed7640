"""Regenerate the Python stubs from proto/ (the one documented command): the vehicle upload's into ingest/wire/, the
retraining control service's into retrain/jobs/wire/.

    python proto/generate.py          # write the stubs
    python proto/generate.py --check  # exit 1 when the checked-in stubs differ from a fresh generation
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
# each proto file and the package directory its stubs go to
OUTPUTS = {"flywheel/v1/drive.proto": ROOT / "ingest" / "wire",
           "flywheel/v1/control.proto": ROOT / "retrain" / "jobs" / "wire"}
INIT = '"""Generated protobuf and gRPC stubs; regenerate with `python proto/generate.py`."""\n'


def generate(proto: str, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).parent / "_proto"
    args = ["protoc", f"-I{PROTO_DIR}", f"-I{include}", f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}"]
    if protoc.main(args + [str(PROTO_DIR / proto)]) != 0:
        raise SystemExit("protoc failed")
    # protoc writes flywheel/v1/drive_pb2.py; flatten and make the gRPC stub import its sibling.
    stem = Path(proto).stem + "_pb2"
    for generated in (out / "flywheel" / "v1").glob("*"):
        text = generated.read_text().replace(f"from flywheel.v1 import {stem} as", f"from . import {stem} as")
        (out / generated.name).write_text(text)
    shutil.rmtree(out / "flywheel")
    (out / "__init__.py").write_text(INIT)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    if not args.check:
        for proto, out in OUTPUTS.items():
            generate(proto, out)
        return 0
    stale = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (proto, out) in enumerate(OUTPUTS.items()):
            fresh = Path(tmp) / str(i)
            generate(proto, fresh)
            names = sorted(p.name for p in fresh.iterdir() if p.is_file())
            match, mismatch, errors = filecmp.cmpfiles(fresh, out, names, shallow=False)
            stale += [str((out / n).relative_to(ROOT)) for n in mismatch + errors]
    if stale:
        print(f"stale generated stubs: {stale}; run python proto/generate.py")
        return 1
    print("generated stubs are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
