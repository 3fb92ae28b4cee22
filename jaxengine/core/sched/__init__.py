"""The continuous-batching scheduler and its output types."""
