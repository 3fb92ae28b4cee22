"""The device side: model runner (model_runner), step inputs and their packing (step_inputs,
packing), the persistent per-request rows (input_batch), shape buckets, warm-up and the
compilation cache (compilation), the attention function (attention_backend), KV cache
capacity and sizing (kv_capacity, kv_sizing), multi-host step broadcast (multihost)."""
