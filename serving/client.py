"""Python clients for the jaxengine gRPC service: `Client` (blocking) and `AsyncClient`.

    from serving.client import Client
    with Client("127.0.0.1:50051") as c:
        print(c.generate("def fib(n):", max_tokens=32, temperature=0).text)
        for piece in c.stream_text("def fib(n):", max_tokens=32):
            print(piece, end="", flush=True)

Sampling keywords are the fields of `jaxengine.v1.SamplingParams` (vLLM's names).
`api_key` is sent as `authorization: Bearer KEY`; `root_certificates` (PEM bytes) or
`tls=True` (system roots) switch to TLS.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Iterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.generated import engine_pb2 as pb
from serving.generated import engine_pb2_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
FINISH_REASON_NAMES = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_ABORT: "abort"}


@dataclasses.dataclass
class Completion:
    index: int
    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[pb.PositionLogprobs] = dataclasses.field(default_factory=list)
    cumulative_logprob: float | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None


@dataclasses.dataclass
class GenerateResult:
    request_id: str
    completions: list[Completion]
    usage: pb.Usage | None = None
    timings: pb.Timings | None = None

    @property
    def text(self) -> str:
        return self.completions[0].text if self.completions else ""

    @property
    def token_ids(self) -> list[int]:
        return self.completions[0].token_ids if self.completions else []

    @property
    def finish_reason(self) -> str | None:
        return self.completions[0].finish_reason if self.completions else None

    def add(self, resp: pb.GenerateResponse) -> None:
        """Fold one streamed message in."""
        self.request_id = resp.request_id
        by_index = {c.index: c for c in self.completions}
        for d in resp.outputs:
            c = by_index.get(d.index)
            if c is None:
                c = by_index[d.index] = Completion(d.index)
                self.completions.append(c)
                self.completions.sort(key=lambda x: x.index)
            c.text += d.text
            c.token_ids += d.token_ids
            c.logprobs += d.logprobs
            if d.HasField("cumulative_logprob"):
                c.cumulative_logprob = d.cumulative_logprob
            if d.finish_reason:
                c.finish_reason = FINISH_REASON_NAMES[d.finish_reason]
                kind = d.WhichOneof("stop_reason")
                c.stop_reason = None if kind is None else getattr(d, kind)
        if resp.finished:
            self.usage, self.timings = resp.usage, resp.timings


def build_request(
    prompt: str | Sequence[int] | None = None,
    *,
    messages: Sequence[dict] | None = None,
    request_id: str = "",
    priority: int = 0,
    **sampling,
) -> pb.GenerateRequest:
    """A GenerateRequest from text, token ids, or chat `messages` ([{"role", "content"}])."""
    req = pb.GenerateRequest(request_id=request_id, priority=priority, sampling_params=pb.SamplingParams(**sampling))
    if messages is not None:
        if prompt is not None:
            raise ValueError("pass a prompt or messages, not both")
        req.chat.messages.extend(pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages)
    elif isinstance(prompt, str):
        req.text = prompt
    elif prompt is not None:
        req.token_ids.ids.extend(prompt)
    else:
        raise ValueError("pass a prompt (text or token ids) or messages")
    return req


def _channel_config(api_key: str | None, root_certificates: bytes | None, tls: bool):
    metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
    creds = grpc.ssl_channel_credentials(root_certificates) if (tls or root_certificates) else None
    return metadata, creds


class Client:
    def __init__(self, target: str = DEFAULT_TARGET, *, api_key: str | None = None,
                 root_certificates: bytes | None = None, tls: bool = False, timeout: float | None = None,
                 options: Sequence[tuple[str, object]] = ()):
        self._metadata, creds = _channel_config(api_key, root_certificates, tls)
        self.channel = grpc.secure_channel(target, creds, options) if creds else grpc.insecure_channel(target, options)
        self.stub = engine_pb2_grpc.EngineServiceStub(self.channel)
        self.timeout = timeout

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def stream(self, prompt=None, *, messages=None, timeout: float | None = None, **kw) -> Iterator[pb.GenerateResponse]:
        """The raw response messages; closing the iterator cancels the call (and the request)."""
        call = self.stub.Generate(build_request(prompt, messages=messages, **kw), timeout=timeout or self.timeout,
                                  metadata=self._metadata)
        try:
            yield from call
        finally:
            call.cancel()

    def stream_text(self, prompt=None, *, messages=None, **kw) -> Iterator[str]:
        """Text deltas of sample 0 as they arrive."""
        for resp in self.stream(prompt, messages=messages, **kw):
            for d in resp.outputs:
                if d.index == 0 and d.text:
                    yield d.text

    def generate(self, prompt=None, *, messages=None, **kw) -> GenerateResult:
        result = GenerateResult("", [])
        for resp in self.stream(prompt, messages=messages, **kw):
            result.add(resp)
        return result

    def tokenize(self, text: str | None = None, *, messages=None) -> list[int]:
        req = pb.TokenizeRequest(text=text) if messages is None else pb.TokenizeRequest(chat=build_request(messages=messages).chat)
        return list(self.stub.Tokenize(req, timeout=self.timeout, metadata=self._metadata).token_ids)

    def detokenize(self, token_ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        req = pb.DetokenizeRequest(token_ids=token_ids, skip_special_tokens=skip_special_tokens)
        return self.stub.Detokenize(req, timeout=self.timeout, metadata=self._metadata).text

    def model_info(self) -> pb.ModelInfo:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self.timeout, metadata=self._metadata)

    def health(self, service: str = "") -> str:
        """'SERVING', 'NOT_SERVING', ... for the server ("") or one service."""
        resp = health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout or 10)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


class AsyncClient:
    """The same API with coroutines and async iterators (`grpc.aio`); create it inside a loop."""

    def __init__(self, target: str = DEFAULT_TARGET, *, api_key: str | None = None,
                 root_certificates: bytes | None = None, tls: bool = False, timeout: float | None = None,
                 options: Sequence[tuple[str, object]] = ()):
        self._metadata, creds = _channel_config(api_key, root_certificates, tls)
        self.channel = grpc.aio.secure_channel(target, creds, options) if creds else grpc.aio.insecure_channel(target, options)
        self.stub = engine_pb2_grpc.EngineServiceStub(self.channel)
        self.timeout = timeout

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def stream(self, prompt=None, *, messages=None, timeout: float | None = None, **kw) -> AsyncIterator[pb.GenerateResponse]:
        call = self.stub.Generate(build_request(prompt, messages=messages, **kw), timeout=timeout or self.timeout,
                                  metadata=self._metadata)
        try:
            async for resp in call:
                yield resp
        finally:
            call.cancel()

    async def stream_text(self, prompt=None, *, messages=None, **kw) -> AsyncIterator[str]:
        async for resp in self.stream(prompt, messages=messages, **kw):
            for d in resp.outputs:
                if d.index == 0 and d.text:
                    yield d.text

    async def generate(self, prompt=None, *, messages=None, **kw) -> GenerateResult:
        result = GenerateResult("", [])
        async for resp in self.stream(prompt, messages=messages, **kw):
            result.add(resp)
        return result

    async def tokenize(self, text: str | None = None, *, messages=None) -> list[int]:
        req = pb.TokenizeRequest(text=text) if messages is None else pb.TokenizeRequest(chat=build_request(messages=messages).chat)
        return list((await self.stub.Tokenize(req, timeout=self.timeout, metadata=self._metadata)).token_ids)

    async def detokenize(self, token_ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        req = pb.DetokenizeRequest(token_ids=token_ids, skip_special_tokens=skip_special_tokens)
        return (await self.stub.Detokenize(req, timeout=self.timeout, metadata=self._metadata)).text

    async def model_info(self) -> pb.ModelInfo:
        return await self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self.timeout, metadata=self._metadata)

    async def health(self, service: str = "") -> str:
        resp = await health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout or 10)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
