"""Bounded loopback load: 200 concurrent streaming calls, some cancelled by the client,
some with short deadlines. Calls that are not cut off finish with the right reason and
token count; afterwards nothing runs or waits in the engine, every KV block is free, and no
thread or asyncio task is left behind."""

from __future__ import annotations

import asyncio
import random
import threading
import time

import grpc

from serving.generated import engine_pb2 as pb
from serving.generated import engine_pb2_grpc
from tests.serving.conftest import request, wait_idle

NUM_CALLS = 200


async def _server_tasks() -> int:
    return len(asyncio.all_tasks()) - 1  # minus this one


async def _one(stub, rng: random.Random, i: int) -> tuple[str, object]:
    kind = rng.choices(["normal", "cancel", "deadline"], weights=[6, 2, 2])[0]
    n = rng.choice([1, 1, 1, 2])
    max_tokens = rng.randint(1, 24) if kind == "normal" else rng.randint(40, 120)
    prompt = [rng.randrange(512) for _ in range(rng.randint(1, 30))]
    req = request(prompt, n=n, max_tokens=max_tokens, ignore_eos=True, temperature=rng.choice([0.0, 0.8]),
                  seed=i, request_id=f"load-{i}")
    timeout = rng.uniform(0.01, 1.5) if kind == "deadline" else 120
    call = stub.Generate(req, timeout=timeout)
    tokens: dict[int, int] = {}
    reasons: dict[int, int] = {}
    cancel_after = rng.randint(0, 3)
    received = 0
    try:
        while True:
            if kind == "cancel" and received >= cancel_after:
                call.cancel()
                break
            resp = await call.read()
            if resp is grpc.aio.EOF:
                break
            received += 1
            for d in resp.outputs:
                tokens[d.index] = tokens.get(d.index, 0) + len(d.token_ids)
                if d.finish_reason:
                    reasons[d.index] = d.finish_reason
    except grpc.aio.AioRpcError:
        pass
    except asyncio.CancelledError:
        pass
    code = await call.code()
    return kind, (code, n, max_tokens, tokens, reasons)


async def _run_load(address: str, seed: int = 0):
    rng = random.Random(seed)
    async with grpc.aio.insecure_channel(address) as ch:
        stub = engine_pb2_grpc.EngineServiceStub(ch)
        return await asyncio.wait_for(asyncio.gather(*(_one(stub, rng, i) for i in range(NUM_CALLS))), timeout=240)


def test_200_concurrent_calls_with_cancels_and_deadlines(server, async_engine):
    wait_idle(async_engine)
    threads_before = threading.active_count()
    tasks_before = server.run(_server_tasks())
    t0 = time.monotonic()
    results = asyncio.run(_run_load(server.address))
    elapsed = time.monotonic() - t0
    counts = {"normal": 0, "cancel": 0, "deadline": 0, "deadline_hit": 0}
    for kind, (code, n, max_tokens, tokens, reasons) in results:
        counts[kind] += 1
        if kind == "normal" or (kind == "deadline" and code == grpc.StatusCode.OK):
            assert code == grpc.StatusCode.OK
            assert reasons == {i: pb.FINISH_REASON_LENGTH for i in range(n)}
            assert tokens == {i: max_tokens for i in range(n)}
        elif kind == "cancel":
            assert code == grpc.StatusCode.CANCELLED
        else:
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED
            counts["deadline_hit"] += 1
    assert counts["normal"] > 80 and counts["cancel"] > 20 and counts["deadline_hit"] > 10, counts

    stats = wait_idle(async_engine, timeout=15)
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0 and not stats["unfinished"], stats
    assert stats["used_blocks"] == 0 and stats["free_blocks"] == stats["total_blocks"], stats
    assert async_engine.num_unfinished == 0
    servicer = server.server.servicer
    assert not servicer.active and servicer.num_pending == 0

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (threading.active_count() > threads_before
                                           or server.run(_server_tasks()) > tasks_before):
        time.sleep(0.1)
    assert threading.active_count() <= threads_before, [t.name for t in threading.enumerate()]
    assert server.run(_server_tasks()) <= tasks_before
    print(f"{NUM_CALLS} calls in {elapsed:.1f}s: {counts}")


def test_call_cancelled_while_its_request_is_being_added(async_engine):
    """A caller cancelled before the engine thread picks up its request must neither kill the
    engine thread (setting a result on a cancelled future) nor leave the request running."""
    from jaxengine import SamplingParams

    async def scenario():
        hold = async_engine.call(lambda e: time.sleep(0.5))  # the engine thread is busy
        task = asyncio.ensure_future(_consume(async_engine.generate([1, 2, 3], SamplingParams(max_tokens=50))))
        await asyncio.sleep(0.1)
        task.cancel()
        stats_fut = async_engine.call(lambda e: e.stats())
        stats_fut.cancel()  # also a cancelled call() future
        await asyncio.wait_for(asyncio.wrap_future(hold), 10)
        # Before the fix the engine thread died here and this never answered: bounded wait.
        return await asyncio.wait_for(asyncio.wrap_future(async_engine.call(lambda e: e.has_unfinished_requests())), 10)

    async def _consume(gen):
        async for _ in gen:
            pass

    assert asyncio.run(scenario()) is False
    assert async_engine._thread.is_alive()
    assert wait_idle(async_engine)["used_blocks"] == 0
    assert async_engine.num_unfinished == 0  # its stream was dropped too
