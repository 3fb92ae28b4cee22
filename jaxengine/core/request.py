"""`Request`: the host-side state of one sequence as it moves through the scheduler."""

from __future__ import annotations

import dataclasses
import enum
import time

from jaxengine.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    """Ordered so that `status > PREEMPTED` means finished (one comparison per check)."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH_CAPPED = 4
    FINISHED_ABORTED = 5

    @property
    def is_finished(self) -> bool:
        return self > RequestStatus.PREEMPTED

    @property
    def finish_reason(self) -> str | None:
        """The OpenAI/vLLM finish_reason string, or None while unfinished."""
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH_CAPPED: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


def sample_request_ids(request_id: str, n: int) -> list[str]:
    """The ids of a request's samples: its own when n == 1, else "<id>-<i>" (`Request.fan_out`)."""
    return [request_id] if n == 1 else [f"{request_id}-{i}" for i in range(n)]


class Request:
    """One sequence. Tokens only ever get appended, so block hashes computed once stay valid.

    `num_computed_tokens` counts tokens whose KV is in the cache (prefix-cache hits
    included); `num_tokens - num_computed_tokens` is what is left to run. The last
    sampled token is known but not computed until the next step.
    """

    __slots__ = (
        "request_id",
        "prompt_token_ids",
        "sampling_params",
        "arrival_time",
        "priority",
        "eos_token_ids",
        "cache_salt",
        "parent_request_id",
        "sample_index",
        "max_tokens",
        "output_token_ids",
        "all_token_ids",
        "num_computed_tokens",
        "num_pending",
        "num_cached_tokens",
        "num_preemptions",
        "status",
        "stop_reason",
        "block_hashes",
        "structured_output",
    )

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams | None = None,
        *,
        arrival_time: float | None = None,
        priority: int = 0,
        eos_token_id: int | tuple[int, ...] | None = None,
        cache_salt: str | None = None,
        parent_request_id: str | None = None,
        sample_index: int = 0,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params if sampling_params is not None else SamplingParams()
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        # Lower value = served first under the "priority" policy (vLLM's convention).
        self.priority = priority
        # Every id that ends the request as EOS (Llama 3 instruct has three).
        if eos_token_id is None:
            self.eos_token_ids: tuple[int, ...] = ()
        elif isinstance(eos_token_id, int):
            self.eos_token_ids = (eos_token_id,)
        else:
            self.eos_token_ids = tuple(eos_token_id)
        # Mixed into the first block's hash: requests with different salts never share KV.
        self.cache_salt = cache_salt
        # Set on the children of an n > 1 request (see `fan_out`).
        self.parent_request_id = parent_request_id
        self.sample_index = sample_index
        # Resolved by the scheduler at admission when sampling_params.max_tokens is None.
        self.max_tokens: int | None = self.sampling_params.max_tokens
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(self.prompt_token_ids)
        self.num_computed_tokens = 0
        # Tokens sampled on the device whose ids the host does not know yet (async scheduling:
        # the next step is scheduled before this one's tokens come back).
        self.num_pending = 0
        self.num_cached_tokens = -1  # prefix-cache hit tokens at first schedule; -1 = not yet
        self.num_preemptions = 0
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None  # the stop token id or stop string
        self.block_hashes: list[bytes] = []  # one per FULL block, filled lazily by the KV manager
        # A constrained request's grammar state (jaxengine.structured_output.GrammarRequest), set
        # by the engine when it is added; the scheduler admits it once its grammar is compiled.
        self.structured_output = None

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status > RequestStatus.PREEMPTED

    def append_output_token_ids(self, token_ids: int | list[int]) -> None:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        self.output_token_ids.extend(token_ids)
        self.all_token_ids.extend(token_ids)

    def fan_out(self) -> list[Request]:
        """Split an `n > 1` request into n independent n=1 children.

        Children share the prompt's FULL blocks through the prefix cache (blocks are
        registered as soon as they are scheduled, so children admitted in the same step
        hit the first child's blocks); each child has its own last, partly filled block
        ("separate last blocks", no copy-on-write). With a seed, child i gets seed + i so
        the samples differ but stay reproducible. Ids are "<id>-<i>"; the engine joins the
        children's outputs back by `parent_request_id` / `sample_index`.
        """
        params = self.sampling_params
        children = []
        for i, child_id in enumerate(sample_request_ids(self.request_id, params.n)):
            seed = None if params.seed is None else (params.seed + i) % 2**64
            child_params = dataclasses.replace(params, n=1, seed=seed)
            children.append(
                Request(
                    child_id,
                    self.prompt_token_ids,
                    child_params,
                    arrival_time=self.arrival_time,
                    priority=self.priority,
                    eos_token_id=self.eos_token_ids,
                    cache_salt=self.cache_salt,
                    parent_request_id=self.request_id,
                    sample_index=i,
                )
            )
        return children

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.name}, "
            f"num_tokens={self.num_tokens}, num_computed_tokens={self.num_computed_tokens})"
        )
