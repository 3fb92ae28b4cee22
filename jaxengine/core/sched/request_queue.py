"""The scheduler's waiting queue, in policy order."""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Iterator
from typing import NamedTuple

from jaxengine.core.request import Request

POLICIES = ("fcfs", "priority")


class _Entry(NamedTuple):
    """A heap entry: compared by its fields in order (`seq` breaks ties before `request`)."""

    priority: int
    arrival_time: float
    seq: int
    request: Request


class RequestQueue:
    """FCFS deque, or a heap on (priority, arrival, seq) under the priority policy (lower
    priority values first, vLLM's convention)."""

    def __init__(self, policy: str) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be 'fcfs' or 'priority', got {policy!r}")
        self.fcfs = policy == "fcfs"
        self._deque: deque[Request] = deque()
        self._heap: list[_Entry] = []
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._deque) if self.fcfs else len(self._heap)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._deque) if self.fcfs else (e.request for e in sorted(self._heap))

    def add(self, req: Request) -> None:
        if self.fcfs:
            self._deque.append(req)
        else:
            heapq.heappush(self._heap, _Entry(req.priority, req.arrival_time, next(self._seq), req))

    def add_front(self, req: Request) -> None:
        """A preempted request: front under FCFS; under priority its key decides."""
        if self.fcfs:
            self._deque.appendleft(req)
        else:
            self.add(req)

    def peek(self) -> Request:
        return self._deque[0] if self.fcfs else self._heap[0].request

    def pop(self) -> Request:
        return self._deque.popleft() if self.fcfs else heapq.heappop(self._heap).request

    def remove(self, req: Request) -> None:  # O(n): aborts are rare
        if self.fcfs:
            self._deque.remove(req)
        else:
            self._heap = [e for e in self._heap if e.request is not req]
            heapq.heapify(self._heap)
