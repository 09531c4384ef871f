"""The LLM service, its backends and the model registry."""

import os

# llama.cpp's CPU backend is built with OpenMP, and libgomp spins at every barrier for ~3 ms
# (GOMP_SPINCOUNT 300,000) before it sleeps. Next to a busy process on the same cores that spin
# holds a core while the thread it waits for is descheduled, and throughput falls far below a
# fair share. Sleeping at once (OMP_WAIT_POLICY=PASSIVE) halves throughput when alone: a step has
# hundreds of barriers, each then a futex wake. ~10 µs of spinning (1,000) keeps the speed alone
# and a near-fair share next to a neighbour (bench/neighbour.py; figures in bench/RESULTS.md).
# It must be set before libgomp loads, i.e. before the first `import llama_cpp`, which only
# modules of this package do; an operator's own OpenMP wait settings win.
if "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "1000"
