"""Regenerate the Python stubs from proto/ into ingest/wire/ (the one documented command).

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
OUT_DIR = ROOT / "ingest" / "wire"
PROTOS = ["flywheel/v1/drive.proto", "flywheel/v1/control.proto"]
INIT = '"""Generated protobuf and gRPC stubs; regenerate with `python proto/generate.py`."""\n'


def generate(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).parent / "_proto"
    args = ["protoc", f"-I{PROTO_DIR}", f"-I{include}", f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}"]
    if protoc.main(args + [str(PROTO_DIR / p) for p in PROTOS]) != 0:
        raise SystemExit("protoc failed")
    # protoc writes flywheel/v1/drive_pb2.py; flatten and make the gRPC stub import its sibling.
    for generated in (out / "flywheel" / "v1").glob("*"):
        text = generated.read_text()
        for stem in (Path(p).stem + "_pb2" for p in PROTOS):
            text = text.replace(f"from flywheel.v1 import {stem} as", f"from . import {stem} as")
        (out / generated.name).write_text(text)
    shutil.rmtree(out / "flywheel")
    (out / "__init__.py").write_text(INIT)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    if not args.check:
        generate(OUT_DIR)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "wire"
        generate(fresh)
        names = sorted(p.name for p in fresh.iterdir() if p.is_file())
        match, mismatch, errors = filecmp.cmpfiles(fresh, OUT_DIR, names, shallow=False)
        if mismatch or errors:
            print(f"stale generated stubs in {OUT_DIR.relative_to(ROOT)}: {mismatch + errors}; run python proto/generate.py")
            return 1
    print("generated stubs are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
