"""The engine: the step loop (core.py), its in-process and asynchronous front ends, the
engine process and its client link, input/output processing, detokenizer, data parallel."""
