"""Ragged paged attention: one kernel call over a flat batch of prefill chunks and decodes
reading a paged KV cache.

    triton.py        the public wrapper `ragged_paged_attention` and the Triton-lowered body
    mosaic.py        the Mosaic GPU (Hopper: wgmma + TMA) body the wrapper routes prefill chunks to
    reference.py     the pure-jnp reference (also the XLA fallback off GPU)
    block_sizes.py   the block-size table per shape class
    query_blocks.py  the ragged metadata both bodies share

`pallas_kernels.ragged_paged_attention` is the wrapper function (re-exported by the parent
package); import submodules by their full dotted name.
"""
