"""The device side: model runner, step inputs (packing), compilation buckets and warm-up, KV
cache allocation and capacity, multi-host step broadcast."""
