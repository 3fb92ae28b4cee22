"""The shipped default model through the whole engine (text in, text out) against
transformers' greedy generate on the same checkpoint, both in float32 on CPU."""

import torch
import transformers

from jaxengine import LLM, SamplingParams
from jaxengine.config import default_model_dir

PROMPTS = ["def fibonacci(n):", "import os\n\n\ndef ", "class Stack:\n    def __init__(self):", "    for i in range("]


def test_engine_greedy_equals_transformers_on_default_model():
    path = default_model_dir()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(str(path), dtype="float32", progress=False)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=32, temperature=0))
    for prompt, out in zip(PROMPTS, outs):
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            want = hf.generate(ids, max_new_tokens=32, do_sample=False)[0, ids.shape[1]:].tolist()
        if tok.eos_token_id in want:  # both stop at EOS; the engine leaves it out of the text
            want = want[: want.index(tok.eos_token_id) + 1]
        assert out.prompt_token_ids == ids[0].tolist()
        assert out.outputs[0].token_ids == want
        assert out.outputs[0].text == tok.decode(want, skip_special_tokens=True)
