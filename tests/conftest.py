"""Process-wide settings that must be in place before JAX starts its CPU backend."""

import os

# JAX's Mosaic GPU interpreter runs each simulated warpgroup as its own XLA computation whose
# barrier waits block inside host callbacks, and those callbacks run on XLA:CPU's client
# thread pool, sized from NPROC (else the core count). With 2 cores the pool filled with
# blocked waits and the kernel tests deadlocked intermittently (always with NPROC=1).
os.environ.setdefault("NPROC", str(max(8, os.cpu_count() or 1)))
