"""flmjax: Flow Language Models (FLM) and one-step Flow Map Language Models (FMLM) in JAX."""

import os

# On CPUs, XLA runs the noise factor's Cholesky factorisation through LAPACK (OpenBLAS),
# whose own threads then compete with XLA's for the cores: the factorisation of a 256 x 256
# matrix took about 50 ms inside the training step instead of under 1 ms. One OpenBLAS
# thread avoids that. It must be set before OpenBLAS loads (a process that imported numpy
# or JAX before flmjax should set it itself); an explicit setting is kept.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
