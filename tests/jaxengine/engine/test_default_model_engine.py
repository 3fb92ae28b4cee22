"""The shipped default model through the whole engine (text in, text out) against
transformers on the same checkpoint, both in float32 on CPU: greedy tokens and text, stop
strings, streaming, logprobs."""

import numpy as np
import pytest
import torch
import transformers

from jaxengine import LLM, SamplingParams
from jaxengine.config import default_model_dir

PROMPTS = ["def fibonacci(n):", "import os\n\n\ndef ", "class Stack:\n    def __init__(self):", "    for i in range("]


@pytest.fixture(scope="module")
def setup():
    path = default_model_dir()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return tok, hf, LLM(str(path), dtype="float32", progress=False)


def _hf_greedy(tok, hf, prompt, n=32):
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = hf.generate(ids, max_new_tokens=n, do_sample=False, output_logits=True, return_dict_in_generate=True)
    new = out.sequences[0, ids.shape[1]:].tolist()
    logits = torch.stack(out.logits, 1)[0].numpy()
    return ids[0].tolist(), new, logits


def test_greedy_tokens_and_text_equal_transformers(setup):
    tok, hf, llm = setup
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=32, temperature=0))
    for prompt, out in zip(PROMPTS, outs):
        ids, want, _ = _hf_greedy(tok, hf, prompt)
        if tok.eos_token_id in want:  # both stop at EOS; the engine leaves it out of the text
            want = want[: want.index(tok.eos_token_id) + 1]
        assert out.prompt_token_ids == ids
        assert out.outputs[0].token_ids == want
        assert out.outputs[0].text == tok.decode(want, skip_special_tokens=True)


def test_stop_string_across_tokens(setup):
    tok, hf, llm = setup
    full = llm.generate(PROMPTS[0], SamplingParams(max_tokens=32, temperature=0))[0].outputs[0]
    # A stop string straddling a token boundary somewhere in the middle of the text.
    pieces = [tok.decode(full.token_ids[: i + 1]) for i in range(len(full.token_ids))]
    cut = next(i for i in range(4, len(pieces)) if len(pieces[i]) - len(pieces[i - 1]) >= 2)
    stop = pieces[cut][len(pieces[cut - 1]) - 1 : len(pieces[cut - 1]) + 1]
    assert len(stop) == 2
    start = full.text.index(stop)
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=32, temperature=0, stop=[stop]))[0].outputs[0]
    assert out.text == full.text[:start]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert len(out.token_ids) < len(full.token_ids) and out.token_ids == full.token_ids[: len(out.token_ids)]
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=32, temperature=0, stop=[stop], include_stop_str_in_output=True))[0]
    assert out.outputs[0].text == full.text[: start + len(stop)]


def test_stream_deltas_concatenate_to_text(setup):
    _, _, llm = setup
    full = llm.generate(PROMPTS[2], SamplingParams(max_tokens=24, temperature=0))[0].outputs[0]
    text, ids = "", []
    for delta in llm.stream(PROMPTS[2], SamplingParams(max_tokens=24, temperature=0)):
        text += delta.outputs[0].text
        ids += delta.outputs[0].token_ids
    assert (text, ids) == (full.text, full.token_ids)


def test_logprobs_match_log_softmax_of_reference_logits(setup):
    tok, hf, llm = setup
    out = llm.generate(PROMPTS[1], SamplingParams(max_tokens=8, temperature=0, logprobs=5))[0].outputs[0]
    _, want, logits = _hf_greedy(tok, hf, PROMPTS[1], 8)
    ref = torch.log_softmax(torch.tensor(logits), -1).numpy()
    assert out.token_ids == want[: len(out.token_ids)]
    assert len(out.logprobs) == len(out.token_ids)
    for step, (tok_id, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        top5 = np.argsort(-ref[step])[:5]
        assert set(top5.tolist()) <= set(entry)
        for tid, lp in entry.items():
            assert abs(lp.logprob - ref[step, tid]) < 1e-4
        assert entry[tok_id].rank == 1  # greedy picks the top token
    assert abs(out.cumulative_logprob - sum(ref[i, t] for i, t in enumerate(out.token_ids))) < 1e-3


def test_prompt_logprobs_match_reference(setup):
    tok, hf, llm = setup
    prompt = PROMPTS[2]
    params = SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=3)
    out = llm.generate(prompt, params)[0]
    ids = out.prompt_token_ids
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0], -1).numpy()
    assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == len(ids)
    assert out.prompt_logprobs[0] is None  # nothing predicts the first token
    for pos in range(1, len(ids)):
        entry = out.prompt_logprobs[pos]
        assert ids[pos] in entry
        assert set(np.argsort(-ref[pos - 1])[:3].tolist()) <= set(entry)
        for tid, lp in entry.items():
            assert abs(lp.logprob - ref[pos - 1, tid]) < 1e-4


def test_prompt_logprobs_with_chunked_prefill(setup):
    # The same numbers when the prompt is split over several steps.
    tok, hf, llm = setup
    small = LLM(str(default_model_dir()), dtype="float32", max_num_seqs=4, max_num_batched_tokens=8, progress=False)
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=2)
    a = llm.generate(PROMPTS[2], params)[0].prompt_logprobs
    b = small.generate(PROMPTS[2], params)[0].prompt_logprobs
    assert len(a) == len(b) and a[0] is None and b[0] is None
    for x, y in zip(a[1:], b[1:]):
        assert x.keys() == y.keys()
        assert all(abs(x[k].logprob - y[k].logprob) < 1e-4 for k in x)


def test_multi_step_decode_same_text_and_stop_string_inside_a_run(setup):
    tok, hf, llm = setup
    multi = LLM(str(default_model_dir()), dtype="float32", progress=False, num_scheduler_steps=4)
    runs = []
    execute_multi = multi.engine.runner.execute_multi
    multi.engine.runner.execute_multi = lambda inputs, k, *prev: runs.append(k) or execute_multi(inputs, k, *prev)
    greedy = SamplingParams(max_tokens=32, temperature=0)
    want = llm.generate(PROMPTS, greedy)
    got = multi.generate(PROMPTS, greedy)
    assert runs  # the decode steps did run 4 at a time
    assert [o.outputs[0].text for o in got] == [o.outputs[0].text for o in want]
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    # A stop string first seen at a token that is not the last of its run (token 0 comes from
    # the prefill step, then runs of 4: tokens 1-4, 5-8, ...): the text stops before it and
    # the run's later tokens are dropped.
    full = want[0].outputs[0]
    pieces = [tok.decode(full.token_ids[: i + 1]) for i in range(len(full.token_ids))]
    cut = next(i for i in range(6, len(pieces)) if i % 4 != 0 and len(pieces[i]) > len(pieces[i - 1])
               and full.text.index(pieces[i][len(pieces[i - 1]):]) == len(pieces[i - 1]))
    stop = pieces[cut][len(pieces[cut - 1]):]
    start = full.text.index(stop)
    out = multi.generate(PROMPTS[0], SamplingParams(max_tokens=32, temperature=0, stop=[stop]))[0].outputs[0]
    assert out.text == full.text[:start] and out.finish_reason == "stop" and out.stop_reason == stop
    assert out.token_ids == full.token_ids[: len(out.token_ids)]
