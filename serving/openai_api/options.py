"""`HttpOptions`: what the OpenAI-compatible HTTP API is configured with (from `ServeOptions`,
the `jaxengine serve` flags)."""

from __future__ import annotations

import dataclasses

DEFAULT_MAX_BODY_BYTES = 16 << 20  # a 1 M-character prompt (the gRPC limit), JSON-escaped, fits


@dataclasses.dataclass(frozen=True)
class HttpOptions:
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (the server reports the one it bound)
    model_name: str = "default"  # the one `model` requests may name; /v1/models lists it
    api_keys: tuple[str, ...] = ()  # empty: no authentication
    allowed_origins: tuple[str, ...] = ()  # CORS; empty: no CORS headers at all
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    tool_call_parser: str | None = None  # a name in tool_parsers.TOOL_PARSERS
    enable_auto_tool_choice: bool = False  # tool_choice "auto" (vLLM's flag); needs a parser
    # `--api-server-count` > 1: every front-end process listens on the port (SO_REUSEPORT) and
    # answers /metrics with the serving process's (which sums them all), fetched from this URL.
    reuse_port: bool = False
    metrics_url: str | None = None

    def __post_init__(self) -> None:
        if self.max_body_bytes < 1:
            raise ValueError(f"the HTTP body limit must be >= 1 byte, got {self.max_body_bytes}")
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("--enable-auto-tool-choice needs --tool-call-parser NAME (which format to read calls in)")
        if self.tool_call_parser is not None:
            from serving.openai_api.tool_parsers import get_tool_parser

            try:
                get_tool_parser(self.tool_call_parser)
            except ValueError as e:  # it lists the known names
                raise ValueError(f"--tool-call-parser: {e}") from None
