"""The runner's persistent per-request rows, kept between steps.

Each running request owns a slot: a row of the block-table array and a row of the static
sampling table (jaxengine.sample.metadata.StaticSampling). Both are written when the
request is admitted (the block table again only when it gets new blocks), so a step reads
all its requests' rows with one indexing call per table instead of rebuilding them.
Slot 0 is the padding row: null pages, neutral sampling.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxengine.core.sched.output import ScheduledRequest
from jaxengine.sample.metadata import StaticSampling


@dataclasses.dataclass
class RequestRow:
    """What the runner keeps per running request between steps."""

    slot: int  # its row of InputBatch.tables and .static (0 is the padding row)
    num_blocks: int  # how much of its block table is written there
    special: bool  # SamplingParams.has_per_step_work
    prompt_logprobs: bool  # it answers prompt_logprobs (the first sample of its request)


class InputBatch:
    def __init__(self, max_num_seqs: int, max_pages: int):
        self.rows: dict[str, RequestRow] = {}  # request id -> its row
        self.tables = np.zeros((max_num_seqs + 1, max_pages), np.int32)  # [slots, max_pages] block ids
        self.static = StaticSampling.neutral(max_num_seqs + 1)  # [slots] per field
        self._free_slots = list(range(max_num_seqs, 0, -1))

    def release(self, request_id: str) -> None:
        """Free a finished or preempted request's slot (a no-op for one without)."""
        if (row := self.rows.pop(request_id, None)) is not None:
            self._free_slots.append(row.slot)

    def update(self, s: ScheduledRequest, seeds: dict[str, int]) -> RequestRow:
        """The request's row, created when it is new (or admitted again) and its block table
        extended by the blocks it got since the last step."""
        rid = s.request.request_id
        row = self.rows.get(rid)
        if row is None or s.is_new:
            if row is not None:
                self._free_slots.append(row.slot)
            p = s.request.sampling_params
            prompt_lp = p.prompt_logprobs is not None and s.request.sample_index == 0
            row = self.rows[rid] = RequestRow(self._take_slot(), 0, p.has_per_step_work, prompt_lp)
            self.tables[row.slot] = 0
            self.static.write(row.slot, p, seeds[rid])
        if len(s.block_ids) != row.num_blocks:
            self.tables[row.slot, row.num_blocks : len(s.block_ids)] = s.block_ids[row.num_blocks :]
            row.num_blocks = len(s.block_ids)
        return row

    def _take_slot(self) -> int:
        if not self._free_slots:  # more live rows than max_num_seqs (not expected): grow
            n = len(self.tables)
            self.tables = np.concatenate([self.tables, np.zeros_like(self.tables)])
            self.static = self.static.extended(n)
            self._free_slots = list(range(2 * n - 1, n - 1, -1))
        return self._free_slots.pop()
