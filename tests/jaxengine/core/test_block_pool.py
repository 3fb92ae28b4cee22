import pytest

from jaxengine.core.block_pool import BlockPool, FreeBlockQueue, KVBlock


def ids(blocks):
    return [b.block_id for b in blocks]


def test_free_queue_order_and_middle_removal():
    blocks = [KVBlock(i) for i in range(6)]
    q = FreeBlockQueue(blocks)
    assert len(q) == 6 and ids(q.get_all_free_blocks()) == [0, 1, 2, 3, 4, 5]
    q.remove(blocks[3])  # from the middle
    q.remove(blocks[0])  # the head
    q.remove(blocks[5])  # the tail
    assert ids(q.get_all_free_blocks()) == [1, 2, 4] and len(q) == 3
    assert blocks[3].prev_free is None and blocks[3].next_free is None
    q.append(blocks[3])
    q.append(blocks[0])
    assert ids(q.get_all_free_blocks()) == [1, 2, 4, 3, 0]
    assert q.popleft().block_id == 1
    assert ids(q.popleft_n(3)) == [2, 4, 3]
    assert ids(q.get_all_free_blocks()) == [0] and len(q) == 1
    with pytest.raises(ValueError):
        q.popleft_n(2)
    assert q.popleft().block_id == 0
    with pytest.raises(ValueError):
        q.popleft()
    with pytest.raises(ValueError, match="not in the free queue"):
        q.remove(blocks[0])


def test_null_block_reserved():
    pool = BlockPool(5)
    assert pool.num_free_blocks == 4
    got = pool.get_new_blocks(4)
    assert ids(got) == [1, 2, 3, 4]
    assert all(b.ref_cnt == 1 for b in got)
    assert pool.null_block.block_id == 0 and 0 not in ids(got)
    assert pool.usage == 1.0
    with pytest.raises(ValueError):
        pool.get_new_blocks(1)
    with pytest.raises(ValueError, match="num_blocks must be >= 2"):
        BlockPool(1)


def test_free_appends_in_given_order_lru():
    pool = BlockPool(6)
    a = pool.get_new_blocks(2)  # 1, 2
    b = pool.get_new_blocks(2)  # 3, 4
    pool.free_blocks(reversed(b))  # tail-first: 4, 3
    pool.free_blocks(reversed(a))  # 2, 1
    assert ids(pool.free_block_queue.get_all_free_blocks()) == [5, 4, 3, 2, 1]
    # popleft takes the least recently freed.
    assert ids(pool.get_new_blocks(3)) == [5, 4, 3]
    assert pool.usage == pytest.approx(3 / 5)


def test_shared_block_freed_only_at_zero_refs():
    pool = BlockPool(4)
    (blk,) = pool.get_new_blocks(1)
    pool.touch([blk])
    assert blk.ref_cnt == 2
    pool.free_blocks([blk])
    assert blk.ref_cnt == 1 and pool.num_free_blocks == 2
    pool.free_blocks([blk])
    assert blk.ref_cnt == 0 and pool.num_free_blocks == 3
    with pytest.raises(AssertionError):
        pool.free_blocks([blk])


def test_cached_block_lookup_touch_and_lazy_eviction():
    pool = BlockPool(4)
    b1, b2 = pool.get_new_blocks(2)
    assert pool.cache_block(b1, b"h1", (1, 2))
    assert pool.cache_block(b2, b"h2", (3, 4))
    assert not pool.cache_block(b2, b"h1", (1, 2))  # one block per hash
    pool.free_blocks([b2, b1])
    assert ids(pool.free_block_queue.get_all_free_blocks()) == [3, 2, 1]
    # Still cached while free.
    assert pool.get_cached_block(b"h1", (1, 2)) is b1
    # Stored tokens are verified: a hash match with other tokens is a miss.
    assert pool.get_cached_block(b"h1", (1, 3)) is None
    # A prefix hit pulls the block out of the middle of the free queue.
    pool.touch([b1])
    assert b1.ref_cnt == 1 and ids(pool.free_block_queue.get_all_free_blocks()) == [3, 2]
    # Eviction is lazy: b2 stays cached until popped; popping it evicts it.
    (fresh,) = pool.get_new_blocks(1)
    assert fresh.block_id == 3 and pool.get_cached_block(b"h2", (3, 4)) is b2
    (evicted,) = pool.get_new_blocks(1)
    assert evicted is b2 and b2.block_hash is None and b2.token_ids is None
    assert pool.get_cached_block(b"h2", (3, 4)) is None
    assert set(pool.cached_blocks) == {b"h1"} and pool.num_evictions == 1


def test_reset_prefix_cache_only_when_idle():
    pool = BlockPool(3)
    (b,) = pool.get_new_blocks(1)
    pool.cache_block(b, b"h", (1,))
    assert not pool.reset_prefix_cache()
    pool.free_blocks([b])
    assert pool.reset_prefix_cache()
    assert pool.cached_blocks == {} and b.block_hash is None


def test_caching_disabled():
    pool = BlockPool(3, enable_caching=False)
    (b,) = pool.get_new_blocks(1)
    assert not pool.cache_block(b, b"h", (1,))
    assert pool.get_cached_block(b"h", (1,)) is None
