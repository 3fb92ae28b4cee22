import hashlib
import struct

import pytest

from jaxengine.core import kv_cache_manager as kvm
from jaxengine.core.kv_cache_manager import ROOT_HASH, KVCacheManager, hash_block_tokens
from jaxengine.core.request import Request
from jaxengine.sampling_params import SamplingParams

BS = 4


def make_req(rid, tokens, **kw):
    return Request(rid, tokens, SamplingParams(max_tokens=8), **kw)


def free_ids(m):
    return [b.block_id for b in m.block_pool.free_block_queue.get_all_free_blocks()]


def compute(req, n):
    """What the scheduler does after a step ran n tokens."""
    req.num_computed_tokens += n


def test_hash_is_chained_sha256_and_stable():
    h0 = hash_block_tokens(None, [1, 2, 3, 4])
    expect = hashlib.sha256(ROOT_HASH)
    expect.update(struct.pack("<4q", 1, 2, 3, 4))
    assert h0 == expect.digest() and len(h0) == 32
    assert hash_block_tokens(None, (1, 2, 3, 4)) == h0  # list or tuple alike
    h1 = hash_block_tokens(h0, [5, 6, 7, 8])
    assert h1 != hash_block_tokens(None, [5, 6, 7, 8])  # depends on the parent
    assert hash_block_tokens(None, [1, 2, 3, 4], ("salt",)) != h0  # and on extra keys
    assert hash_block_tokens(None, [1, 2, 3, 5]) != h0


def test_allocate_and_cache_full_blocks_only():
    m = KVCacheManager(num_blocks=10, block_size=BS)
    req = make_req("a", list(range(10)))  # 2 full blocks + 2 tokens
    hits, n = m.get_computed_blocks(req)
    assert hits == [] and n == 0
    assert m.allocate_slots(req, 10, hits) == (1, 2, 3)
    assert m.get_block_ids("a") == [1, 2, 3]
    # Two full blocks cached, the partial third not.
    assert len(req.block_hashes) == 2 and len(m.block_pool.cached_blocks) == 2
    blocks = m.req_to_blocks["a"]
    assert blocks[0].block_hash == req.block_hashes[0] and blocks[0].token_ids == (0, 1, 2, 3)
    assert blocks[2].block_hash is None
    compute(req, 10)
    # Decode: tokens 10, 11 fill block 3; it is cached once scheduled; token 12 needs block 4.
    req.append_output_token_ids(10)
    assert m.allocate_slots(req, 1) == ()
    compute(req, 1)
    req.append_output_token_ids(11)
    assert m.allocate_slots(req, 1) == ()
    assert blocks[2].block_hash is not None and len(req.block_hashes) == 3
    compute(req, 1)
    req.append_output_token_ids(12)
    assert m.allocate_slots(req, 1) == (4,)
    assert m.get_block_ids("a") == [1, 2, 3, 4]


def test_prefix_reuse_across_requests_and_one_token_left():
    m = KVCacheManager(num_blocks=10, block_size=BS)
    a = make_req("a", list(range(12)))  # exactly 3 full blocks
    m.allocate_slots(a, 12, m.get_computed_blocks(a)[0])
    assert m.get_block_ids("a") == [1, 2, 3] and len(m.block_pool.cached_blocks) == 3
    # Same first 8 tokens, then diverges.
    b = make_req("b", list(range(8)) + [99, 98, 97, 96, 95])
    hits, n = m.get_computed_blocks(b)
    assert [x.block_id for x in hits] == [1, 2] and n == 8
    b.num_computed_tokens = 0
    assert m.allocate_slots(b, 13 - 8, hits) == (1, 2, 4, 5)
    assert [x.ref_cnt for x in m.req_to_blocks["b"]] == [2, 2, 1, 1]
    # The identical prompt hits only 2 of its 3 full blocks: one token must be computed.
    c = make_req("c", list(range(12)))
    hits, n = m.get_computed_blocks(c)
    assert [x.block_id for x in hits] == [1, 2] and n == 8
    assert m.allocate_slots(c, 4, hits) == (1, 2, 6)
    # Block 6 holds the same content as block 3: stays unregistered (one block per hash).
    assert m.block_pool.blocks[6].block_hash is None


def test_partial_block_prompt_not_cached():
    m = KVCacheManager(num_blocks=10, block_size=BS)
    a = make_req("a", [1, 2, 3])
    m.allocate_slots(a, 3)
    assert m.block_pool.cached_blocks == {} and a.block_hashes == []
    m.free(a)
    b = make_req("b", [1, 2, 3, 4, 5])
    assert m.get_computed_blocks(b) == ([], 0)


def test_free_tail_first_and_eviction_order():
    m = KVCacheManager(num_blocks=8, block_size=BS)
    a = make_req("a", list(range(12)) + [100])  # 3 full + 1 partial
    m.allocate_slots(a, 13)
    assert m.get_block_ids("a") == [1, 2, 3, 4]
    m.free(a)
    # Tail first, after the never-used blocks 5..7.
    assert free_ids(m) == [5, 6, 7, 4, 3, 2, 1]
    assert m.block_pool.usage == 0.0
    # A newcomer takes never-used blocks first, then the end of a's chain.
    x = make_req("x", [50] * 20)
    assert m.allocate_slots(x, 20) == (5, 6, 7, 4, 3)
    # Block 3 (a's 3rd full block) got evicted, blocks 1-2 survive: the chain's start.
    c = make_req("c", list(range(12)) + [7])
    hits, n = m.get_computed_blocks(c)
    assert [b.block_id for b in hits] == [1, 2] and n == 8


def test_hit_on_free_cached_blocks_respects_capacity():
    m = KVCacheManager(num_blocks=4, block_size=BS)  # 3 usable blocks
    a = make_req("a", list(range(8)) + [9])
    m.allocate_slots(a, 9)
    m.free(a)
    assert free_ids(m) == [3, 2, 1]
    b = make_req("b", list(range(8)) + [1, 2, 3, 4, 5])  # needs 4 blocks, 2 are hits
    hits, n = m.get_computed_blocks(b)
    assert n == 8
    # 2 new blocks needed, 3 free of which 2 are the hits themselves: must fail.
    assert m.allocate_slots(b, 5, hits) is None
    assert free_ids(m) == [3, 2, 1] and all(x.ref_cnt == 0 for x in hits)
    assert "b" not in m.req_to_blocks
    c = make_req("c", list(range(8)) + [1, 2])  # needs 3 blocks, 2 are hits: fits
    hits, n = m.get_computed_blocks(c)
    assert m.allocate_slots(c, 2, hits) == (1, 2, 3)
    assert free_ids(m) == []


def test_allocate_fails_without_side_effects():
    m = KVCacheManager(num_blocks=4, block_size=BS)
    a = make_req("a", list(range(8)))
    m.allocate_slots(a, 8)
    b = make_req("b", list(range(100, 109)))
    assert m.allocate_slots(b, 9) is None
    assert "b" not in m.req_to_blocks and m.num_free_blocks == 1


def test_hash_collision_does_not_corrupt(monkeypatch):
    monkeypatch.setattr(kvm, "hash_block_tokens", lambda parent, toks, extra=(): b"same")
    m = KVCacheManager(num_blocks=10, block_size=BS)
    a = make_req("a", [1, 2, 3, 4, 5])
    m.allocate_slots(a, 5)
    b = make_req("b", [9, 9, 9, 9, 5])  # same (fake) hash, different tokens
    assert m.get_computed_blocks(b) == ([], 0)
    c = make_req("c", [1, 2, 3, 4, 6])
    hits, n = m.get_computed_blocks(c)
    assert [x.block_id for x in hits] == [1] and n == 4


def test_cache_salt_isolates():
    m = KVCacheManager(num_blocks=10, block_size=BS)
    a = make_req("a", list(range(9)), cache_salt="tenant-1")
    m.allocate_slots(a, 9)
    assert m.get_computed_blocks(make_req("b", list(range(9))))[1] == 0
    assert m.get_computed_blocks(make_req("c", list(range(9)), cache_salt="tenant-2"))[1] == 0
    assert m.get_computed_blocks(make_req("d", list(range(9)), cache_salt="tenant-1"))[1] == 8


def test_prefix_caching_disabled():
    m = KVCacheManager(num_blocks=10, block_size=BS, enable_caching=False)
    a = make_req("a", list(range(9)))
    m.allocate_slots(a, 9)
    assert m.block_pool.cached_blocks == {}
    assert m.get_computed_blocks(make_req("b", list(range(9)))) == ([], 0)


def test_block_hashes_chain_and_are_computed_once():
    m = KVCacheManager(num_blocks=10, block_size=BS)
    a = make_req("a", list(range(13)), cache_salt="s")
    m.get_computed_blocks(a)  # hashes the 3 blocks a lookup may hit
    h0 = hash_block_tokens(None, [0, 1, 2, 3], ("s",))
    h1 = hash_block_tokens(h0, [4, 5, 6, 7])
    h2 = hash_block_tokens(h1, [8, 9, 10, 11])
    assert a.block_hashes == [h0, h1, h2]
    # Already-computed hashes are never recomputed: a sentinel survives.
    a.block_hashes[1] = b"sentinel"
    m.get_computed_blocks(a)
    m.allocate_slots(a, 13)
    assert a.block_hashes == [h0, b"sentinel", h2]


def test_block_size_validated():
    with pytest.raises(ValueError, match="block_size must be >= 1, got 0"):
        KVCacheManager(num_blocks=4, block_size=0)
