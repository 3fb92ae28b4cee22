"""The KV block pool: ref-counted blocks, an LRU free queue, and the prefix-cache map.

A block with ref_cnt 0 sits in the free queue. If it also has a hash it is a *cached*
free block: still reusable by a prefix hit (`touch` pulls it out of the queue) until
`get_new_blocks` pops it, which is when it is evicted (lazily, only then). Callers free
a request's blocks tail-first, so the queue evicts the end of a chain before its start
and a shorter cached prefix survives longest.
"""

from __future__ import annotations

from collections.abc import Iterable


class KVBlock:
    """One page of the KV cache (`block_size` token slots)."""

    __slots__ = ("block_id", "ref_cnt", "block_hash", "token_ids", "prev_free", "next_free")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        # Set while the block is registered in the prefix cache (a FULL block only).
        self.block_hash: bytes | None = None
        # The block's token ids, stored with the hash so a lookup can verify the content.
        self.token_ids: tuple[int, ...] | None = None
        # Links of the free queue; None while the block is not in it.
        self.prev_free: KVBlock | None = None
        self.next_free: KVBlock | None = None

    def __repr__(self) -> str:
        h = self.block_hash.hex()[:8] if self.block_hash else None
        return f"KVBlock(id={self.block_id}, ref_cnt={self.ref_cnt}, hash={h})"


class FreeBlockQueue:
    """Doubly linked list of free blocks, least recently freed first.

    A Python deque cannot remove from the middle in O(1); a prefix hit on a cached free
    block must, so the links live in the blocks themselves (as in vLLM V1). Two sentinel
    nodes remove the head/tail special cases.
    """

    def __init__(self, blocks: Iterable[KVBlock]) -> None:
        self._head = KVBlock(-1)
        self._tail = KVBlock(-1)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self.num_free_blocks = 0
        for b in blocks:
            self.append(b)

    def __len__(self) -> int:
        return self.num_free_blocks

    def popleft(self) -> KVBlock:
        block = self._head.next_free
        if block is self._tail:
            raise ValueError("no free blocks")
        self.remove(block)
        return block

    def popleft_n(self, n: int) -> list[KVBlock]:
        if n > self.num_free_blocks:
            raise ValueError(f"asked for {n} free blocks, only {self.num_free_blocks} free")
        out = []
        block = self._head.next_free
        for _ in range(n):
            out.append(block)
            nxt = block.next_free
            block.prev_free = block.next_free = None
            block = nxt
        self._head.next_free = block
        block.prev_free = self._head
        self.num_free_blocks -= n
        return out

    def remove(self, block: KVBlock) -> None:
        prev, nxt = block.prev_free, block.next_free
        if prev is None or nxt is None:
            raise ValueError(f"{block} is not in the free queue")
        prev.next_free = nxt
        nxt.prev_free = prev
        block.prev_free = block.next_free = None
        self.num_free_blocks -= 1

    def append(self, block: KVBlock) -> None:
        last = self._tail.prev_free
        last.next_free = block
        block.prev_free = last
        block.next_free = self._tail
        self._tail.prev_free = block
        self.num_free_blocks += 1

    def get_all_free_blocks(self) -> list[KVBlock]:
        """Head to tail (for tests and invariant checks; O(n))."""
        out = []
        block = self._head.next_free
        while block is not self._tail:
            out.append(block)
            block = block.next_free
        return out


class BlockPool:
    """`num_blocks` blocks; block 0 is the null block (padding target), never handed out."""

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (block 0 is reserved), got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.null_block = self.blocks[0]
        self.free_block_queue = FreeBlockQueue(self.blocks[1:])
        # One block per hash: a second block computed with the same content (two requests
        # that missed each other) simply stays unregistered and is freed as a plain block.
        self.cached_blocks: dict[bytes, KVBlock] = {}
        # Prefix-cache counters, in tokens (as vLLM's metrics count them).
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self.num_evictions = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks a request could get now (cached free blocks included: they are evictable)."""
        return self.free_block_queue.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of usable blocks held by requests (cached free blocks count as free)."""
        return 1.0 - self.free_block_queue.num_free_blocks / (self.num_blocks - 1)

    def get_new_blocks(self, n: int) -> list[KVBlock]:
        """Pop n blocks from the LRU end, evicting any cached ones; each gets ref_cnt 1."""
        blocks = self.free_block_queue.popleft_n(n)
        for b in blocks:
            if b.block_hash is not None:
                self._evict(b)
            b.ref_cnt = 1
        return blocks

    def _evict(self, block: KVBlock) -> None:
        if self.cached_blocks.get(block.block_hash) is block:
            del self.cached_blocks[block.block_hash]
        block.block_hash = None
        block.token_ids = None
        self.num_evictions += 1

    def get_cached_block(self, block_hash: bytes, token_ids: tuple[int, ...]) -> KVBlock | None:
        """The cached block for this hash, if its stored tokens match (guards collisions)."""
        block = self.cached_blocks.get(block_hash)
        if block is None or block.token_ids != token_ids:
            return None
        return block

    def cache_block(self, block: KVBlock, block_hash: bytes, token_ids: tuple[int, ...]) -> bool:
        """Register a full block under its hash; False if that hash already has a block."""
        if not self.enable_caching or block_hash in self.cached_blocks:
            return False
        block.block_hash = block_hash
        block.token_ids = token_ids
        self.cached_blocks[block_hash] = block
        return True

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take a reference on prefix-hit blocks, pulling free ones out of the queue."""
        for b in blocks:
            if b.ref_cnt == 0:
                self.free_block_queue.remove(b)
            b.ref_cnt += 1

    def free_blocks(self, ordered_blocks: Iterable[KVBlock]) -> None:
        """Drop one reference each; blocks reaching 0 join the queue tail in the given order.

        Pass a request's blocks reversed (tail first) so chains evict from their end.
        """
        queue = self.free_block_queue
        for b in ordered_blocks:
            b.ref_cnt -= 1
            if b.ref_cnt == 0:
                queue.append(b)
            elif b.ref_cnt < 0:
                raise AssertionError(f"{b} freed more times than it was taken")

    def record_prefix_lookup(self, num_queried_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_cache_queries += num_queried_tokens
        self.prefix_cache_hits += num_hit_tokens

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash (e.g. after weights change); False if blocks are in use."""
        if self.free_block_queue.num_free_blocks != self.num_blocks - 1:
            return False
        for b in self.cached_blocks.values():
            b.block_hash = None
            b.token_ids = None
        self.cached_blocks.clear()
        return True
