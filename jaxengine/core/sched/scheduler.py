"""The continuous-batching scheduler: which tokens of which requests run in each step.

No prefill/decode phases. Every request has `num_tokens` and `num_computed_tokens`; each
step hands out a token budget so that computed catches up with known:

1. running requests first, in admission order (a decode takes 1 token; a request still
   in the middle of a chunked prefill takes as much as the budget allows);
2. then waiting requests in policy order (FCFS, or `priority` then arrival), each
   after a prefix-cache lookup (hit tokens count as computed), with the prompt chunked
   under the remaining budget. A waiting request that cannot get blocks stops
   admission (no skipping ahead, so the head of the queue cannot starve).

When a running request cannot get a block, the newest running request (under
"priority": the lowest priority, newest first) is preempted by recompute: its blocks
are freed, it keeps its generated tokens and goes back to the front of the waiting
queue with `num_computed_tokens = 0` (its own blocks usually come back as prefix hits).
The oldest running request is never preempted for another one, so it always makes
progress: no livelock. Admission rejects any request that could not run alone in the
pool, so that progress is always possible.

Protocol: `schedule()` then exactly one `update(output, sampled)` per step.

`n > 1`: the scheduler only takes n == 1 requests. The engine fans a request out with
`Request.fan_out()` into n children that share the prompt's full blocks through the
prefix cache and each own a separate last (partial) block; no copy-on-write.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from jaxengine.core.kv_cache_manager import KVCacheManager
from jaxengine.core.request import Request, RequestStatus
from jaxengine.core.sched.output import ScheduledRequest, SchedulerOutput, SchedulerStats
from jaxengine.core.sched.request_queue import POLICIES, RequestQueue

__all__ = ["ScheduledRequest", "Scheduler", "SchedulerConfig", "SchedulerOutput", "SchedulerStats"]


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 4096
    block_size: int = 16
    num_blocks: int = 4096
    enable_prefix_caching: bool = True
    policy: str = "fcfs"  # "fcfs" | "priority"
    # Cap on tokens one request may take in a step, so one long prompt cannot eat the
    # whole budget and stall everyone's decodes (None: no cap).
    long_prefill_token_threshold: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "block_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if not isinstance(self.num_blocks, int) or self.num_blocks < 2:
            raise ValueError(
                f"num_blocks must be an integer >= 2 (block 0 is reserved), got {self.num_blocks!r}"
            )
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                f"max_num_seqs ({self.max_num_seqs}) so every running request can decode"
            )
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be 'fcfs' or 'priority', got {self.policy!r}")
        t = self.long_prefill_token_threshold
        if t is not None and (not isinstance(t, int) or t < 1):
            raise ValueError(f"long_prefill_token_threshold must be None or >= 1, got {t!r}")


class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.kv_cache_manager = KVCacheManager(
            config.num_blocks, config.block_size, config.enable_prefix_caching
        )
        self.requests: dict[str, Request] = {}  # unfinished requests by id
        self.waiting = RequestQueue(config.policy)
        self.running: list[Request] = []  # admission order: the newest is last
        self.finished_req_ids: set[str] = set()  # since the last schedule()
        self.num_preemptions = 0
        # Usable blocks for one request: everything but the null block.
        self._max_blocks_per_request = config.num_blocks - 1

    # ---------------------------------------------------------------- admission

    def add_request(self, request: Request) -> None:
        """Queue a request; raises ValueError (never hangs) if it could not ever run."""
        cfg = self.config
        rid = request.request_id
        if rid in self.requests:
            raise ValueError(f"request id {rid!r} is already in the scheduler")
        if request.status != RequestStatus.WAITING or request.num_computed_tokens:
            raise ValueError(f"request {rid!r} must be new (WAITING, nothing computed)")
        if request.sampling_params.n != 1:
            raise ValueError(
                f"request {rid!r} has n={request.sampling_params.n}; the scheduler takes n=1 "
                "requests, fan it out first with Request.fan_out()"
            )
        num_prompt = request.num_tokens
        if num_prompt == 0:
            raise ValueError(f"request {rid!r}: the prompt is empty; give at least one token")
        if num_prompt >= cfg.max_model_len:
            raise ValueError(
                f"request {rid!r}: prompt has {num_prompt} tokens, which leaves no room to "
                f"generate under max_model_len={cfg.max_model_len}; shorten the prompt"
            )
        if request.max_tokens is None:
            request.max_tokens = cfg.max_model_len - num_prompt
        if num_prompt + request.max_tokens > cfg.max_model_len:
            raise ValueError(
                f"request {rid!r}: prompt ({num_prompt} tokens) + max_tokens "
                f"({request.max_tokens}) = {num_prompt + request.max_tokens} exceeds "
                f"max_model_len={cfg.max_model_len}; lower max_tokens or shorten the prompt"
            )
        # The last sampled token's KV is never computed.
        max_kv_tokens = num_prompt + request.max_tokens - 1
        blocks_needed = -(-max_kv_tokens // cfg.block_size)
        if blocks_needed > self._max_blocks_per_request:
            raise ValueError(
                f"request {rid!r} may need {blocks_needed} KV blocks ({max_kv_tokens} tokens "
                f"of {cfg.block_size}) but the pool has only {self._max_blocks_per_request}; "
                "lower max_tokens or give the KV cache more memory"
            )
        self.requests[rid] = request
        self.waiting.add(request)

    # ---------------------------------------------------------------- one step

    def decode_steps(self, max_steps: int) -> int:
        """`max_steps` if the next step can run that many decode steps in one program: every
        running request decodes (none mid-prefill), has room for that many more tokens and
        needs no per-step sampling work, and no waiting request could be admitted now (none
        waits, or max_num_seqs are running: then a seat that frees inside a run is filled
        after it); else 1. Pass the result to `schedule`."""
        running = self.running
        if max_steps == 1 or not running:
            return 1
        if self.waiting and len(running) < self.config.max_num_seqs:
            return 1
        limit = self.config.max_model_len - max_steps
        for req in running:
            n = len(req.all_token_ids) + req.num_pending  # with the tokens still on the device
            p = req.sampling_params
            # Any logprobs (even 0: the chosen token's) come from single steps only.
            if (req.num_computed_tokens != n - 1 or n > limit or p.has_per_step_work or p.logprobs is not None
                    or p.prompt_logprobs is not None):
                return 1
        return max_steps

    def schedule(self, num_steps: int = 1) -> SchedulerOutput:
        """`num_steps` > 1: a multi-step decode (`decode_steps` has checked that every
        running request decodes): each request gets KV slots for `num_steps` tokens, and
        nobody is admitted from waiting in this step."""
        cfg = self.config
        lookahead = num_steps - 1
        max_model_len = cfg.max_model_len
        kv = self.kv_cache_manager
        allocate = kv.allocate_slots
        room = kv.room.get
        tables = kv.req_to_block_ids
        budget = cfg.max_num_batched_tokens
        threshold = cfg.long_prefill_token_threshold
        scheduled: list[ScheduledRequest] = []
        append = scheduled.append
        preempted: list[str] = []
        running = self.running

        # 1. Running requests, oldest first. (Hot loop: kept free of calls it can avoid.)
        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            start = req.num_computed_tokens
            num_tokens = len(req.all_token_ids)
            pending = req.num_pending
            if pending:  # async scheduling: the last token is on the device, not yet here
                if len(req.output_token_ids) + pending >= req.max_tokens or num_tokens + pending >= max_model_len:
                    i += 1  # its final token is already sampled: nothing left to run
                    continue
                num_tokens += pending
            num_new = num_tokens - start
            if num_new > 1:  # still prefilling (chunked): clamp
                if threshold is not None and num_new > threshold:
                    num_new = threshold
                if num_new > budget:
                    num_new = budget
            need = num_new + lookahead  # KV slots this step writes
            # Inlined fast path of allocate_slots: most decodes need no block and fill none.
            if start + need <= room(req.request_id, -1):
                new_ids = ()
            else:
                new_ids = allocate(req, need)
            if new_ids is None:
                new_ids = self._preempt_for(req, need, scheduled, preempted)
                if new_ids is None:  # req itself was preempted: nobody after it can run
                    break
                budget = cfg.max_num_batched_tokens - sum(x.num_tokens for x in scheduled)
                if cfg.policy != "fcfs":
                    i = running.index(req)  # a victim before req shifted the list
            append(
                ScheduledRequest(
                    req,
                    num_new,
                    start,
                    tables[req.request_id],
                    new_ids,
                    start + num_new == num_tokens,
                    False,
                )
            )
            budget -= num_new
            i += 1

        # 2. Waiting requests (not after a preemption: blocks are short this step).
        waiting = self.waiting
        compiling: list[Request] = []  # constrained requests whose grammar is not compiled yet
        while not preempted and not lookahead and budget > 0 and waiting and len(running) < cfg.max_num_seqs:
            req = waiting.peek()
            if req.structured_output is not None and not req.structured_output.is_ready():
                compiling.append(waiting.pop())  # stays out of the batch; the others go on
                continue
            hits, num_hit = kv.get_computed_blocks(req)
            num_tokens = len(req.all_token_ids)
            num_new = num_tokens - num_hit
            if threshold is not None and num_new > threshold:
                num_new = threshold
            if num_new > budget:
                num_new = budget
            new_ids = allocate(req, num_new, hits)
            if new_ids is None:
                break
            waiting.pop()
            kv.block_pool.record_prefix_lookup(num_tokens, num_hit)
            req.num_computed_tokens = num_hit
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_hit
            req.status = RequestStatus.RUNNING
            running.append(req)
            append(
                ScheduledRequest(
                    req,
                    num_new,
                    num_hit,
                    tables[req.request_id],
                    new_ids,
                    num_hit + num_new == num_tokens,
                    True,
                )
            )
            budget -= num_new
        for req in reversed(compiling):
            waiting.add_front(req)

        # Advance at schedule time (as vLLM V1), so the next schedule() may run before this
        # step's update(): the sampled token becomes a pending one until update() brings it.
        for s in scheduled:
            req = s.request
            req.num_computed_tokens += s.num_tokens + lookahead
            if s.sample:
                req.num_pending += num_steps
        finished, self.finished_req_ids = self.finished_req_ids, set()
        return SchedulerOutput(
            scheduled, cfg.max_num_batched_tokens - budget, preempted, finished, num_steps
        )

    def _preempt_for(
        self,
        req: Request,
        num_new: int,
        scheduled: list[ScheduledRequest],
        preempted: list[str],
    ) -> tuple[int, ...] | None:
        """Preempt victims until `req` gets its blocks; None if `req` itself was preempted."""
        while True:
            victim = self._pick_victim()
            self._preempt(victim, scheduled)
            preempted.append(victim.request_id)
            if victim is req:
                return None
            new_ids = self.kv_cache_manager.allocate_slots(req, num_new)
            if new_ids is not None:
                return new_ids

    def _pick_victim(self) -> Request:
        """The newest running request (priority policy: lowest priority, then newest)."""
        if self.config.policy == "fcfs":
            return self.running[-1]
        return max(reversed(self.running), key=lambda r: (r.priority, r.arrival_time))

    def _preempt(self, victim: Request, scheduled: list[ScheduledRequest]) -> None:
        """Preempt by recompute: free its blocks, back to the front of waiting."""
        self.running.remove(victim)
        self.kv_cache_manager.free(victim)
        victim.status = RequestStatus.PREEMPTED
        victim.num_computed_tokens = 0
        victim.num_pending = 0  # a token still on the device is resampled after recompute
        victim.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.add_front(victim)
        # Under "priority" the victim may already be in this step's batch: take it out.
        for j, s in enumerate(scheduled):
            if s.request is victim:
                del scheduled[j]
                break

    def update(
        self, scheduler_output: SchedulerOutput, sampled_token_ids: dict[str, list[int]]
    ) -> list[Request]:
        """Apply a step's results; returns requests that got new tokens or finished.

        (schedule() already advanced num_computed_tokens.) Appends the sampled tokens of requests
        whose step ended at their last token, applies the stop conditions and frees the
        blocks of finished requests. Requests aborted since schedule() are skipped.
        """
        max_model_len = self.config.max_model_len
        RUNNING = RequestStatus.RUNNING
        outputs: list[Request] = []
        any_finished = False
        for s in scheduler_output.scheduled:
            req = s.request
            if req.status != RUNNING:  # aborted, preempted or finished meanwhile
                continue
            if not s.sample:
                continue
            req.num_pending -= scheduler_output.num_steps
            new_tokens = sampled_token_ids.get(req.request_id)
            if not new_tokens:
                continue
            params = req.sampling_params
            out_ids = req.output_token_ids
            all_ids = req.all_token_ids
            grammar = req.structured_output
            for tok in new_tokens:
                out_ids.append(tok)
                all_ids.append(tok)
                # Stop conditions, inlined (this runs for every token of every request).
                num_out = len(out_ids)
                if grammar is not None and (not grammar.accept(tok) or grammar.is_terminated()):
                    # A finished grammar ends the request ("stop"); a token it rejects (only when
                    # the mask left nothing, e.g. min_tokens hiding the one allowed EOS) aborts it.
                    status = (RequestStatus.FINISHED_STOPPED if grammar.is_terminated()
                              else RequestStatus.FINISHED_ABORTED)
                elif num_out >= req.max_tokens or len(all_ids) >= max_model_len:
                    status = RequestStatus.FINISHED_LENGTH_CAPPED
                elif num_out < params.min_tokens:
                    continue
                elif tok in req.eos_token_ids and not params.ignore_eos:
                    status = RequestStatus.FINISHED_STOPPED
                elif tok in params.stop_token_ids:
                    req.stop_reason = tok
                    status = RequestStatus.FINISHED_STOPPED
                else:
                    continue
                self._finish(req, status)
                any_finished = True
                break
            outputs.append(req)
        if any_finished:
            self.running = [r for r in self.running if r.status == RUNNING]
        return outputs

    def _finish(self, req: Request, status: RequestStatus) -> None:
        req.status = status
        self.kv_cache_manager.free(req)
        del self.requests[req.request_id]
        self.finished_req_ids.add(req.request_id)

    def finish_requests(
        self,
        request_ids: str | Iterable[str],
        status: RequestStatus = RequestStatus.FINISHED_ABORTED,
        stop_reason: int | str | None = None,
    ) -> None:
        """Finish requests from outside: aborts at any time, or a stop string matched by
        the engine (status FINISHED_STOPPED, stop_reason the string). Unknown or already
        finished ids are ignored. Blocks are freed now.

        Called between schedule() and update(), the step already handed out must still
        run as scheduled (blocks were registered in the prefix cache at schedule time,
        so their K/V must be written); update() then skips the finished request.
        """
        if not status.is_finished:
            raise ValueError(f"status must be a finished status, got {status.name}")
        if isinstance(request_ids, str):
            request_ids = (request_ids,)
        removed_running = False
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is None:
                continue
            if req.status == RequestStatus.RUNNING:
                removed_running = True
            else:
                self.waiting.remove(req)
            if stop_reason is not None:
                req.stop_reason = stop_reason
            self._finish(req, status)
        if removed_running:
            self.running = [r for r in self.running if r.status == RequestStatus.RUNNING]

    # ---------------------------------------------------------------- queries

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def get_block_ids(self, request_id: str) -> list[int]:
        return self.kv_cache_manager.get_block_ids(request_id)

    def make_stats(self) -> SchedulerStats:
        pool = self.kv_cache_manager.block_pool
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            kv_cache_usage=pool.usage,
            prefix_cache_queries=pool.prefix_cache_queries,
            prefix_cache_hits=pool.prefix_cache_hits,
            num_preemptions=self.num_preemptions,
        )
