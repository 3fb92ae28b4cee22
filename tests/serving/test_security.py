"""API keys (none / wrong / right, both metadata forms; health stays open) and TLS with a
self-signed certificate made in the test."""

from __future__ import annotations

import shutil
import subprocess

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.client import Client
from serving.generated import engine_pb2 as pb
from serving.generated import engine_pb2_grpc
from serving.server import BackgroundServer, ServeOptions
from tests.serving.conftest import collect, request

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def auth_server(async_engine):
    srv = BackgroundServer(async_engine, ServeOptions(port=0, api_keys=(KEY, "second-key")))
    yield srv
    srv.close()


@pytest.mark.parametrize("metadata,code", [
    ((), grpc.StatusCode.UNAUTHENTICATED),
    ((("authorization", "Bearer wrong"),), grpc.StatusCode.UNAUTHENTICATED),
    ((("x-api-key", KEY[:-1]),), grpc.StatusCode.UNAUTHENTICATED),
    ((("authorization", f"Basic {KEY}"),), grpc.StatusCode.UNAUTHENTICATED),
    ((("authorization", f"Bearer {KEY}"),), grpc.StatusCode.OK),
    ((("x-api-key", KEY),), grpc.StatusCode.OK),
    ((("authorization", "Bearer second-key"),), grpc.StatusCode.OK),
], ids=["none", "wrong-bearer", "wrong-x-api-key", "not-bearer", "bearer", "x-api-key", "second-key"])
def test_api_key(auth_server, metadata, code):
    with grpc.insecure_channel(auth_server.address) as ch:
        stub = engine_pb2_grpc.EngineServiceStub(ch)
        for rpc in (lambda: collect(stub, request("Hello", max_tokens=3), metadata=metadata, timeout=30),
                    lambda: stub.Tokenize(pb.TokenizeRequest(text="Hello"), metadata=metadata, timeout=30)):
            if code == grpc.StatusCode.OK:
                rpc()
            else:
                with pytest.raises(grpc.RpcError) as e:
                    rpc()
                assert e.value.code() == code
                assert "API key" in e.value.details()
        # Health checks need no key (load balancers probe without one).
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING


def test_client_sends_the_key(auth_server):
    with Client(auth_server.address, api_key=KEY, timeout=30) as c:
        assert c.generate("Hello", max_tokens=3).finish_reason == "length"


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl CLI to make a certificate")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def test_tls(async_engine, self_signed):
    cert, key = self_signed
    srv = BackgroundServer(async_engine, ServeOptions(port=0, tls_cert=str(cert), tls_key=str(key)))
    try:
        with Client(f"localhost:{srv.port}", root_certificates=cert.read_bytes(), timeout=30) as c:
            assert c.generate("Hello", max_tokens=3).finish_reason == "length"
            assert c.health() == "SERVING"
        # A client that does not trust the certificate cannot connect.
        with Client(f"localhost:{srv.port}", tls=True, timeout=5) as c:
            with pytest.raises(grpc.RpcError) as e:
                c.generate("Hello", max_tokens=3)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        # Plaintext to a TLS port fails too.
        with Client(f"127.0.0.1:{srv.port}", timeout=5) as c:
            with pytest.raises(grpc.RpcError) as e:
                c.generate("Hello", max_tokens=3)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        srv.close()


def test_tls_options_go_together():
    with pytest.raises(ValueError, match="--tls-cert and --tls-key"):
        ServeOptions(tls_cert="cert.pem")
