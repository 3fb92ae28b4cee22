"""EngineConfig defaults that come from the environment."""

import pytest

from jaxengine.config import EngineConfig, batch_defaults
from jaxengine.worker.kv_capacity import device_memory_bytes


def test_compilation_cache_dir_follows_jax_env(monkeypatch, tmp_path):
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path))
    assert EngineConfig().compilation_cache_dir == str(tmp_path)
    assert EngineConfig(compilation_cache_dir="").compilation_cache_dir == ""  # an explicit value wins
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    assert EngineConfig().compilation_cache_dir.endswith("/.cache/jaxengine/xla")


@pytest.mark.parametrize("name", ["max_num_seqs", "tensor_parallel_size", "num_scheduler_steps", "compile_threads",
                                  "sequence_parallel_min_tokens"])
def test_counts_below_one_are_rejected_with_their_name(name):
    with pytest.raises(ValueError, match=f"{name} must be >= 1, got 0"):
        EngineConfig(**{name: 0})


@pytest.mark.parametrize("platform, kind, gib, expected", [
    ("gpu", "NVIDIA H200", 141, (1024, 8192)),
    ("gpu", "NVIDIA H100 80GB HBM3", 80, (1024, 8192)),
    ("gpu", "NVIDIA A100-SXM4-80GB", 80, (256, 8192)),  # vLLM measured large batches slower there
    ("gpu", "NVIDIA L4", 22, (256, 8192)),
    ("gpu", "unknown", None, (256, 8192)),
    ("cpu", "cpu", None, (16, 256)),
])
def test_batch_defaults_follow_vllms_rule_for_the_device(platform, kind, gib, expected):
    assert batch_defaults(platform, kind, None if gib is None else gib << 30) == expected


def test_unset_batch_limits_resolve_for_this_device_and_respect_a_set_one():
    config = EngineConfig()
    config.resolve_platform_defaults()
    assert (config.max_num_seqs, config.max_num_batched_tokens) == (16, 256)  # tests run on CPU
    config = EngineConfig(max_num_batched_tokens=8)  # as vLLM: max_num_seqs never exceeds it
    config.resolve_platform_defaults()
    assert (config.max_num_seqs, config.max_num_batched_tokens) == (8, 8)
    config = EngineConfig(max_num_seqs=300)  # the token budget grows to let every sequence decode
    config.resolve_platform_defaults()
    assert (config.max_num_seqs, config.max_num_batched_tokens) == (300, 300)


def test_device_memory_is_none_without_statistics():
    import jax

    assert device_memory_bytes(jax.local_devices()[0]) is None  # CPU devices keep none
