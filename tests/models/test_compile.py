"""``torch.compile`` of echofast's models: each traces into ONE graph (no graph break, no host-side
memo or dispatch lookups inside the traced region) and computes what the eager modules compute.
The ``eager`` backend runs dynamo's tracing without inductor's code generation (fast on CPU)."""

from __future__ import annotations

import torch
import torch._dynamo

from echofast.models import LIDM, LVDM, VAE
from echofast.models.tiny import TINY_CONFIGS
from echofast.nn.embeddings import sampling_cache
from echofast.ops import use_backend


def _traced(fn, *args, **kwargs):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    out = torch.compile(fn, backend="eager", dynamic=False)(*args, **kwargs)
    counters = torch._dynamo.utils.counters
    return out, dict(counters["graph_break"]), counters["stats"]["unique_graphs"]


def _models():
    torch.manual_seed(0)
    lvdm = LVDM.from_config(TINY_CONFIGS["lvdm"]).eval()
    lidm = LIDM.from_config(TINY_CONFIGS["lidm"]).eval()
    vae = VAE.from_config(TINY_CONFIGS["vae"]).eval()
    for m in (lvdm, lidm, vae):  # random norms: exercise the affine paths
        for name, p in m.named_parameters():
            if "norm" in name:
                p.data.normal_(0.5 if name.endswith("weight") else 0.0, 0.2)
    return lvdm, lidm, vae


def test_models_trace_into_one_graph():
    """The LVDM under an active sampling memo (bypassed while tracing), the LIDM without."""
    lvdm, lidm, vae = _models()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 8, 8, 8, generator=g)
    ehs, ids, t = torch.rand(2, 1, 1, generator=g), torch.zeros(2, 1), torch.tensor(900)
    img = torch.randn(3, 4, 8, 8, generator=g)
    z = torch.randn(2, vae.config.latent_channels, 4, 4, generator=g)
    calls = [
        ("lvdm", lvdm, lambda m: m(x, t, encoder_hidden_states=ehs, added_time_ids=ids).sample),
        ("lidm", lidm, lambda m: m(img, t).sample),
        ("vae", vae, lambda m: m.decode(z).sample),
    ]
    with torch.no_grad():
        for name, model, call in calls:
            ref = call(model)
            ctx = sampling_cache(model) if name == "lvdm" else torch.no_grad()
            with ctx:
                out, breaks, graphs = _traced(call, model)
            assert not breaks, (name, list(breaks))
            assert graphs == 1, name
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_per_sample_timesteps_trace_into_one_graph():
    """As training calls the models: a timestep per sample (comparing them for a shared one
    would read them on the host: a graph break), with the eager values."""
    lvdm, lidm, _ = _models()
    g = torch.Generator().manual_seed(2)
    img, t = torch.randn(3, 4, 8, 8, generator=g), torch.tensor([3, 500, 999])
    x = torch.randn(3, 8, 8, 8, 8, generator=g)
    ehs, ids = torch.rand(3, 1, 1, generator=g), torch.zeros(3, 1)
    calls = [
        (lidm, lambda m: m(img, t).sample),
        (lvdm, lambda m: m(x, t, encoder_hidden_states=ehs, added_time_ids=ids).sample),
        (lidm, lambda m: m(img, torch.tensor([7, 7, 7])).sample),  # equal, not expanded
    ]
    for model, call in calls:
        ref = call(model)
        out, breaks, graphs = _traced(call, model)
        assert not breaks and graphs == 1, list(breaks)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_the_lvdm_runs_under_aot_eager():
    """aot_eager (the backend that narrows a compile bug down to AOT autograd) runs the graph
    with strides its tracing did not predict; CPU's native_group_norm refused them."""
    lvdm, _, _ = _models()
    g = torch.Generator().manual_seed(3)
    x, ehs, ids = torch.randn(1, 4, 8, 8, 8, generator=g), torch.rand(1, 1, 1), torch.zeros(1, 1)
    torch._dynamo.reset()
    with torch.no_grad():
        ref = lvdm(x, 5, encoder_hidden_states=ehs, added_time_ids=ids).sample
        compiled = torch.compile(lvdm, backend="aot_eager", dynamic=False)
        out = compiled(x, 5, encoder_hidden_states=ehs, added_time_ids=ids).sample
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_use_backend_is_not_read_while_tracing():
    """A ``use_backend`` block is a ContextVar, which dynamo cannot trace: inside a compiled
    region the ops choose automatically (documented), and the call still traces in one graph."""
    _, lidm, _ = _models()
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad(), use_backend("torch"):
        ref = lidm(x, torch.tensor(10)).sample
        out, breaks, graphs = _traced(lambda m: m(x, torch.tensor(10)).sample, lidm)
    assert not breaks and graphs == 1
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
