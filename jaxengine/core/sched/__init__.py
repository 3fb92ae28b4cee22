"""The continuous-batching scheduler, its output types (output.py) and its waiting queue
(request_queue.py)."""
