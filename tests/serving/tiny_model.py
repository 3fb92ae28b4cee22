"""A tiny random Llama checkpoint with a real (trained, byte-level BPE) tokenizer and a chat
template, written to a directory: what the serving tests and the benchmark smoke run load."""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL = ["<s>", "</s>", "<pad>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>"]
CORPUS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "The quick brown fox jumps over the lazy dog. Hello world! How are you today?",
    "import numpy as np\nx = np.arange(10)\nprint(x.sum())\n",
    "class Engine:\n    def step(self):\n        return self.scheduler.schedule()\n",
]


def train_tokenizer(vocab_size: int = 512):
    """The tiny models' byte-level BPE tokenizer (a `tokenizers.Tokenizer`), trained on CORPUS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer)
    return tok


def write_tiny_model(path: str | Path, *, vocab_size: int = 512, seed: int = 0, chat_template: bool = True) -> Path:
    import torch
    import transformers

    path = Path(path)
    tok = train_tokenizer(vocab_size)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        chat_template=CHAT_TEMPLATE if chat_template else None,
    )
    fast.save_pretrained(path)
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


ENGINE_ARGS = dict(dtype="float32", max_model_len=160, block_size=8, max_num_seqs=16, max_num_batched_tokens=64,
                   num_kv_blocks=256)
