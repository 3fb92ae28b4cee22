"""Host-side bookkeeping: requests and who holds them (request_table: requests as added and
their n > 1 samples), the block pool, the KV cache manager; sched/ holds the scheduler."""
