"""A request's sampling fields -> `SamplingParams`.

Fields the request leaves unset (None) take the server's `sampling_defaults` (the model's
generation_config.json, as vLLM's `--generation-config auto`), then SamplingParams' own
defaults. SamplingParams validates every value; its ValueError names the field, which
becomes the 400's `param`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jaxengine.sampling_params import SamplingParams, StructuredOutputsParams
from serving.openai_api.errors import ApiError, invalid
from serving.openai_api.protocol import SamplingFields

# Copied when set; the same names on both sides.
_FIELDS = ("n", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
           "repetition_penalty", "seed", "stop", "stop_token_ids", "ignore_eos", "min_tokens", "logit_bias",
           "skip_special_tokens", "include_stop_str_in_output")


def sampling_params(request: SamplingFields, defaults: Mapping[str, Any], **fields: Any) -> SamplingParams:
    """`fields`: what the endpoint computes itself (max_tokens, logprobs, prompt_logprobs)."""
    kw: dict[str, Any] = dict(defaults)
    kw.update({name: getattr(request, name) for name in _FIELDS if getattr(request, name) is not None})
    kw.update(fields)
    if request.structured_outputs is not None:
        if fields.get("structured_outputs") is not None:
            raise invalid("structured_outputs cannot be combined with response_format or a forced tool_choice",
                          param="structured_outputs")
        try:
            kw["structured_outputs"] = StructuredOutputsParams.from_dict(request.structured_outputs)
        except (TypeError, ValueError) as e:
            raise invalid(str(e), param="structured_outputs") from None
    try:
        return SamplingParams(**kw)
    except ValueError as e:
        message = str(e)
        name = message.split(" ", 1)[0].split("[", 1)[0]  # SamplingParams' messages start with the field
        raise invalid(message, param=name if name in _FIELDS or name in fields else None) from None


def include_usage(request: SamplingFields) -> bool:
    if request.stream_options is not None and not request.stream:
        raise invalid("stream_options is only allowed with stream: true", param="stream_options")
    return bool(request.stream_options and request.stream_options.include_usage)


def check_model(request_model: str | None, served: str) -> None:
    if request_model is not None and request_model != served:
        raise ApiError(404, f"The model `{request_model}` does not exist: this server serves `{served}`",
                       param="model", code="model_not_found")
