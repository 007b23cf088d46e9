"""Test-suite defaults: deterministic, single-threaded-friendly CPU runs."""

import torch

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
