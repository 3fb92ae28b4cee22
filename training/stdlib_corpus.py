"""The corpus of the default model: the `.py` files of the Python standard library of the
machine that runs the recipe, split by file into train / held-out, a byte-level BPE
tokenizer trained on the train split, and the token streams cut into fixed windows.

Everything here is deterministic: files are read in sorted order, the split is a hash of
each file's path relative to the stdlib root (so the same file lands on the same side on
every machine and Python version), and windows are consecutive and non-overlapping.
"""

from __future__ import annotations

import hashlib
import sysconfig
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SPECIAL_TOKEN = "<|endoftext|>"  # BOS, EOS and padding: it starts every file of the corpus
# Directories under the stdlib root that are not the standard library itself.
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


@dataclass(frozen=True)
class SourceFile:
    rel: str  # path relative to the stdlib root, '/'-separated
    text: str


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def collect_files(root: Path, max_files: int | None = None) -> tuple[list[SourceFile], dict[str, int]]:
    """Every `.py` file under `root` outside site-/dist-packages that is UTF-8 and compiles
    with this interpreter (the test suite's deliberately broken files are left out; test
    directories themselves are kept when the installation has them). `max_files` keeps an
    evenly spaced subset (for smoke tests). Returns the files and counts of what was skipped."""
    paths = sorted(
        p for p in root.rglob("*.py")
        if p.is_file() and not _SKIP_DIRS.intersection(p.relative_to(root).parts)
    )
    if max_files is not None and max_files < len(paths):
        paths = [paths[i] for i in np.linspace(0, len(paths) - 1, max_files).round().astype(int)]
    files, skipped = [], {"not_utf8": 0, "syntax_error": 0}
    for p in paths:
        try:
            text = p.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            skipped["not_utf8"] += 1
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                compile(text, str(p), "exec", dont_inherit=True)
        except (SyntaxError, ValueError):
            skipped["syntax_error"] += 1
            continue
        files.append(SourceFile(p.relative_to(root).as_posix(), text))
    return files, skipped


def is_heldout(rel: str, percent: int) -> bool:
    """A file is held out when the first 8 hex digits of sha256(rel) mod 100 < percent."""
    return int(hashlib.sha256(rel.encode()).hexdigest()[:8], 16) % 100 < percent


def split_files(files: list[SourceFile], heldout_percent: int) -> tuple[list[SourceFile], list[SourceFile]]:
    train = [f for f in files if not is_heldout(f.rel, heldout_percent)]
    heldout = [f for f in files if is_heldout(f.rel, heldout_percent)]
    if not train or not heldout:
        raise ValueError(
            f"the split of {len(files)} files at {heldout_percent}% held out left "
            f"{len(train)} train and {len(heldout)} held-out files; use more files"
        )
    return train, heldout


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 pre-tokenization, no normalisation, every byte in the base
    alphabet so any text round-trips) with SPECIAL_TOKEN as id 0, prepended to every
    encoding by the post-processor (`add_special_tokens=True`)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    bos = tok.token_to_id(SPECIAL_TOKEN)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SPECIAL_TOKEN} $A", pair=f"{SPECIAL_TOKEN} $A {SPECIAL_TOKEN} $B",
        special_tokens=[(SPECIAL_TOKEN, bos)],
    )
    return tok


def token_stream(tok: Tokenizer, texts: list[str]) -> np.ndarray:
    """The files' encodings (each starting with SPECIAL_TOKEN) concatenated, as int32."""
    encodings = tok.encode_batch(texts, add_special_tokens=True)
    return np.concatenate([np.asarray(e.ids, np.int32) for e in encodings])


def fixed_windows(stream: np.ndarray, seq_len: int) -> np.ndarray:
    """Consecutive non-overlapping windows [N, seq_len + 1]: window i is
    stream[i*seq_len : i*seq_len + seq_len + 1] (inputs [:-1], targets [1:]); the tail
    that does not fill a window is dropped."""
    n = (len(stream) - 1) // seq_len
    if n == 0:
        raise ValueError(f"{len(stream)} held-out tokens do not fill one window of {seq_len + 1}")
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return stream[idx]


def evenly_spaced(n_total: int, n: int) -> np.ndarray:
    """Indices of `n` windows spread evenly over `n_total` (all of them when n >= n_total)."""
    if n >= n_total:
        return np.arange(n_total)
    return np.unique(np.linspace(0, n_total - 1, n).round().astype(int))
