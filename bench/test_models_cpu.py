"""pytest-benchmark view of bench/models_cpu.py: one group per model, diffusers vs echofast.

    pytest bench/test_models_cpu.py --benchmark-only [--benchmark-group-by=group]

Same full configs, random weights and inputs as the script; pytest-benchmark's table shows both
implementations of each model side by side. For the alternating A/B median ratio use the script.
"""

from __future__ import annotations

import pytest
import torch
from models_cpu import make_cases

MODELS = ["vae_decode", "vae_encode", "lidm", "lvdm"]


@pytest.fixture(scope="module")
def cases():
    return {c.name: c for c in make_cases(MODELS, batch=2, frames=8)}


@pytest.mark.parametrize("impl", ["diffusers", "echofast"])
@pytest.mark.parametrize("model", MODELS)
def test_forward(benchmark, cases, model, impl):
    case = cases[model]
    fn = case.reference if impl == "diffusers" else case.candidate
    benchmark.group = model
    benchmark.extra_info["shape"] = case.shape
    with torch.no_grad():
        benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=1)
