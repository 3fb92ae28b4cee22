"""The engine end to end on CPU against transformers' greedy `generate`: plain, with
chunked prefill, with preemption, with prefix-cache hits; then the stop conditions, n > 1,
abort, and no recompilation after warm-up."""

import numpy as np
import pytest
import torch
import transformers

from jaxengine import LLM, SamplingParams

PROMPTS = [[5, 17, 99, 3, 200, 41, 8, 8, 120, 7, 66], [250, 1, 2], [9] * 19,
           [31, 4, 159, 26, 53, 58, 97, 93, 23, 84, 62, 64, 33, 83, 27, 95, 2, 88, 41, 97, 16, 93, 99, 37, 51],
           [77, 7]]
NEW = 24
GREEDY = SamplingParams(max_tokens=NEW, temperature=0.0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    hf = transformers.LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("llama")
    hf.save_pretrained(path)
    with torch.no_grad():
        want = [hf.generate(torch.tensor([p]), max_new_tokens=NEW, do_sample=False, pad_token_id=0)[0, len(p):].tolist()
                for p in PROMPTS]
    return path, want


def _llm(path, **kw):
    args = dict(dtype="float32", max_model_len=128, block_size=8, max_num_seqs=8, max_num_batched_tokens=64,
                num_kv_blocks=128, progress=False)
    return LLM(str(path), **(args | kw))


@pytest.fixture(scope="module")
def llm(checkpoint):
    return _llm(checkpoint[0])


def _tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


def test_greedy_matches_transformers(llm, checkpoint):
    outs = llm.generate(PROMPTS, GREEDY)
    assert _tokens(outs) == checkpoint[1]
    assert all(o.finished and o.outputs[0].finish_reason == "length" for o in outs)


def test_chunked_prefill_same_output(checkpoint):
    llm = _llm(checkpoint[0], max_num_batched_tokens=8, max_num_seqs=4)  # the 25-token prompt takes 4 steps
    assert _tokens(llm.generate(PROMPTS, GREEDY)) == checkpoint[1]


def test_preemption_same_output(checkpoint):
    # 10 blocks of 8 tokens: not enough for all five requests at once.
    llm = _llm(checkpoint[0], num_kv_blocks=10)
    assert _tokens(llm.generate(PROMPTS, GREEDY)) == checkpoint[1]
    assert llm.engine.scheduler.num_preemptions > 0


def test_prefix_cache_hits_same_output(llm, checkpoint):
    before = llm.engine.stats()["prefix_cache_hits"]
    outs = llm.generate(PROMPTS + PROMPTS, GREEDY)
    assert _tokens(outs) == checkpoint[1] * 2
    assert llm.engine.stats()["prefix_cache_hits"] > before
    assert any(o.num_cached_tokens > 0 for o in outs)


def test_no_recompilation_after_warmup(llm):
    compiled = llm.engine.runner.num_compiled_programs()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 256, rng.integers(1, 60)).tolist() for _ in range(12)]
    params = [SamplingParams(max_tokens=int(rng.integers(1, 40)), temperature=float(rng.choice([0.0, 0.8])), seed=i)
              for i in range(12)]
    llm.generate(prompts, params)
    assert llm.engine.runner.num_compiled_programs() == compiled


def check_max_tokens_and_stop_token(llm, want, max_tokens, stop_at):
    """PROMPTS[0] greedy (`want` its output): cut at max_tokens, then stopped by a stop token
    id (the token at want[stop_at], ending the output where it first occurs)."""
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=max_tokens, temperature=0))[0].outputs[0]
    assert out.token_ids == want[:max_tokens] and out.finish_reason == "length"
    stop = want[stop_at]
    first = want.index(stop)
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=NEW, temperature=0, stop_token_ids=[stop]))[0].outputs[0]
    assert out.token_ids == want[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop


def test_max_tokens_and_stop_token_ids(llm, checkpoint):
    check_max_tokens_and_stop_token(llm, checkpoint[1][0], 5, 6)


def test_min_tokens_suppresses_stop_tokens(llm, checkpoint):
    want = checkpoint[1][0]
    stop = want[0]
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=10, min_tokens=4, temperature=0, stop_token_ids=[stop]))[0]
    tokens = out.outputs[0].token_ids
    assert len(tokens) >= 4 and stop not in tokens[:4]


def test_eos_and_ignore_eos(checkpoint):
    want = checkpoint[1][0]
    llm = _llm(checkpoint[0])
    eos = want[3]
    llm.engine.eos_token_ids = (eos,)  # as if the checkpoint declared it
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=NEW, temperature=0))[0].outputs[0]
    assert out.token_ids == want[: want.index(eos) + 1] and out.finish_reason == "stop"
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True))[0].outputs[0]
    assert out.token_ids == want and out.finish_reason == "length"


def test_n_samples(llm, checkpoint):
    out = llm.generate(PROMPTS[1], SamplingParams(n=3, max_tokens=8, temperature=1.0, seed=7))[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert all(len(o.token_ids) == 8 for o in out.outputs)
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1  # different samples
    again = llm.generate(PROMPTS[1], SamplingParams(n=3, max_tokens=8, temperature=1.0, seed=7))[0]
    assert [o.token_ids for o in again.outputs] == [o.token_ids for o in out.outputs]
    greedy = llm.generate(PROMPTS[1], SamplingParams(n=2, max_tokens=NEW, temperature=0))[0]
    assert [o.token_ids for o in greedy.outputs] == [checkpoint[1][1]] * 2


def test_abort_frees_every_block(llm):
    engine = llm.engine
    pool = engine.scheduler.kv_cache_manager.block_pool
    for i, p in enumerate(PROMPTS):
        engine.add_request(p, SamplingParams(max_tokens=50), request_id=f"abort-{i}")
    engine.step()
    engine.step()
    assert pool.usage > 0
    engine.abort_request([f"abort-{i}" for i in range(len(PROMPTS))])
    outs = engine.step()
    assert sorted(o.request_id for o in outs) == [f"abort-{i}" for i in range(len(PROMPTS))]
    assert all(o.finished and o.outputs[0].finish_reason == "abort" for o in outs)
    assert pool.usage == 0 and not engine.has_unfinished_requests()
    assert engine.scheduler.num_running == 0 and engine.scheduler.num_waiting == 0


def test_bad_input_rejected_and_engine_keeps_serving(llm, checkpoint):
    with pytest.raises(ValueError, match=r"token ids must be integers in \[0, 256\)"):
        llm.generate([[1, 2, 999]], GREEDY)
    with pytest.raises(ValueError, match="max_model_len=128"):
        llm.generate([[1] * 120], SamplingParams(max_tokens=20))
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], GREEDY)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    assert _tokens(llm.generate(PROMPTS[:2], GREEDY)) == checkpoint[1][:2]
    assert llm.engine.scheduler.kv_cache_manager.block_pool.usage == 0


def test_stream_deltas_concatenate(llm, checkpoint):
    tokens = []
    finished = False
    for delta in llm.stream(PROMPTS[2], GREEDY):
        tokens += delta.outputs[0].token_ids
        finished = delta.finished
    assert finished and tokens == checkpoint[1][2]


def test_seeded_sampling_independent_of_batch(llm):
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, top_k=50, seed=2**40 + 123)
    alone = llm.generate([PROMPTS[3]], params)[0].outputs[0].token_ids
    others = [SamplingParams(max_tokens=20, temperature=1.0, seed=i) for i in range(4)]
    batch = llm.generate(PROMPTS[:3] + [PROMPTS[3]] + PROMPTS[4:], others[:3] + [params] + others[3:])
    assert batch[3].outputs[0].token_ids == alone
    other_seed = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, top_k=50, seed=123)  # same low 32 bits
    assert llm.generate([PROMPTS[3]], other_seed)[0].outputs[0].token_ids != alone


def test_profiled_activation_peak_grows_with_token_budget(checkpoint):
    small = _llm(checkpoint[0], max_num_batched_tokens=16).engine.runner.profile_peak_bytes()
    large = _llm(checkpoint[0], max_num_batched_tokens=64).engine.runner.profile_peak_bytes()
    assert 0 < small < large


@pytest.mark.parametrize("extra", [dict(), dict(max_num_batched_tokens=8, max_num_seqs=4), dict(num_kv_blocks=10)],
                         ids=["plain", "chunked", "preempting"])
def test_synchronous_scheduling_same_output(checkpoint, extra):
    # The engine schedules step N+1 before step N's tokens come back by default; the
    # synchronous order must give the same tokens.
    llm = _llm(checkpoint[0], async_scheduling=False, **extra)
    assert _tokens(llm.generate(PROMPTS, GREEDY)) == checkpoint[1]


def test_penalties_run_synchronously(llm):
    # Penalties need every generated token on the host: those steps run synchronously, and
    # greedy decoding under a repetition penalty never repeats the top token forever.
    params = SamplingParams(max_tokens=16, temperature=0, repetition_penalty=5.0)
    out = llm.generate([PROMPTS[2]], params)[0].outputs[0].token_ids
    plain = llm.generate([PROMPTS[2]], GREEDY)[0].outputs[0].token_ids[:16]
    assert out != plain and len(out) == 16
    assert llm.engine.requests.num_penalised == 0  # released when the request finished


def test_every_eos_id_from_generation_config_stops(checkpoint, tmp_path):
    # Llama 3 instruct lists several EOS ids in generation_config.json: each one stops.
    import json
    import shutil

    path = tmp_path / "ckpt"
    shutil.copytree(checkpoint[0], path)
    want = checkpoint[1][0]
    second = want[5]  # the second listed id is the one greedy decoding meets
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [100_000, second]}))
    llm = _llm(path)
    assert second in llm.engine.eos_token_ids
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=NEW, temperature=0))[0].outputs[0]
    assert out.token_ids == want[: want.index(second) + 1] and out.finish_reason == "stop"
