"""The mixture-of-experts feed-forward (Mixtral, Qwen2-MoE, Qwen3-MoE): router, dispatch by
expert, grouped expert GEMMs, combine. The rest of those networks is the Llama-family decoder
(models/llama), which picks this block per layer from ModelConfig.moe."""
