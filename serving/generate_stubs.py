"""Regenerate the checked-in Python stubs from serving/proto/jaxengine/v1/engine.proto.

    python -m serving.generate_stubs           # rewrite serving/generated/
    python -m serving.generate_stubs --check   # exit 1 if the checked-in stubs are stale

Needs `grpcio-tools` (a test extra). protoc's output is post-processed in three ways so the
stubs work on every machine we run on (grpcio 1.84 + an older protobuf on the GPU hosts,
while the stubs may be generated with newer tools):

- the protobuf gencode/runtime version check is removed (it refuses any runtime older than
  the protoc that generated the file, although the descriptor-building API it uses has been
  stable since protobuf 4); pyproject pins `protobuf>=5.29`;
- the grpc stub's minimum-version check is lowered to `grpcio>=MIN_GRPC_VERSION` (the
  pyproject pin); the stub only uses `_registered_method`, present since grpcio 1.63;
- the absolute import `from jaxengine.v1 import engine_pb2` (which would collide with our
  `jaxengine` package) becomes `from serving.generated import engine_pb2`.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PROTO_ROOT = ROOT / "proto"
PROTO = "jaxengine/v1/engine.proto"
OUT = ROOT / "generated"
FILES = ("engine_pb2.py", "engine_pb2_grpc.py", "engine_pb2.pyi")
MIN_GRPC_VERSION = "1.70.0"

_RUNTIME_CHECK = re.compile(
    r"from google\.protobuf import runtime_version as _runtime_version\n|"
    r"_runtime_version\.ValidateProtobufRuntimeVersion\(\n(?:.*\n)*?\)\n"
)


def tools_version() -> str:
    return metadata.version("grpcio-tools")


def _postprocess(name: str, text: str) -> str:
    header = f"# Generated from serving/proto/{PROTO} by serving/generate_stubs.py (grpcio-tools {tools_version()}).\n"
    if name == "engine_pb2.py":
        text, n = _RUNTIME_CHECK.subn("", text)
        if n not in (0, 2):
            raise RuntimeError("unexpected protobuf gencode layout: update serving/generate_stubs.py")
        text = text.replace("# NO CHECKED-IN PROTOBUF GENCODE\n", "")
    elif name == "engine_pb2_grpc.py":
        text = re.sub(r"GRPC_GENERATED_VERSION = '[^']*'", f"GRPC_GENERATED_VERSION = '{MIN_GRPC_VERSION}'", text)
        text = text.replace("from jaxengine.v1 import engine_pb2", "from serving.generated import engine_pb2")
    return header + text


def generate() -> dict[str, str]:
    """Run protoc; return {file name: post-processed text}."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        args = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"--python_out={tmp}", f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}", PROTO]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTO_ROOT / PROTO}")
        out = Path(tmp) / "jaxengine" / "v1"
        return {name: _postprocess(name, (out / name).read_text()) for name in FILES}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 if stale")
    args = p.parse_args(argv)
    files = generate()
    if args.check:
        stale = [n for n, t in files.items() if not (OUT / n).is_file() or (OUT / n).read_text() != t]
        if stale:
            print(f"stale: {', '.join(stale)}; run python -m serving.generate_stubs", file=sys.stderr)
            return 1
        return 0
    OUT.mkdir(exist_ok=True)
    for name, text in files.items():
        (OUT / name).write_text(text)
    print(f"wrote {', '.join(files)} to {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
