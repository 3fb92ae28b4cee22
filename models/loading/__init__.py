"""From checkpoint files to placed parameters: safetensors reading, fused weights, the
loader (HF checkpoints and Orbax), and random-weight presets for benchmarks."""
