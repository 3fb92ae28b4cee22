"""EngineConfig defaults that come from the environment."""

import pytest

from jaxengine.config import EngineConfig


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
