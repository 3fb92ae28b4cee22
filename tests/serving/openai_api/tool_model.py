"""A tiny Llama checkpoint that always answers with a given text (a "script"), and whose
chat template is Hermes-style and renders tools: for tests of tool calling end to end,
where a random model would never write a `<tool_call>` block.

    path = write_tool_model(tmp_path, script='<tool_call>{"name": "get_weather", ...}</tool_call>')
    LLM(str(path), **TOOL_ENGINE_ARGS).chat(messages, SamplingParams(temperature=0), tools=[WEATHER_TOOL])
    # -> the script, exactly, then EOS (finish_reason "stop")

How the script is forced (a deterministic "successor" model):

- The tokenizer is the tiny models' byte-level BPE (tests/serving/tiny_model.py) plus one
  extra token per position of the script: the script's own BPE token at that position with a
  private-use character (U+E000 + position) appended, and a decoder that deletes those
  characters before the byte-level decoding. So the extra tokens decode to exactly the
  script, a repeated piece of the script gets a different id at each position, and encoding
  text never produces them (no merge makes them, and byte-level pre-tokenizing never yields
  private-use characters): prompts tokenize as with the tiny model.
- The model has one layer whose attention and MLP output projections are zero, so the
  residual stream is the embedding of the current token and the logits are
  `lm_head @ rmsnorm(embed[token])`: a bigram table. With d orthonormal vectors q_0..q_N
  (d >= N + 1, N the script's token count), every ordinary token embeds as q_0 and script
  token i as q_(i+1), and lm_head's row for script token j is q_j and for EOS q_N (scaled so
  the chosen logit is 20; all other logits are exactly 0). Greedy decoding after any prompt therefore
  emits script tokens 0..N-1 and then EOS. Sampling at temperature 1 almost surely does too
  (each step picks another token with probability ~ vocab * e^-20, about 1e-6).

Limits: the output ignores the prompt (every request gets the same script, whatever its
messages, tools or length; `n > 1` gives n copies); a token-id prompt that ends in one of the
script's own ids continues the script from there (text prompts cannot contain them); the
hidden size grows with the script (the next multiple of 64 above its token count: 256 for the
~200-token script of test_tool_model.py; non-ASCII text takes a token per byte); `max_tokens`
must leave room for the script and EOS, else the output is cut with finish_reason "length".
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.serving.tiny_model import train_tokenizer

# Hermes / Qwen 2.5 style: the tools as JSON lines inside <tools></tools> in the system turn,
# an assistant's calls as <tool_call> blocks, tool results in a tool turn. Written as one line:
# transformers renders with trim_blocks, so newlines come from "\n" string literals.
TOOL_CHAT_TEMPLATE = "".join([
    "{{ bos_token }}",
    "{%- if tools %}<|system|>",
    "{%- if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{{ '\\n\\n' }}{% endif %}",
    "You may call functions. Their signatures, within <tools></tools>:{{ '\\n' }}<tools>",
    "{%- for tool in tools %}{{ '\\n' }}{{ tool | tojson }}{% endfor %}{{ '\\n' }}</tools>{{ '\\n' }}",
    'For each call, answer <tool_call>{"name": <function-name>, "arguments": <args-json-object>}</tool_call>',
    "<|end|>",
    "{%- elif messages[0]['role'] == 'system' %}<|system|>{{ messages[0]['content'] }}<|end|>",
    "{%- endif %}",
    "{%- for m in messages %}",
    "{%- if m['role'] == 'system' and loop.first %}",  # rendered above
    "{%- elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] or '' }}",
    "{%- for tc in m['tool_calls'] or [] %}",
    "{%- set f = tc['function'] if tc['function'] is defined else tc %}",
    '<tool_call>{"name": {{ f[\'name\'] | tojson }}, "arguments": ',
    "{{ f['arguments'] if f['arguments'] is string else f['arguments'] | tojson }}}</tool_call>",
    "{%- endfor %}<|end|>",
    "{%- elif m['role'] == 'tool' %}<|tool|><tool_response",
    "{%- if m['tool_call_id'] %} id=\"{{ m['tool_call_id'] }}\"{% endif %}>",
    "{{ m['content'] }}</tool_response><|end|>",
    "{%- else %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>",
    "{%- endif %}",
    "{%- endfor %}",
    "{%- if add_generation_prompt %}<|assistant|>{% endif %}",
])

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"],
        },
    },
}

DEFAULT_SCRIPT = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'

# Room for a tools system prompt (hundreds of tokens with this small BPE) plus the script.
TOOL_ENGINE_ARGS = dict(dtype="float32", max_model_len=1024, block_size=16, max_num_seqs=8,
                        max_num_batched_tokens=256, num_kv_blocks=520)

_MARK_BASE = 0xE000  # private use area: never produced by byte-level pre-tokenizing
_LOGIT = 20.0


def write_tool_model(path: str | Path, script: str = DEFAULT_SCRIPT, *, vocab_size: int = 512, seed: int = 0) -> Path:
    """Write the checkpoint (config, safetensors, tokenizer with TOOL_CHAT_TEMPLATE) to
    `path`; greedy decoding of any prompt then gives exactly `script`. Returns `path`."""
    import torch
    import transformers
    from tokenizers import Regex, Tokenizer, decoders

    if not script:
        raise ValueError("script must not be empty")
    path = Path(path)
    base = train_tokenizer(vocab_size)

    pieces = base.encode(script, add_special_tokens=False).tokens  # byte-level strings
    if len(pieces) > 0x1000:
        raise ValueError(f"script is {len(pieces)} tokens; at most 4096 are supported")
    spec = json.loads(base.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    first_id = max(vocab.values()) + 1
    script_ids = list(range(first_id, first_id + len(pieces)))
    for i, piece in enumerate(pieces):
        vocab[piece + chr(_MARK_BASE + i)] = first_id + i
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.decoder = decoders.Sequence([decoders.Replace(Regex(f"[{chr(_MARK_BASE)}-{chr(_MARK_BASE + 0xFFF)}]"), ""),
                                     decoders.ByteLevel()])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>", chat_template=TOOL_CHAT_TEMPLATE)
    if fast.decode(script_ids) != script:  # the construction above, checked
        raise AssertionError(f"the script tokens decode to {fast.decode(script_ids)!r}, not {script!r}")
    fast.save_pretrained(path)

    total = first_id + len(pieces)
    hidden = 64 * (len(pieces) // 64 + 1)  # > len(pieces): room for N + 1 orthonormal states
    config = transformers.LlamaConfig(
        vocab_size=total, hidden_size=hidden, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False,
        bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    q, _ = torch.linalg.qr(torch.randn(hidden, hidden, dtype=torch.float64))
    states = q.T[: len(pieces) + 1].float()  # orthonormal rows: state 0 = "before the script"
    # rmsnorm(unit vector) = vector * sqrt(hidden); the scale makes the chosen logit _LOGIT.
    scale = _LOGIT / hidden**0.5
    successors = [*script_ids, fast.eos_token_id]  # state i is followed by token successors[i]
    with torch.no_grad():
        embed = model.model.embed_tokens.weight
        embed.copy_(states[0].expand_as(embed))
        embed[script_ids] = states[1:]
        head = model.lm_head.weight
        head.zero_()
        head[successors] = states * scale
        for layer in model.model.layers:  # the residual stream stays the token's embedding
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    model.save_pretrained(path)
    return path
