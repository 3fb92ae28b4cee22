"""On-device sampling (sampler.py) and its per-row tensors."""
