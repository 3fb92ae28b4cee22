"""Host-side bookkeeping: requests, the block pool, the KV cache manager; sched/ holds the
scheduler."""
