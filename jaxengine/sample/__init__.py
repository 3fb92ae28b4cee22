"""On-device sampling (sampler.py) and its per-row tensors, built on the host (metadata.py)."""
