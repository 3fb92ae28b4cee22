"""EngineConfig defaults that come from the environment."""

from jaxengine.config import EngineConfig


def test_compilation_cache_dir_follows_jax_env(monkeypatch, tmp_path):
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path))
    assert EngineConfig().compilation_cache_dir == str(tmp_path)
    assert EngineConfig(compilation_cache_dir="").compilation_cache_dir == ""  # an explicit value wins
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    assert EngineConfig().compilation_cache_dir.endswith("/.cache/jaxengine/xla")
