"""Test-suite setup.

Without a GPU, Triton kernels run under the interpreter: TRITON_INTERPRET must be set before any
``@triton.jit`` decorator runs, i.e. before maca_kernels is imported. With a GPU the kernels compile
for real, the GPU tier runs, and the interpreter tests skip (run them with TRITON_INTERPRET=1).
"""

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))  # tests/helpers.py
