"""The Llama family (Llama 2/3.x, Mistral, Qwen2/2.5, Qwen3): model, layers, attention, rope.
Families added later get a folder beside this one and share what layers they can."""
