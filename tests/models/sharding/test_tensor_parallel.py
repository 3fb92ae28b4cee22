"""Tensor and data parallelism on 8 virtual CPU devices: TP 2/4/8 and DP 2 x TP 4 give the
greedy tokens of TP 1 through the whole engine (float32; MHA, GQA 2:1 and 70B's 8:1), parameters and the KV cache are
really split, the Pallas kernel runs per shard under shard_map, and bad sizes fail clearly.

Needs 8 devices before JAX starts, so the normal suite runs this module in a subprocess
(tests/models/sharding/test_multi_device.py). Directly:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m pytest -q tests/models/sharding/test_tensor_parallel.py
"""

import dataclasses
import functools
import os

import pytest

if "xla_force_host_platform_device_count=8" not in os.environ.get("XLA_FLAGS", ""):
    pytest.skip("needs 8 CPU devices (run through test_multi_device.py)", allow_module_level=True)

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

import pallas_kernels
from jaxengine import LLM, SamplingParams
from models import ModelConfig, load_model, make_mesh, random_model, save_hf_checkpoint
from models.sharding import logical_to_physical, replica_meshes
from tests.models.llama.paged_greedy import empty_caches, ragged_step_inputs

PROMPTS = [[5, 17, 99, 3, 200, 41, 8, 8, 120, 7, 66], [250, 1, 2], [9] * 19,
           [31, 4, 159, 26, 53, 58, 97, 93, 23, 84, 62, 64, 33, 83, 27, 95, 2, 88, 41, 97], [77, 7]]
GREEDY = SamplingParams(max_tokens=16, temperature=0.0)

CONFIGS = {
    # MHA, 8 KV heads: TP up to 8; biases and untied lm_head off.
    "llama": ModelConfig("LlamaForCausalLM", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                         num_heads=8, num_kv_heads=8, head_dim=8, max_position_embeddings=256),
    # Llama-3.1-70B's head layout (64 query heads over 8 KV heads): at TP 8 each device holds
    # one KV head and its 8 query heads (the 70B TP 8 run of benchmarks, scaled down); with
    # attention biases (the fused q/k/v bias is split with its KV heads).
    "llama-70b-heads": ModelConfig("LlamaForCausalLM", vocab_size=512, hidden_size=64, intermediate_size=128,
                                   num_layers=2, num_heads=64, num_kv_heads=8, head_dim=8, max_position_embeddings=256,
                                   qkv_bias=True, o_bias=True),
    # GQA (2 query heads per KV head), q/k norm, head_dim != hidden / heads.
    "qwen3": ModelConfig("Qwen3ForCausalLM", vocab_size=512, hidden_size=64, intermediate_size=96, num_layers=2,
                         num_heads=16, num_kv_heads=8, head_dim=16, max_position_embeddings=256, qk_norm=True),
}


def _randomise(model):
    """Larger weights than the 0.02 init (varied greedy tokens, not one repeated token) and
    non-trivial norm weights and biases, so a mis-sharded norm or bias would show."""
    _, state = nnx.split(model)
    for i, (path, var) in enumerate(nnx.to_flat_state(state)):
        if "norm" in str(path[-2]) or path[-1] == "bias":
            var.set_value(var.get_value() + 0.3 * jax.random.normal(jax.random.key(i), var.get_value().shape))
        else:
            var.set_value(var.get_value() * 4.0)
    return model


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def checkpoint(request, tmp_path_factory):
    cfg = CONFIGS[request.param]
    model = _randomise(random_model(cfg, jnp.float32, seed=3))
    path = tmp_path_factory.mktemp(request.param)
    save_hf_checkpoint(model, path, jnp.float32)
    want = _generate(path, 1, 1)
    return request.param, path, want


def _new_llm(path, tp, dp=1, **engine_args):
    """A small float32 engine on the checkpoint (two T buckets, 16 and 32)."""
    return LLM(str(path), tensor_parallel_size=tp, data_parallel_size=dp, dtype="float32", max_model_len=64,
               block_size=8, max_num_seqs=4, max_num_batched_tokens=32, num_kv_blocks=48, progress=False,
               compilation_cache_dir="", **engine_args)


@functools.cache
def _llm(path, tp, dp):
    return _new_llm(path, tp, dp)


def _generate(path, tp, dp):
    return [o.outputs[0].token_ids for o in _llm(path, tp, dp).generate(PROMPTS, GREEDY, use_tqdm=False)]


@pytest.mark.parametrize("tp,dp", [(2, 1), (4, 1), (8, 1), (4, 2)], ids=["tp2", "tp4", "tp8", "dp2xtp4"])
def test_same_greedy_tokens_as_one_device(checkpoint, tp, dp):
    _, path, want = checkpoint
    assert all(len(t) == GREEDY.max_tokens for t in want)
    assert len({t for seq in want for t in seq}) >= 10  # not one repeated token
    assert _generate(path, tp, dp) == want


def test_multi_step_decode_under_tensor_parallelism(checkpoint):
    _, path, want = checkpoint
    llm = _new_llm(path, 2, num_scheduler_steps=4)
    runs = []
    execute_multi = llm.engine.runner.execute_multi
    llm.engine.runner.execute_multi = lambda inputs, k, *prev: runs.append(k) or execute_multi(inputs, k, *prev)
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)] == want
    assert runs


@pytest.mark.parametrize("tp", [2, 4])
def test_sequence_parallel_steps_keep_the_tokens(checkpoint, tp):
    """Sequence parallelism on every step (T buckets 16 and 32 >= 16): the residual stream
    split by token between the layers gives TP 1's greedy tokens."""
    _, path, want = checkpoint
    llm = _new_llm(path, tp, sequence_parallel_min_tokens=16)
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)] == want


def test_sequence_parallel_gathers_the_residual_only_from_its_threshold(checkpoint):
    """At T >= sequence_parallel_min_tokens the compiled step all-gathers the [T, hidden]
    residual before each column-parallel matmul (q/k/v, gate/up) and gathers no batch metadata;
    below it the step has the plain Megatron all-reduces."""
    import re

    name, path, _ = checkpoint
    cfg = CONFIGS[name]
    runner = _new_llm(path, 2, sequence_parallel_min_tokens=32).engine.runner

    def collectives(t: int) -> list[tuple[str, str]]:
        buf, layout = runner._forward_args(t, 4)
        hlo = runner._forward.lower(runner.state, runner.kv_caches, buf, runner.no_prev_tokens, layout=layout).compile().as_text()
        return re.findall(r"= (\S+) (all-reduce|all-gather|reduce-scatter|collective-permute)(?:-start)?\(", hlo)

    split = collectives(32)
    assert sum(1 for shape, op in split if op == "all-gather" and shape.startswith(f"f32[32,{cfg.hidden_size}]")) == 2 * cfg.num_layers, split
    assert not any(op == "collective-permute" for _, op in split), split
    plain = [op for _, op in collectives(16)]
    assert plain.count("all-reduce") == 1 + 2 * cfg.num_layers and plain.count("all-gather") == 1, plain


def test_engine_params_and_kv_cache_are_split(checkpoint):
    name, path, _ = checkpoint
    cfg = CONFIGS[name]
    tp = 4
    runner = _llm(path, tp, 1).engine.runner
    # KV cache: split by KV head, each device holding Hkv / tp heads of every page.
    for cache in runner.kv_caches:
        assert cache.sharding.spec == P(None, "tp", None, None, None)
        shards = cache.addressable_shards
        assert len(shards) == tp and len({s.device for s in shards}) == tp
        assert all(s.data.shape == (2, cfg.num_kv_heads // tp, 48, 8, cfg.head_dim) for s in shards)
    # Every parameter leaf lives on the 4 devices of the mesh.
    assert all(len(leaf.sharding.device_set) == tp for leaf in runner.state)


def test_loaded_params_are_split(checkpoint):
    name, path, _ = checkpoint
    cfg = CONFIGS[name]
    tp = 8
    model = load_model(path, jnp.float32, mesh=make_mesh(tp))
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    d, h, g = cfg.head_dim, cfg.hidden_size, cfg.num_heads // cfg.num_kv_heads
    want = {  # array -> (spec, one device's shard shape)
        # q/k/v stacked per KV head: a device holds whole GQA groups (models.loading.fused_weights).
        "qkv_proj": (attn.qkv_proj.weight, P("tp", None, None, None), (cfg.num_kv_heads // tp, g + 2, d, h)),
        "o_proj": (attn.o_proj.weight, P(None, "tp"), (h, cfg.num_heads * d // tp)),
        "gate_up_proj": (mlp.gate_up_proj.weight, P("tp", None, None), (cfg.intermediate_size // tp, 2, h)),
        "down_proj": (mlp.down_proj.weight, P(None, "tp"), (h, cfg.intermediate_size // tp)),
        "embed_tokens": (model.model.embed_tokens.weight, P("tp", None), (cfg.vocab_size // tp, h)),
        "norm": (model.model.norm.weight, P(None), (h,)),
    }
    if cfg.qk_norm:
        want["q_norm"] = (attn.q_norm.weight, P(None), (d,))
    if cfg.qkv_bias:
        want["qkv_bias"] = (attn.qkv_proj.bias, P("tp", None, None), (cfg.num_kv_heads // tp, g + 2, d))
    if model.lm_head is not None:
        want["lm_head"] = (model.lm_head.weight, P("tp", None), (cfg.vocab_size // tp, h))
    for what, (param, spec, shard_shape) in want.items():
        arr = param[...]
        assert arr.sharding.spec == spec, what
        shards = arr.addressable_shards
        assert len({s.device for s in shards}) == tp, what
        assert all(s.data.shape == shard_shape for s in shards), what
    # Same values as a one-device load.
    one = load_model(path, jnp.float32)
    for mine, theirs in ((attn.o_proj, one.model.layers[0].self_attn.o_proj), (attn.qkv_proj, one.model.layers[0].self_attn.qkv_proj),
                         (mlp.gate_up_proj, one.model.layers[0].mlp.gate_up_proj)):
        np.testing.assert_array_equal(np.asarray(mine.weight[...]), np.asarray(theirs.weight[...]))


def test_int8_same_greedy_tokens_as_one_device(checkpoint):
    """int8 weight-only under TP 2 gives TP 1's int8 greedy tokens (the matmuls are the
    unquantized ones on dequantized weights, as exact under TP as float32 is)."""
    _, path, _ = checkpoint
    assert _greedy_tokens(_new_llm(path, 2, quantization="int8")) == _greedy_tokens(_new_llm(path, 1, quantization="int8"))


def _greedy_tokens(llm):
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def _prompt_logprobs(llm) -> np.ndarray:
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    return np.concatenate([[next(iter(d.values())).logprob for d in o.prompt_logprobs[1:]] for o in outs])


def test_fp8_under_tensor_parallelism_is_one_devices_fp8(checkpoint):
    """fp8 W8A8 under TP 4 against TP 1's fp8: the per-token activation scales of the
    row-parallel o_proj and down_proj are maxima over the split contracting axis (XLA reduces
    them across shards; a max is exact), so what differs is float32 summation order, which
    can tip an activation's e4m3 rounding (a jump of up to 2^-4 of that element): greedy tokens
    are not bit-stable, so the prompt logprobs are compared. TP's difference from TP 1's fp8
    must be a small fraction (a tenth) of fp8's own difference from the unquantized model."""
    _, path, _ = checkpoint
    fp8 = _prompt_logprobs(_new_llm(path, 1, quantization="fp8"))
    quantization_error = np.abs(fp8 - _prompt_logprobs(_llm(path, 1, 1))).mean()
    assert quantization_error > 0
    sharding_error = np.abs(_prompt_logprobs(_new_llm(path, 4, quantization="fp8")) - fp8).mean()
    print(f"fp8 TP 4 vs TP 1: {sharding_error:.2e}; fp8 vs unquantized: {quantization_error:.2e}")
    assert sharding_error < 0.1 * quantization_error, (sharding_error, quantization_error)


def test_quantized_scales_are_split_with_their_output_rows(checkpoint):
    """A quantized linear's per-channel weight_scale [*out] is split like its weight's output
    axis: with the rows on column-parallel layers (q/k/v, gate/up), whole on every device for
    row-parallel ones (o, down), whose weights are split on the contracting axis."""
    name, path, _ = checkpoint
    cfg = CONFIGS[name]
    tp = 8
    model = load_model(path, jnp.float32, mesh=make_mesh(tp), quantization="fp8")
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    g = cfg.num_heads // cfg.num_kv_heads
    want = {
        "qkv_proj": (attn.qkv_proj, P("tp", None, None, None), P("tp", None, None), (cfg.num_kv_heads // tp, g + 2, cfg.head_dim)),
        "o_proj": (attn.o_proj, P(None, "tp"), P(None), (cfg.hidden_size,)),
        "gate_up_proj": (mlp.gate_up_proj, P("tp", None, None), P("tp", None), (cfg.intermediate_size // tp, 2)),
        "down_proj": (mlp.down_proj, P(None, "tp"), P(None), (cfg.hidden_size,)),
    }
    one = load_model(path, jnp.float32, quantization="fp8")
    one_layer = {"qkv_proj": one.model.layers[0].self_attn.qkv_proj, "o_proj": one.model.layers[0].self_attn.o_proj,
                 "gate_up_proj": one.model.layers[0].mlp.gate_up_proj, "down_proj": one.model.layers[0].mlp.down_proj}
    for what, (layer, weight_spec, scale_spec, scale_shard) in want.items():
        weight, scale = layer.weight[...], layer.weight_scale[...]
        assert weight.dtype == jnp.float8_e4m3fn and weight.sharding.spec == weight_spec, what
        assert scale.sharding.spec == scale_spec, what
        assert all(s.data.shape == scale_shard for s in scale.addressable_shards), what
        # The scales of a row come from the whole row, also where a device holds only some of its columns.
        np.testing.assert_array_equal(np.asarray(scale), np.asarray(one_layer[what].weight_scale[...]))
        np.testing.assert_array_equal(np.asarray(weight).astype(np.float32),
                                      np.asarray(one_layer[what].weight[...]).astype(np.float32))


def test_random_model_generated_in_shards():
    cfg = CONFIGS["qwen3"]
    mesh = make_mesh(8)
    sharded = random_model(cfg, jnp.float32, seed=1, mesh=mesh)
    one = random_model(cfg, jnp.float32, seed=1)
    w = sharded.model.layers[1].mlp.down_proj.weight[...]
    assert w.sharding.spec == P(None, "tp") and w.addressable_shards[0].data.shape == (64, 96 // 8)
    np.testing.assert_array_equal(np.asarray(w), np.asarray(one.model.layers[1].mlp.down_proj.weight[...]))


def test_pallas_kernel_per_shard_matches_reference():
    """The Pallas kernel (interpret mode) inside shard_map over tp = 4, against the jnp
    reference on one device: prompt logits agree."""
    cfg = CONFIGS["qwen3"]
    mesh = make_mesh(4)
    prompts = PROMPTS[:3]
    pages = 3
    tokens, meta = ragged_step_inputs(prompts, [0] * len(prompts), pages)
    kernel = functools.partial(pallas_kernels.ragged_paged_attention, interpret=True)

    def logits(model, caches, attention_fn, mesh):
        graphdef, state = nnx.split(model)

        @jax.jit
        def run(state, caches):
            m = nnx.merge(graphdef, state)
            hidden, caches = m(tokens, caches, meta, attention_fn, mesh)
            return m.compute_logits(hidden), caches

        out, caches = run(state, caches)
        return np.asarray(out), caches

    one = random_model(cfg, jnp.float32, seed=2)
    want, _ = logits(one, empty_caches(one, len(prompts), pages), pallas_kernels.ragged_paged_attention_reference, None)
    sharded = random_model(cfg, jnp.float32, seed=2, mesh=mesh)
    kv = jax.sharding.NamedSharding(mesh, P(None, "tp", None, None, None))
    caches = [jax.device_put(c, kv) for c in empty_caches(one, len(prompts), pages)]
    got, caches = logits(sharded, caches, kernel, mesh)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert caches[0].sharding.is_equivalent_to(kv, 5)  # still split by KV head after the step


def test_mosaic_prefill_body_lowers_per_shard_for_hopper():
    """On Hopper the kernel routes prefill chunks to the Mosaic GPU body; under shard_map at
    TP 2 each device's program gets its own heads (16 of 32 query, 4 of 8 KV heads) and the
    Mosaic GPU lowering takes it (checked for "cuda" on the CPU; it has run on one H200 only)."""
    from pallas_kernels.ragged_paged_attention.mosaic import ragged_paged_attention_mosaic

    mesh = make_mesh(2)
    t, s, hq, hkv, d, num_pages, page_size, pages = 512, 4, 32, 8, 128, 256, 16, 64

    def attn(q, kv_cache, kv_lens, page_indices, cu_q_lens, num_seqs):
        assert q.shape[1] == hq // 2 and kv_cache.shape[1] == hkv // 2  # per-shard shapes
        return ragged_paged_attention_mosaic(q, kv_cache, kv_lens, page_indices, cu_q_lens, num_seqs,
                                             sm_scale=d ** -0.5, pingpong=True, min_q_len=64)

    f = jax.shard_map(attn, mesh=mesh, in_specs=(P(None, "tp"), P(None, "tp"), P(), P(), P(), P()),
                      out_specs=P(None, "tp"), check_vma=False)
    sd = jax.ShapeDtypeStruct
    args = (sd((t, hq, d), jnp.bfloat16), sd((2, hkv, num_pages, page_size, d), jnp.bfloat16), sd((s,), jnp.int32),
            sd((s, pages), jnp.int32), sd((s + 1,), jnp.int32), sd((1,), jnp.int32))
    text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


def test_data_parallel_replicas_on_disjoint_devices(checkpoint):
    _, path, _ = checkpoint
    engine = _llm(path, 4, 2).engine
    groups = [{d.id for leaf in e.runner.state for d in leaf.sharding.device_set} for e in engine.replicas]
    assert len(groups) == 2 and all(len(g) == 4 for g in groups) and not groups[0] & groups[1]
    assert engine.stats()["num_running"] == 0
    # What the server reads of an engine (GetModelInfo, EngineProcess) exists for replicas too.
    assert engine.dtype == engine.kv_dtype == jnp.float32
    assert engine.num_blocks == sum(e.num_blocks for e in engine.replicas) > 0


def test_data_parallel_core_calls_match_generate(checkpoint):
    """What an engine process calls on a DataParallelEngine: add_core_request spreads requests
    over the replicas, step_core's CoreOutputs carry every token (the greedy tokens of one
    device), stop_requests reaches the replica that runs the request, and `done` releases the
    request ids."""
    from jaxengine.core.request import RequestStatus
    from jaxengine.engine.output_processor import StopMatch

    _, path, want = checkpoint
    engine = _llm(path, 4, 2).engine
    ids = [f"core-{i}" for i in range(len(PROMPTS))]
    for rid, prompt in zip(ids, PROMPTS):
        assert engine.add_core_request(prompt, GREEDY, request_id=rid) == [rid]
    engine.add_core_request(PROMPTS[0], SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True),
                            request_id="core-stop")
    assert {i for i, r in enumerate(engine.replicas) for rid in ids if rid in r.requests} == {0, 1}
    got = {rid: [] for rid in [*ids, "core-stop"]}
    finished, done = {}, []
    while engine.has_unfinished_requests():
        out = engine.step_core()
        for rid, tok in zip(out.req_ids, out.token_ids):
            got[rid].append(tok)
        finished.update(out.finished)
        done += out.done
        if got["core-stop"] and "core-stop" not in finished:
            engine.stop_requests([StopMatch("core-stop", "a stop string")])
    assert [got[rid] for rid in ids] == want
    assert finished["core-stop"] == (int(RequestStatus.FINISHED_STOPPED), "a stop string")
    assert len(got["core-stop"]) < 16
    assert sorted(done) == sorted([*ids, "core-stop"]) \
        and not any(rid in r.requests for r in engine.replicas for rid in done)
    assert engine.stats()["num_running"] == 0


def test_divisibility_errors_are_clear():
    with pytest.raises(ValueError, match=r"num_attention_heads \(4\) is not divisible by tensor_parallel_size \(8\)"):
        random_model("tiny-llama", jnp.float32, mesh=make_mesh(8))
    cfg = dataclasses.replace(CONFIGS["llama"], intermediate_size=100, vocab_size=510)
    with pytest.raises(ValueError) as err:
        random_model(cfg, jnp.float32, mesh=make_mesh(8))
    assert "intermediate_size (100) is not divisible by tensor_parallel_size (8)" in str(err.value)
    assert "vocab_size (510)" in str(err.value)
    with pytest.raises(ValueError, match=r"num_key_value_heads \(2\) is not divisible by tensor_parallel_size \(4\)"):
        LLM("tiny-llama", tensor_parallel_size=4, dtype="float32", progress=False)
    with pytest.raises(ValueError, match=r"= 16 devices, but only 8 are available"):
        LLM("tiny-llama", tensor_parallel_size=8, data_parallel_size=2, progress=False)


def test_rules_and_meshes():
    assert logical_to_physical(("heads", "embed")) == P("tp", None)
    assert logical_to_physical(("kv", "kv_heads", "pages", "page", "head_dim")) == P(None, "tp", None, None, None)
    with pytest.raises(ValueError, match="mesh axis 'tp' is used twice"):
        logical_to_physical(("heads", "mlp"))
    with pytest.raises(KeyError, match="no rule"):
        logical_to_physical(("nonsense",))
    mesh = make_mesh(2, 4)
    assert dict(mesh.shape) == {"dp": 4, "tp": 2}
    rows = replica_meshes(mesh)
    assert [r.devices.shape for r in rows] == [(1, 2)] * 4
    assert len({d for r in rows for d in r.devices.flat}) == 8


def test_collectives_are_xlas_and_few(checkpoint):
    """The compiled TP step has only the Megatron collectives, inserted by XLA: one all-reduce
    for the vocab-split embedding, two per layer (after o_proj and down_proj), and one
    all-gather of the logits; the KV cache is never gathered."""
    import re

    name, path, _ = checkpoint
    runner = _llm(path, 4, 1).engine.runner
    buf, layout = runner._forward_args(16, 4)  # a step's packed host arrays, as execute packs them
    hlo = runner._forward.lower(runner.state, runner.kv_caches, buf, runner.no_prev_tokens, layout=layout).compile().as_text()
    ops = re.findall(r"= \S+ (all-reduce|all-gather|all-to-all|collective-permute)(?:-start)?\(", hlo)
    assert ops.count("all-reduce") == 1 + 2 * CONFIGS[name].num_layers, ops
    assert ops.count("all-gather") == 1 and "all-to-all" not in ops and "collective-permute" not in ops, ops
