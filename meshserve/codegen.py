"""Regenerate the committed stubs (meshserve/v1/, meshserve/oip/) from protos/: `python -m meshserve.codegen`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "protos"
PROTO_PACKAGE = Path("meshserve") / "v1"
# Open Inference Protocol v2: proto package `inference` (what its clients call), stubs in meshserve.oip
OIP_PACKAGE = Path("meshserve") / "oip"
PROTO_PACKAGES = (PROTO_PACKAGE, OIP_PACKAGE)


def proto_files(proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Every .proto of the contract, relative to the proto root (so imports read meshserve.v1.*)."""
    return sorted(p.relative_to(proto_root) for pkg in PROTO_PACKAGES for p in (proto_root / pkg).glob("*.proto"))


def generate(out_root: Path, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Write *_pb2.py, *_pb2.pyi, *_pb2_grpc.py beside each proto's path under out_root; return them."""
    # grpcio-tools is a dev dependency: only codegen needs it.
    import grpc_tools
    from grpc_tools import protoc

    files = proto_files(proto_root)
    if not files:
        raise FileNotFoundError(f"no .proto files under {proto_root / PROTO_PACKAGE}")
    for pkg in PROTO_PACKAGES:
        (out_root / pkg).mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    argv = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *(str(f) for f in files),
    ]
    code = protoc.main(argv)
    if code != 0:
        raise RuntimeError(f"protoc failed with exit code {code}: {' '.join(argv)}")
    return generated_files(out_root)


def generated_files(out_root: Path) -> list[Path]:
    """The generated stubs under out_root/meshserve/v1/ and out_root/meshserve/oip/, sorted."""
    suffixes = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
    return sorted(p for pkg in PROTO_PACKAGES for p in (out_root / pkg).iterdir() if p.name.endswith(suffixes))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--out", type=Path, default=REPO_ROOT, help="output root (default: the repository root)"
    )
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path.relative_to(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
