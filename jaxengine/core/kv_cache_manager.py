"""`KVCacheManager`: which blocks each request owns, and prefix caching over the pool.

Block hashes: `hash_block_tokens` is SHA-256 over (parent hash, token ids as little-endian
int64, extra keys). Why SHA-256 and not Python's `hash()` of a tuple: a chained 64-bit
hash cannot be fully verified (a colliding *parent* would let a child of different
content match), whereas a 256-bit digest makes that practically impossible; it is also
stable across processes (Python salts `str` hashes per process), which later KV sharing
between processes or replicas needs. It costs ~1 us per full block and each block is
hashed once per request (hashes are kept on the `Request` and extended incrementally).
A lookup still compares the stored token ids, so even a digest collision cannot hand out
wrong KV.

Blocks are registered in the prefix cache as soon as they are *scheduled* to be filled
(as vLLM V1 does), so a request admitted later in the same step can hit them. That is
correct because the step writes every layer's new K/V before attention reads the cache
(`pallas_kernels.kv_cache.write_kv`, then attention with kv_lens including the step's
tokens): the runner must keep that order.
"""

from __future__ import annotations

import hashlib
import struct

from jaxengine.core.block_pool import BlockPool, KVBlock
from jaxengine.core.request import Request

ROOT_HASH = hashlib.sha256(b"jaxengine.core.kv_cache_manager.root").digest()


def hash_block_tokens(
    parent_hash: bytes | None, token_ids: tuple[int, ...] | list[int], extra_keys: tuple = ()
) -> bytes:
    """Chained hash of one full block: sha256(parent || int64 token ids || repr(extra keys))."""
    h = hashlib.sha256(parent_hash if parent_hash is not None else ROOT_HASH)
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    if extra_keys:
        h.update(repr(extra_keys).encode())
    return h.digest()


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.block_pool = BlockPool(num_blocks, enable_caching)
        self.req_to_blocks: dict[str, list[KVBlock]] = {}
        # Block ids kept beside the blocks as an immutable tuple, safe to hand out as is.
        self.req_to_block_ids: dict[str, tuple[int, ...]] = {}
        # How many leading blocks of each request are registered in the prefix cache.
        self.num_cached_blocks: dict[str, int] = {}
        # Per request: the most tokens (computed + new) that need neither a new block nor
        # the caching of a newly full block. allocate_slots returns () at once below it;
        # the scheduler reads it too, to skip the call for most decodes.
        self.room: dict[str, int] = {}

    @property
    def usage(self) -> float:
        return self.block_pool.usage

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.num_free_blocks

    def _update_block_hashes(self, request: Request, num_full_blocks: int) -> list[bytes]:
        """Extend request.block_hashes to cover `num_full_blocks` blocks (never re-hashes)."""
        hashes = request.block_hashes
        bs = self.block_size
        tokens = request.all_token_ids
        i = len(hashes)
        if i == 0 and num_full_blocks > 0:
            extra = (request.cache_salt,) if request.cache_salt is not None else ()
            hashes.append(hash_block_tokens(None, tokens[:bs], extra))
            i = 1
        if i < num_full_blocks:
            # The same digest as hash_block_tokens, inlined: this loop hashes every prompt.
            sha256, pack, fmt = hashlib.sha256, struct.pack, f"<{bs}q"
            parent = hashes[i - 1]
            for i in range(i, num_full_blocks):
                h = sha256(parent)
                h.update(pack(fmt, *tokens[i * bs : (i + 1) * bs]))
                parent = h.digest()
                hashes.append(parent)
        return hashes

    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """Longest chain of cached FULL blocks matching the request's leading tokens.

        Leaves at least one token to compute (the step must produce logits for the last
        token), so a prompt of exactly k full blocks can hit at most k - 1 of them.
        Returns (blocks, number of hit tokens); takes no references (see allocate_slots).
        """
        if not self.enable_caching or request.sampling_params.prompt_logprobs is not None:
            # Prompt logprobs need the logits of every prompt position: compute them all.
            return [], 0
        bs = self.block_size
        max_hit_blocks = (request.num_tokens - 1) // bs
        hashes = self._update_block_hashes(request, max_hit_blocks)
        tokens = request.all_token_ids
        cached = self.block_pool.cached_blocks
        hits: list[KVBlock] = []
        for i in range(max_hit_blocks):
            block = cached.get(hashes[i])
            # Verify the stored tokens (a digest collision must not hand out wrong KV).
            if block is None or block.token_ids != tuple(tokens[i * bs : (i + 1) * bs]):
                break
            hits.append(block)
        return hits, len(hits) * bs

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        new_computed_blocks: list[KVBlock] | None = None,
    ) -> tuple[int, ...] | None:
        """Make room for `num_new_tokens` more tokens after the computed ones.

        `new_computed_blocks` are prefix hits from `get_computed_blocks` (first schedule
        only); they are counted as computed and referenced here. Returns the block ids
        appended to the request's table (hits first, then fresh blocks), or None, with
        nothing changed, when the pool cannot provide them.
        """
        rid = request.request_id
        # Fast path (most decode steps): no new block needed and no block becomes full.
        if not new_computed_blocks and (
            request.num_computed_tokens + num_new_tokens <= self.room.get(rid, -1)
        ):
            return ()
        bs = self.block_size
        pool = self.block_pool
        blocks = self.req_to_blocks.get(rid)
        if blocks is None:  # first allocation; tables are created only once it succeeds
            blocks = []
        hits = new_computed_blocks or ()
        num_total = request.num_computed_tokens + len(hits) * bs + num_new_tokens
        num_new_blocks = -(-num_total // bs) - len(blocks) - len(hits)
        new_ids: tuple[int, ...] = ()
        if num_new_blocks > 0 or hits:
            # Free hit blocks are in the free queue: touching them removes them from it.
            num_free_hits = sum(1 for b in hits if b.ref_cnt == 0)
            if num_new_blocks > pool.num_free_blocks - num_free_hits:
                return None
            if rid not in self.req_to_blocks:
                self.req_to_blocks[rid] = blocks
                self.req_to_block_ids[rid] = ()
                self.num_cached_blocks[rid] = 0
            if hits:
                pool.touch(hits)
                blocks.extend(hits)
                self.num_cached_blocks[rid] = len(blocks)
                new_ids = tuple([b.block_id for b in hits])
            if num_new_blocks > 0:
                new = pool.get_new_blocks(num_new_blocks)
                blocks.extend(new)
                new_ids += tuple([b.block_id for b in new])
            # Tables are immutable tuples, rebuilt only when they grow (every block_size
            # decode steps): the scheduler hands them to the runner without copying.
            self.req_to_block_ids[rid] += new_ids
        num_cached = self.num_cached_blocks.get(rid, 0)
        if self.enable_caching:
            # Only blocks whose token ids are all known are hashed (with async scheduling the
            # last scheduled token may still be on the device); a block left out is cached
            # by a later call, which `room` below guarantees.
            num_full = min(num_total, len(request.all_token_ids)) // bs
            if num_full > num_cached:
                self._cache_full_blocks(request, blocks, num_cached, num_full)
                num_cached = num_full
            self.room[rid] = min(len(blocks) * bs, (num_cached + 1) * bs - 1)
        else:
            self.room[rid] = len(blocks) * bs
        return new_ids

    def _cache_full_blocks(
        self, request: Request, blocks: list[KVBlock], num_cached: int, num_full: int
    ) -> None:
        bs = self.block_size
        hashes = self._update_block_hashes(request, num_full)
        tokens = request.all_token_ids
        cached = self.block_pool.cached_blocks
        for i in range(num_cached, num_full):
            block = blocks[i]
            h = hashes[i]
            # Hit blocks are registered already; a hash that has a block keeps it (this
            # duplicate stays a plain block). Inlined BlockPool.cache_block.
            if block.block_hash is None and h not in cached:
                block.block_hash = h
                block.token_ids = tuple(tokens[i * bs : (i + 1) * bs])
                cached[h] = block
        self.num_cached_blocks[request.request_id] = num_full

    def free(self, request: Request) -> None:
        """Release the request's blocks tail-first (so its chain evicts from the end)."""
        rid = request.request_id
        blocks = self.req_to_blocks.pop(rid, None)
        self.req_to_block_ids.pop(rid, None)
        self.num_cached_blocks.pop(rid, None)
        self.room.pop(rid, None)
        if blocks:
            self.block_pool.free_blocks(reversed(blocks))

    def get_block_ids(self, request_id: str) -> list[int]:
        return list(self.req_to_block_ids.get(request_id, ()))
