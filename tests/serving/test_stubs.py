"""The checked-in stubs are what protoc makes of the checked-in proto, and they import
without the version checks that would refuse older grpcio / protobuf runtimes."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from serving import generate_stubs
from serving.generated import engine_pb2


def test_stubs_describe_the_checked_in_proto():
    """Version-independent: the descriptor protoc builds now equals the one in the stubs."""
    pytest.importorskip("grpc_tools")
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.pb"
        assert protoc.main(["protoc", f"-I{generate_stubs.PROTO_ROOT}", f"--descriptor_set_out={out}",
                            generate_stubs.PROTO]) == 0
        fresh = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    for message in fresh.message_type:  # --descriptor_set_out adds json names the python stubs leave out
        _drop_json_names(message)
    checked_in = descriptor_pb2.FileDescriptorProto.FromString(engine_pb2.DESCRIPTOR.serialized_pb)
    assert fresh == checked_in, "stubs are stale: run python -m serving.generate_stubs"


def test_stub_files_are_byte_identical_with_the_same_tools():
    pytest.importorskip("grpc_tools")
    header = (generate_stubs.OUT / "engine_pb2.py").read_text().splitlines()[0]
    if f"grpcio-tools {generate_stubs.tools_version()})" not in header:
        pytest.skip(f"stubs were made with other grpcio-tools ({header}); the descriptor test covers them")
    assert generate_stubs.main(["--check"]) == 0, "stubs are stale: run python -m serving.generate_stubs"


def test_no_runtime_version_pins():
    pb2 = (generate_stubs.OUT / "engine_pb2.py").read_text()
    grpc_stub = (generate_stubs.OUT / "engine_pb2_grpc.py").read_text()
    assert "ValidateProtobufRuntimeVersion" not in pb2
    assert f"GRPC_GENERATED_VERSION = '{generate_stubs.MIN_GRPC_VERSION}'" in grpc_stub
    assert "from serving.generated import engine_pb2" in grpc_stub


def _drop_json_names(message) -> None:
    for field in message.field:
        field.ClearField("json_name")
    for nested in message.nested_type:
        _drop_json_names(nested)
