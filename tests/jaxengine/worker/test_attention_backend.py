"""The attention function is chosen from EngineConfig in one place, the prefill body included."""

from __future__ import annotations

import pytest

import pallas_kernels
from jaxengine.config import EngineConfig
from jaxengine.worker.attention_backend import attention_fn


def test_prefill_attention_body_reaches_the_kernel_as_its_static_argument():
    fn = attention_fn(True, "triton")
    assert fn.func is pallas_kernels.ragged_paged_attention and fn.keywords == {"prefill_body": "triton"}
    assert attention_fn(False, "mosaic") is pallas_kernels.ragged_paged_attention_reference
    assert attention_fn(None) is pallas_kernels.ragged_paged_attention_reference  # on the CPU


def test_prefill_attention_body_is_validated():
    assert EngineConfig().prefill_attention_body == "auto"
    with pytest.raises(ValueError, match="prefill_attention_body must be one of auto, mosaic, triton, got 'cudnn'"):
        EngineConfig(prefill_attention_body="cudnn")
