"""AttentionMetadata: the ragged batch's index arrays, built by the runner on the host and
passed through the model to the attention kernel (docs/DESIGN.md, "One engine step")."""

import dataclasses

import jax


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    positions: jax.Array  # [T] int32, absolute position of each token
    slot_mapping: jax.Array  # [T] int32, cache slot (page * page_size + offset) of each new K/V
    kv_lens: jax.Array  # [S] int32, context length of each sequence after this step
    page_indices: jax.Array  # [S, P] int32, block table of each sequence
    cu_q_lens: jax.Array  # [S + 1] int32, row offsets of each sequence in the flat batch
    num_seqs: jax.Array  # [1] int32, real sequences (rows past it are padding)
    logits_indices: jax.Array  # [S] int32, the row whose logits each sequence samples from
