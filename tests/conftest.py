"""Test-suite defaults: deterministic, single-threaded-friendly CPU runs."""

import os

import torch

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

# The Triton interpreter tests need TRITON_INTERPRET=1 from process start;
# tests/test_triton_suite.py runs them in such a process.
collect_ignore = [] if os.environ.get("TRITON_INTERPRET") == "1" else ["triton"]
