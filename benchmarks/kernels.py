"""Ragged paged attention on the GPU: correctness against the reference first, then one
table of decode and prefill/mixed shapes against the two rooflines measured in the same
run (HBM bandwidth from a large device copy, bf16 matmul rate from an 8192^3 product) and
against JAX's own Pallas `paged_attention` (decode) and `jax.nn.dot_product_attention`
(cuDNN, contiguous K/V). "ours" is `ragged_paged_attention` as the engine calls it (on
Hopper, prefill chunks routed to the Mosaic GPU body); each prefill shape also has a row
for the Triton body alone. Then the Mosaic GPU body alone on the prefill shapes (checked
against the reference, then timed in a few block_kv/stages variants). Also times the KV
write (XLA scatter, in place) next to the attention it feeds. Writes JSON (device kind,
jax version, git SHA) to $OUT or --out.

    PYTHONUNBUFFERED=1 python benchmarks/kernels.py [--quick] [--tune] [--sections ...] [--out DIR]
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels import (  # noqa: E402
    ragged_paged_attention,
    ragged_paged_attention_reference,
    write_kv,
)
from pallas_kernels.ragged_paged_attention.mosaic import ragged_paged_attention_mosaic  # noqa: E402

HKV, D, PS, DTYPE = 8, 128, 16, jnp.bfloat16
RESULTS: dict = {"rows": [], "tune": [], "checks": [], "errors": []}
SMOKE = False  # --smoke: tiny shapes in interpret mode on CPU, to test this script itself
OUT_DIR = "."


def save():
    os.makedirs(OUT_DIR, exist_ok=True)
    with open(os.path.join(OUT_DIR, "kernels.json"), "w") as f:
        json.dump(RESULTS, f, indent=1, default=str)


def log(*a):
    print(*a, flush=True)


def git_sha():
    if os.environ.get("GIT_SHA"):
        return os.environ["GIT_SHA"]
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], text=True).strip()
    except Exception:
        return "unknown"


# ------------------------------------------------------------------------------ timing


def timed(fn, *args, n=10, repeats=5):
    """Median seconds per call. `fn(dep, *args)` takes an int32 scalar 0 that depends on
    the previous call's output, so n calls run back to back inside one jitted loop (no
    dispatch gaps, nothing hoisted out of the loop)."""

    def loop(*args):
        def body(_, dep):
            out = fn(dep, *args)
            x = out.reshape(-1)[0].astype(jnp.float32)
            return (x != x).astype(jnp.int32)  # 0 unless NaN: a true data dependency

        return jax.lax.fori_loop(0, n, body, jnp.int32(0))

    f = jax.jit(loop)
    jax.block_until_ready(f(*args))  # compile + warm-up
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append((time.perf_counter() - t0) / n)
    return float(np.median(ts))


def timed_dispatch(f, *args, n=10, repeats=5):
    """Median seconds per call of a long (ms) jitted call, dispatched back to back."""
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            out = f(*args)
        jax.block_until_ready(out)
        ts.append((time.perf_counter() - t0) / n)
    return float(np.median(ts))


def reps_for(seconds_estimate):
    return int(min(50, max(3, math.ceil(3e-3 / max(seconds_estimate, 1e-7)))))


def measure_rooflines():
    size, mm = ((1 << 20), 512) if SMOKE else ((1 << 30), 8192)
    x = jax.random.normal(jax.random.key(0), (size,), jnp.bfloat16)  # 2 GiB
    t = timed_dispatch(jax.jit(lambda x: x * 2), x)
    bw = 2 * x.nbytes / t  # read + write
    del x
    a = jax.random.normal(jax.random.key(1), (mm, mm), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(2), (mm, mm), jnp.bfloat16)
    t = timed_dispatch(jax.jit(jnp.dot), a, b)
    flops = 2 * mm**3 / t
    return bw, flops


# ------------------------------------------------------------------------------ inputs


def make_cache(num_pages, key):
    return jax.random.normal(key, (2, HKV, num_pages, PS, D), DTYPE)


def ragged_batch(q_lens, kv_lens, hq, num_pages, key, pad_to=None):
    """Host-built metadata with a random permuted page table (pages 1..num_pages-1)."""
    rng = np.random.default_rng(int(sum(q_lens)) * 7 + len(q_lens))
    s = len(q_lens)
    p = max(-(-k // PS) for k in kv_lens)
    need = sum(-(-k // PS) for k in kv_lens)
    assert need < num_pages, (need, num_pages)
    perm = 1 + rng.permutation(num_pages - 1)[:need]
    pt = np.zeros((s, p), np.int32)
    off = 0
    for i, k in enumerate(kv_lens):
        m = -(-k // PS)
        pt[i, :m] = perm[off : off + m]
        off += m
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    t = int(cu[-1]) if pad_to is None else pad_to
    q = jax.random.normal(key, (t, hq, D), DTYPE)
    return dict(q=q, kv_lens=jnp.asarray(kv_lens, jnp.int32), page_indices=jnp.asarray(pt),
                cu_q_lens=jnp.asarray(cu), num_seqs=jnp.asarray([s], jnp.int32))


def attn_cost(q_lens, kv_lens, hq, window=None):
    """FLOPs (QK^T + PV over visible keys) and the fewest bytes (K/V once, q, out)."""
    flops = 0
    for ql, kl in zip(q_lens, kv_lens):
        pos = np.arange(kl - ql, kl)
        vis = pos + 1 if window is None else np.minimum(pos + 1, window)
        flops += 4 * D * hq * int(vis.sum())
    kv_bytes = 2 * HKV * D * 2 * sum(kv_lens)
    q_bytes = 2 * 2 * sum(q_lens) * hq * D
    return flops, kv_bytes + q_bytes


# ------------------------------------------------------------------------------ runners


def ours(batch, cache, sm_scale, **kw):
    def fn(dep, q, cache, kv_lens, pt, cu, ns):
        return ragged_paged_attention(q, cache, kv_lens, pt, cu, ns + dep, sm_scale=sm_scale,
                                      interpret=SMOKE, **kw)

    args = (batch["q"], cache, batch["kv_lens"], batch["page_indices"], batch["cu_q_lens"],
            batch["num_seqs"])
    return fn, args


def jax_paged(batch, k_pages, v_pages, sm_scale):
    from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention

    p = batch["page_indices"].shape[1]
    k_splits = math.gcd(16, p)
    ppcb = math.gcd(8, p // k_splits)

    def fn(dep, q, kp, vp, pt, lens):  # it does not scale by 1/sqrt(d): pre-scaled q
        return paged_attention(q, kp, vp, pt, lens + dep, k_splits=k_splits,
                               pages_per_compute_block=ppcb, interpret=SMOKE)

    return fn, (batch["q"] * sm_scale, k_pages, v_pages, batch["page_indices"],
                batch["kv_lens"])


def contiguous_kv(batch, cache):
    pt = batch["page_indices"]  # equal kv_lens: pt fully used
    b, p = pt.shape
    k = cache[0][:, pt].reshape(HKV, b, p * PS, D).transpose(1, 2, 0, 3)
    v = cache[1][:, pt].reshape(HKV, b, p * PS, D).transpose(1, 2, 0, 3)
    return k, v


def cudnn(q4, k, v, sm_scale, causal):
    """cuDNN attention on contiguous K/V; XLA's if cuDNN refuses the shape."""
    for impl in ("cudnn", "xla"):
        def fn(dep, q, k, v, impl=impl):
            return jax.nn.dot_product_attention(q + dep.astype(q.dtype), k, v, scale=sm_scale,
                                                is_causal=causal, implementation=impl)

        try:
            jax.jit(fn).lower(jnp.int32(0), q4, k, v).compile()
            return fn, (q4, k, v), impl
        except Exception as ex:
            RESULTS["errors"].append(f"dot_product_attention {impl}: {ex!r}"[:1000])
    raise RuntimeError("no dot_product_attention implementation")


def rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# ------------------------------------------------------------------------------ sections


def correctness():
    """Kernel vs reference on shapes the reference can hold, several dtypes/features."""
    num_pages = 64 if SMOKE else 8192
    cache = make_cache(num_pages, jax.random.key(11))
    cases = [] if SMOKE else [
        ("decode b32 ctx2k", [1] * 32, [2048 - i for i in range(32)], {}),
        ("mixed", [1, 300, 1, 77, 1], [900, 300, 17, 1100, 1], {}),
        ("mixed window", [1, 300, 1, 77], [900, 300, 17, 1100], dict(sliding_window=128)),
        ("mixed softcap", [1, 300, 1, 77], [900, 300, 17, 1100], dict(soft_cap=30.0)),
        ("decode splits4", [1] * 8, [3000, 17, 16, 15, 1, 513, 2047, 999],
         dict(num_kv_splits=4)),
    ]
    cases += [("small mixed", [1, 30, 1], [90, 30, 17], {}),
              ("small splits", [1, 1], [100, 33], dict(num_kv_splits=3))]
    ok = True
    for hq in (32, 64):
        for name, ql, kl, kw in cases:
            if hq == 64 and not name.startswith(("decode", "small")):
                continue
            dts = ((DTYPE, 1.5e-2), (jnp.float32, 1e-5))
            if name not in ("mixed", "decode splits4", "small mixed"):
                dts = dts[:1]
            for dt, tol in dts:
                try:
                    b = ragged_batch(ql, kl, hq, num_pages, jax.random.key(3), pad_to=sum(ql) + 5)
                    c = cache if dt == DTYPE else cache.astype(dt)
                    q = b["q"].astype(dt)
                    args = (q, c, b["kv_lens"], b["page_indices"], b["cu_q_lens"], b["num_seqs"])
                    sm = D**-0.5
                    o = ragged_paged_attention(*args, sm_scale=sm, interpret=SMOKE, **kw)
                    r = ragged_paged_attention_reference(
                        *args, sm_scale=sm, **{k: v for k, v in kw.items()
                                               if k in ("sliding_window", "soft_cap")})
                    o32 = np.asarray(o.astype(jnp.float32))
                    e = rel(o32, r.astype(jnp.float32))
                    good = bool(np.isfinite(o32).all() and e < tol and not o32[sum(ql):].any())
                    ok &= good
                    RESULTS["checks"].append(dict(name=name, hq=hq, dtype=str(jnp.dtype(dt)),
                                                  rel_err=e, ok=good))
                    log(f"check {name:18s} hq={hq} {jnp.dtype(dt).name:8s} rel={e:.2e} "
                        f"{'ok' if good else 'FAIL'}")
                except Exception as ex:  # keep going: the table says what failed
                    ok = False
                    RESULTS["errors"].append(f"check {name} {hq} {dt}: {ex!r}"[:2000])
                    log(f"check {name} hq={hq} {dt} ERROR {ex!r}"[:800])
                    traceback.print_exc()
    return ok


def row(kind, name, hq, t, flops, nbytes, bw, peak, extra):
    r = dict(kind=kind, name=name, hq=hq, seconds=t, flops=flops, bytes=nbytes,
             gbps=nbytes / t / 1e9 if t else None, pct_bw=100 * nbytes / t / bw if t else None,
             tflops=flops / t / 1e12 if t else None,
             pct_mm=100 * flops / t / peak if t else None, **extra)
    RESULTS["rows"].append(r)
    return r


def try_time(label, fn, args, n):
    try:
        return timed(fn, *args, n=n)
    except Exception as ex:
        RESULTS["errors"].append(f"{label}: {ex!r}"[:2000])
        log(f"  {label}: ERROR {ex!r}"[:600])
        return None


def decode_section(cache, num_pages, k_pages, v_pages, bw, peak, shapes, heads):
    for hq in heads:
        for bsz, ctx in shapes:
            ql, kl = [1] * bsz, [ctx] * bsz
            b = ragged_batch(ql, kl, hq, num_pages, jax.random.key(bsz + ctx))
            flops, nbytes = attn_cost(ql, kl, hq)
            n = reps_for(nbytes / bw)
            sm = D**-0.5
            fn, args = ours(b, cache, sm)
            out = ragged_paged_attention(*args, sm_scale=sm, interpret=SMOKE)
            t_ours = try_time(f"ours decode {bsz}x{ctx}", fn, args, n)
            extra = {"batch": bsz, "ctx": ctx}
            t_jp = t_cd = None
            try:
                fj, aj = jax_paged(b, k_pages, v_pages, sm)
                oj = fj(jnp.int32(0), *aj)
                extra["rel_vs_jax_paged"] = rel(out, oj)
                t_jp = try_time("jax paged", fj, aj, n)
            except Exception as ex:
                RESULTS["errors"].append(f"jax paged {bsz}x{ctx}: {ex!r}"[:2000])
                log(f"  jax paged ERROR {ex!r}"[:600])
            try:
                k, v = contiguous_kv(b, cache)
                fc, ac, extra["sdpa_impl"] = cudnn(b["q"][:, None], k, v, sm, False)
                oc = fc(jnp.int32(0), *ac)[:, 0]
                extra["rel_vs_cudnn"] = rel(out, oc)
                t_cd = try_time("cudnn", fc, ac, n)
                del k, v, ac
            except Exception as ex:
                RESULTS["errors"].append(f"cudnn {bsz}x{ctx}: {ex!r}"[:2000])
                log(f"  cudnn ERROR {ex!r}"[:600])
            extra.update(t_jax_paged=t_jp, t_cudnn=t_cd)
            r = row("decode", f"decode b{bsz} ctx{ctx}", hq, t_ours, flops, nbytes, bw, peak,
                    extra)
            log(fmt(r))


def prefill_section(cache, num_pages, bw, peak, shapes):
    for name, ql, kl, hq in shapes:
        b = ragged_batch(ql, kl, hq, num_pages, jax.random.key(len(ql) + sum(kl)))
        flops, nbytes = attn_cost(ql, kl, hq)
        sm = D**-0.5
        n = reps_for(flops / peak)
        fn, args = ours(b, cache, sm)
        t_ours = try_time(f"ours {name}", fn, args, n)
        extra = {"t_cudnn": None}
        if all(a == c for a, c in zip(ql, kl)) and len(set(ql)) == 1:  # cuDNN: equal causal
            try:
                out = ragged_paged_attention(*args, sm_scale=sm, interpret=SMOKE)
                k, v = contiguous_kv(b, cache)
                q4 = b["q"].reshape(len(ql), ql[0], hq, D)
                fc, ac, extra["sdpa_impl"] = cudnn(q4, k, v, sm, True)
                oc = fc(jnp.int32(0), *ac).reshape(-1, hq, D)
                extra["rel_vs_cudnn"] = rel(out, oc)
                extra["t_cudnn"] = try_time("cudnn", fc, ac, n)
                del k, v, ac
            except Exception as ex:
                RESULTS["errors"].append(f"cudnn {name}: {ex!r}"[:2000])
                log(f"  cudnn ERROR {ex!r}"[:600])
        r = row("prefill", name, hq, t_ours, flops, nbytes, bw, peak, extra)
        log(fmt(r))
        if not SMOKE:  # what the routing chose against the Triton body alone (the default before)
            fn_t, _ = ours(b, cache, sm, prefill_body="triton")
            t_t = try_time(f"triton body {name}", fn_t, args, n)
            log(fmt(row("prefill-triton", f"{name} (Triton body)", hq, t_t, flops, nbytes, bw, peak,
                        {"t_cudnn": extra["t_cudnn"]})))


# (block_kv, stages, pingpong) variants of the Mosaic GPU prefill body, timed on every prefill shape.
MOSAIC_VARIANTS = ((128, 2, False), (128, 2, True), (64, 3, False), (64, 3, True))


MOSAIC_CHECKS = (("mosaic mixed", [1, 300, 1, 77, 1], [900, 300, 17, 1100, 1]), ("mosaic prefill 1x2k", [2048], [2048]))


def mosaic_section(cache, num_pages, bw, peak, shapes, checks=MOSAIC_CHECKS):
    """The Mosaic GPU prefill body (not used by the engine yet): its error against the
    reference on two batches first, then the prefill shapes, each checked against the
    Triton body's output before it is timed."""
    good = False
    for name, ql, kl in checks:
        try:
            b = ragged_batch(ql, kl, 32, num_pages, jax.random.key(5), pad_to=sum(ql) + 5)
            args = (b["q"], cache, b["kv_lens"], b["page_indices"], b["cu_q_lens"], b["num_seqs"])
            o = np.asarray(ragged_paged_attention_mosaic(*args, sm_scale=D**-0.5).astype(jnp.float32))
            e = rel(o, ragged_paged_attention_reference(*args, sm_scale=D**-0.5).astype(jnp.float32))
            ok = bool(np.isfinite(o).all() and e < 1.5e-2 and not o[sum(ql):].any())
            good |= ok
            RESULTS["checks"].append(dict(name=name, hq=32, dtype="bfloat16", rel_err=e, ok=ok))
            log(f"check {name:18s} hq=32 bfloat16 rel={e:.2e} {'ok' if ok else 'FAIL'}")
        except Exception as ex:
            RESULTS["errors"].append(f"check {name}: {ex!r}"[:2000])
            log(f"check {name} ERROR {ex!r}"[:800])
            traceback.print_exc()
    if not good:
        log("the Mosaic GPU body never matched the reference: no timings")
        return
    for name, ql, kl, hq in shapes:
        b = ragged_batch(ql, kl, hq, num_pages, jax.random.key(len(ql) + sum(kl)))
        flops, nbytes = attn_cost(ql, kl, hq)
        sm = D**-0.5
        args = (b["q"], cache, b["kv_lens"], b["page_indices"], b["cu_q_lens"], b["num_seqs"])
        triton = ragged_paged_attention(*args, sm_scale=sm, interpret=SMOKE)
        cudnn_t = next((r.get("t_cudnn") for r in RESULTS["rows"] if r["name"] == name), None)
        for block_kv, stages, pingpong in MOSAIC_VARIANTS:
            label = f"{name} mosaic {block_kv}/{stages}{' pp' if pingpong else ''}"

            def fn(dep, q, cache, kv_lens, pt, cu, ns, block_kv=block_kv, stages=stages, pingpong=pingpong):
                return ragged_paged_attention_mosaic(q, cache, kv_lens, pt, cu, ns + dep, sm_scale=sm,
                                                     block_kv=block_kv, stages=stages, pingpong=pingpong)
            try:
                e = rel(fn(jnp.int32(0), *args).astype(jnp.float32), triton.astype(jnp.float32))
            except Exception as ex:
                RESULTS["errors"].append(f"{label}: {ex!r}"[:2000])
                log(f"  {label}: ERROR {ex!r}"[:600])
                continue
            t = try_time(label, fn, args, reps_for(flops / peak)) if e < 2e-2 else None
            r = row("prefill-mosaic", label, hq, t, flops, nbytes, bw, peak,
                    {"rel_vs_triton": e, "t_cudnn": cudnn_t, "block_kv": block_kv, "stages": stages,
                     "pingpong": pingpong})
            log(fmt(r) + ("" if t else f"  (rel vs Triton body {e:.2e}: not timed)"))


def kv_write_section(num_pages, bw):
    """XLA scatter of a step's K/V into the (donated, in-place) cache, next to attention."""
    cache = make_cache(num_pages, jax.random.key(9))
    for t in ((16, 64) if SMOKE else (256, 8192)):
        k = jax.random.normal(jax.random.key(t), (t, HKV, D), DTYPE)
        slots = jnp.asarray(np.random.default_rng(t).choice(num_pages * PS, t, replace=False),
                            jnp.int32)

        def loop(cache, k, slots, n=20):
            def body(_, c):
                return write_kv(c, k, k, slots)

            return jax.lax.fori_loop(0, n, body, cache)

        f = jax.jit(loop, donate_argnums=0)
        cache = jax.block_until_ready(f(cache, k, slots))
        ts = []
        for _ in range(5):
            t0 = time.perf_counter()
            cache = jax.block_until_ready(f(cache, k, slots))
            ts.append((time.perf_counter() - t0) / 20)
        sec = float(np.median(ts))
        nbytes = 2 * 2 * t * HKV * D * 2  # read new + write slot, K and V
        RESULTS.setdefault("kv_write", []).append(dict(tokens=t, seconds=sec, bytes=nbytes,
                                                       cache_bytes=cache.nbytes))
        log(f"write_kv (XLA scatter, in place) T={t:5d}: {sec * 1e6:8.1f} us "
            f"(whole-cache copy would be {cache.nbytes / bw * 1e6:.0f} us)")
    del cache


def tune_section(cache, num_pages, bw, peak):
    """A few block-size variants on representative shapes (results feed block_sizes.py)."""
    sets = [
        ("decode b32 ctx2k", [1] * 32, [2048] * 32, 32,
         [dict(num_kv_splits=s, pages_per_block=ppb, num_stages=st)
          for s, ppb, st in [(1, 4, 3), (2, 4, 3), (4, 4, 3), (2, 4, 2), (4, 8, 2)]]),
        ("decode b32 ctx16k", [1] * 32, [16384] * 32, 32,
         [dict(num_kv_splits=s, pages_per_block=ppb, num_stages=st)
          for s, ppb, st in [(1, 4, 3), (2, 4, 3), (4, 4, 3), (2, 4, 2), (2, 8, 2)]]),
        ("decode b64 ctx8k", [1] * 64, [8192] * 64, 32,  # the shape furthest from 2x JAX's kernel (v4)
         [dict(num_kv_splits=s, pages_per_block=ppb, num_stages=st)
          for s, ppb, st in [(1, 4, 3), (2, 4, 3), (2, 8, 2), (1, 8, 3), (4, 4, 3)]]),
        ("decode b256 ctx2k", [1] * 256, [2048] * 256, 64,
         [dict(num_kv_splits=s, pages_per_block=ppb, num_stages=st, num_warps=w)
          for s, ppb, st, w in [(1, 4, 3, 4), (1, 8, 3, 4), (1, 4, 2, 4), (1, 8, 2, 8)]]),
        ("prefill 1x8k", [8192], [8192], 32,
         [dict(block_q=bq, pages_per_block=ppb, num_warps=w, num_stages=st)
          for bq, ppb, w, st in [(16, 4, 4, 3), (32, 4, 8, 3), (32, 8, 8, 2), (16, 8, 4, 3),
                                 (32, 4, 4, 3), (64, 4, 8, 2)]]),
    ]
    for name, ql, kl, hq, variants in sets:
        b = ragged_batch(ql, kl, hq, num_pages, jax.random.key(5))
        flops, nbytes = attn_cost(ql, kl, hq)
        n = reps_for(max(nbytes / bw, flops / peak))
        for kw in variants:
            fn, args = ours(b, cache, D**-0.5, **kw)
            t = try_time(f"tune {name} {kw}", fn, args, n)
            if t:
                RESULTS["tune"].append(dict(name=name, hq=hq, kw=kw, seconds=t,
                                            pct_bw=100 * nbytes / t / bw,
                                            pct_mm=100 * flops / t / peak))
                log(f"tune {name:18s} {str(kw):70s} {t * 1e6:9.1f} us  "
                    f"{100 * nbytes / t / bw:5.1f}% bw  {100 * flops / t / peak:5.1f}% mm")


def fmt(r):
    def us(x):
        return f"{x * 1e6:9.1f}" if x else "      n/a"

    jp, cd = r.get("t_jax_paged"), r.get("t_cudnn")
    sp_jp = f"{jp / r['seconds']:5.2f}x" if jp and r["seconds"] else "   n/a"
    sp_cd = f"{cd / r['seconds']:5.2f}x" if cd and r["seconds"] else "   n/a"
    g = lambda k, f: (f.format(r[k]) if r.get(k) is not None else "n/a")  # noqa: E731
    return (f"| {r['name']:24s} | {r['hq']:2d}/8 | {us(r['seconds'])} | {g('gbps', '{:7.0f}')} | "
            f"{g('pct_bw', '{:5.1f}')} | {g('tflops', '{:6.1f}')} | {g('pct_mm', '{:5.1f}')} | "
            f"{us(jp)} | {sp_jp} | {us(cd)} | {sp_cd} |")


HEADER = ("| shape                    | Hq/Hkv | ours (us) | GB/s | %HBM | TFLOP/s | %mm | "
          "jax paged (us) | ours vs it | cuDNN (us) | ours vs it |\n|---|---|---|---|---|---|"
          "---|---|---|---|---|")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="few shapes (smoke test)")
    ap.add_argument("--tune", action="store_true", help="also time block-size variants")
    ap.add_argument("--smoke", action="store_true", help="tiny, interpret mode (CPU)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--sections", default="decode,prefill,mosaic,kv_write",
                    help="comma-separated subset of decode,prefill,mosaic,kv_write (the checks always run)")
    a = ap.parse_args()
    sections = set(a.sections.split(","))
    if sections - {"decode", "prefill", "mosaic", "kv_write"}:
        ap.error(f"unknown sections {sorted(sections - {'decode', 'prefill', 'mosaic', 'kv_write'})}")
    global SMOKE, OUT_DIR
    SMOKE, OUT_DIR = a.smoke, a.out
    t_start = time.time()
    dev = jax.devices()[0]
    RESULTS.update(device_kind=dev.device_kind, jax_version=jax.__version__, git_sha=git_sha(),
                   backend=dev.platform)
    log(f"device {dev.device_kind}  jax {jax.__version__}  sha {RESULTS['git_sha']}")

    bw, peak = measure_rooflines()
    RESULTS.update(hbm_bytes_per_s=bw, bf16_flops_per_s=peak)
    log(f"roofline: copy {bw / 1e12:.2f} TB/s (read+write), bf16 matmul {peak / 1e12:.0f} TFLOP/s")

    decode_shapes = [(16, 512), (16, 16384), (32, 2048), (32, 16384), (64, 8192), (128, 2048),
                     (256, 2048), (256, 8192)]
    if a.quick:
        decode_shapes = [(32, 2048), (256, 8192)]
    if SMOKE:
        decode_shapes = [(2, 64)]
    max_tokens = max(bz * c for bz, c in decode_shapes)
    num_pages = max_tokens // PS + 64
    cache = make_cache(num_pages, jax.random.key(0))

    ok = correctness()
    log(f"correctness vs reference: {'ok' if ok else 'FAILED'}  ({time.time() - t_start:.0f}s)")
    RESULTS["correct"] = ok
    save()
    if not any(c["ok"] for c in RESULTS["checks"]):
        log("kernel never ran correctly: stopping before the timings")
        return

    if a.tune:
        tune_section(cache, num_pages, bw, peak)
        log(f"tuning done ({time.time() - t_start:.0f}s)")
        save()

    log(HEADER)
    if "decode" in sections:
        k_pages, v_pages = cache[0], cache[1]  # JAX's kernel takes K and V apart
        decode_section(cache, num_pages, k_pages, v_pages, bw, peak, decode_shapes,
                       (32,) if a.quick else (32, 64))
        del k_pages, v_pages
        log(f"decode done ({time.time() - t_start:.0f}s)")
        save()
    prefill = [
        ("prefill 1x2k", [2048], [2048], 32),
        ("prefill 1x8k", [8192], [8192], 32),
        ("prefill 8x2k", [2048] * 8, [2048] * 8, 32),
        ("chunk 2k on 6k ctx", [2048], [8192], 32),
        ("mixed 1k chunk+64 dec", [1024] + [1] * 64, [4096] + [2048] * 64, 32),
    ]
    if a.quick:
        prefill = prefill[1:2]
    if SMOKE:
        prefill = [("prefill 1x64", [64], [64], 32), ("mixed", [16, 1], [48, 20], 32)]
    if "prefill" in sections:
        prefill_section(cache, num_pages, bw, peak, prefill)
        log(f"prefill done ({time.time() - t_start:.0f}s)")
        save()
    if "mosaic" in sections and not SMOKE:  # on the CPU it needs the Mosaic GPU interpreter (tests/pallas_kernels cover it)
        mosaic_section(cache, num_pages, bw, peak, prefill)
        log(f"mosaic prefill done ({time.time() - t_start:.0f}s)")
        save()
    del cache
    if "kv_write" in sections:
        kv_write_section(num_pages, bw)

    log("\n" + HEADER)
    for r in RESULTS["rows"]:
        log(fmt(r))
    RESULTS["wall_s"] = time.time() - t_start
    save()
    log(f"wrote {os.path.join(a.out, 'kernels.json')}  total {RESULTS['wall_s']:.0f}s")


if __name__ == "__main__":
    main()
