"""The LLM service, its backends and the model registry."""

import os

# llama.cpp's CPU backend is built with OpenMP, and libgomp spins at every barrier for ~3 ms
# (GOMP_SPINCOUNT 300,000) before it sleeps. Next to any busy process on the same cores that spin
# holds a core while the thread it waits for is descheduled: measured here, 8 streams fell from
# 131 to 2.2 tokens/s with one busy neighbour. Passive waiting costs nothing measurable alone
# (bench/neighbour.py). It must be set before libgomp loads, i.e. before the first
# `import llama_cpp`, which only modules of this package do; an operator's own value wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
