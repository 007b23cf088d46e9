"""``echofast.patch`` on single diffusers blocks and small module trees: which call sites it takes,
which it leaves alone (and why), and that every one computes what diffusers computes.

Oracle: the same diffusers modules, unpatched (fp32, random weights and norm affines).
"""

from __future__ import annotations

import functools

import pytest
import torch
from support.models import randomize_norms, rel_err

import echofast
from echofast.patching.report import LeftAlone, PatchReport
from echofast.patching.sites import AttentionProcessor

pytest.importorskip("diffusers")

TOL = 1e-5


def _resnet_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(3, 8, 5, 7, generator=g), torch.randn(3, 6, generator=g)


def _reasons(report: PatchReport) -> set[tuple[str, str, str]]:
    return {(i.path, i.what, i.reason) for i in report.left_alone}


@pytest.mark.parametrize("where", ["norm1", "norm2", "nonlinearity"])
@pytest.mark.parametrize("hook", ["forward_hook", "forward_pre_hook", "instance_forward"])
@torch.no_grad()
def test_resnet_whose_fused_parts_are_hooked_is_left_alone(kit, where, hook):
    """A fused call would skip the hooked norm's / activation's own call: the block is left as
    it is, the hook still fires, and the output is diffusers'."""
    block = kit.resnet()
    x, temb = _resnet_inputs()
    expected = block(x, temb)
    part = getattr(block, where)
    calls = []
    if hook == "instance_forward":  # e.g. accelerate's hooks wrap forward per instance
        original = part.forward

        def forward(*args, **kwargs):
            calls.append(1)
            return original(*args, **kwargs)

        part.forward = functools.update_wrapper(forward, original)
        why = "its forward is wrapped at instance level"
    elif hook == "forward_hook":
        part.register_forward_hook(lambda *a: calls.append(1))
        why = "has forward hooks"
    else:
        part.register_forward_pre_hook(lambda *a: calls.append(1))
        why = "has forward hooks"
    report = echofast.patch(block)
    assert "resnet" not in report.counts()
    ((path, what, reason),) = [r for r in _reasons(report) if r[1] == "ResnetBlock2D"]
    assert path == "" and reason.startswith(f"{where} {why}")
    assert torch.equal(block(x, temb), expected) and calls
    echofast.unpatch(block)


@torch.no_grad()
def test_attention_with_a_hooked_query_projection_is_left_alone():
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(16, heads=2, dim_head=8).eval()
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    seen = []
    attn.to_q.register_forward_hook(lambda *a: seen.append(1))
    expected = attn(x)
    report = echofast.patch(attn)
    assert report.patched == [] and not isinstance(attn.processor, AttentionProcessor)
    assert _reasons(report) == {
        ("", "Attention", "to_q has forward hooks: a fused call would bypass it")
    }
    assert torch.equal(attn(x), expected) and len(seen) == 2
    echofast.unpatch(attn)


@torch.no_grad()
def test_attention_with_spatial_norm_matches_diffusers():
    """A VQ decoder's attention normalises its input with the latent (``temb``)."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = randomize_norms(Attention(32, heads=2, dim_head=16, spatial_norm_dim=3).eval())
    g = torch.Generator().manual_seed(0)
    x, zq = torch.randn(2, 32, 5, 3, generator=g), torch.randn(2, 3, 2, 2, generator=g)
    expected = attn(x, temb=zq)
    # (the spatial norm's own GroupNorm is a site of its own)
    assert echofast.patch(attn).counts() == {"attention": 1, "group_norm": 1}
    got = attn(x, temb=zq)
    assert attn.processor.last_path == "general"
    assert rel_err(got, expected) <= TOL
    echofast.unpatch(attn)


@torch.no_grad()
def test_norms_called_by_fused_sites_are_not_patched_again(kit):
    """The GroupNorms a fused resnet or an attention processor calls itself are theirs; only
    the others become ``group_norm`` sites."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    tree = torch.nn.Sequential(
        kit.resnet(),
        Attention(8, heads=2, dim_head=4, norm_num_groups=4, residual_connection=True),
        torch.nn.GroupNorm(2, 8),
    )
    randomize_norms(tree.eval())
    x, temb = _resnet_inputs()
    expected = tree[2](tree[1](tree[0](x, temb)))
    report = echofast.patch(tree)
    assert report.counts() == {"resnet": 1, "attention": 1, "group_norm": 1}
    assert [s.path for s in report.patched if s.kind == "group_norm"] == ["2"]
    assert rel_err(tree[2](tree[1](tree[0](x, temb))), expected) <= TOL
    echofast.unpatch(tree)


@torch.no_grad()
def test_resnet_dropout_in_training_mode_matches_diffusers(kit):
    """Same seed, same dropout mask: the fused block applies diffusers' dropout before conv2."""
    block = kit.resnet(dropout=0.5).train()
    x, temb = _resnet_inputs()
    torch.manual_seed(11)
    expected = block(x, temb)
    echofast.patch(block)
    torch.manual_seed(11)
    got = block(x, temb)
    assert rel_err(got, expected) <= TOL
    torch.manual_seed(12)
    assert rel_err(block(x, temb), expected) > 1e-3  # the dropout is random indeed
    echofast.unpatch(block)


@torch.no_grad()
def test_forward_bound_while_patched_runs_diffusers_after_unpatch(kit):
    block = kit.resnet()
    x, temb = _resnet_inputs()
    expected = block(x, temb)
    echofast.patch(block)
    bound = block.forward
    echofast.unpatch(block)
    assert torch.equal(bound(x, temb), expected)


@torch.no_grad()
def test_unpatch_keeps_a_processor_set_after_patching():
    from diffusers.models.attention_processor import Attention, AttnProcessor

    attn = Attention(16, heads=2, dim_head=8).eval()
    original = attn.processor
    echofast.patch(attn)
    assert attn.processor is not original
    mine = AttnProcessor()
    attn.set_processor(mine)
    assert echofast.unpatch(attn) is True
    assert attn.processor is mine


def test_report_text_lists_forced_backends_and_groups_left_alone_paths():
    report = PatchReport(
        "UNet2DModel",
        backend={"group_norm": "torch", "attention": "sdpa"},
        left_alone=[LeftAlone(f"m.{i}", "Attention", "custom processor P (kept)") for i in range(4)]
        + [LeftAlone(f"r.{i}", "ResnetBlock2D", "has hooks") for i in range(3)],
    )
    lines = str(report).splitlines()
    assert lines[0] == "echofast.patch(UNet2DModel)"
    assert "  forced backends: attention=sdpa, group_norm=torch" in lines
    assert "    Attention at m.0, m.1, m.2 (+1 more): custom processor P (kept)" in lines
    assert "    ResnetBlock2D at r.0, r.1, r.2: has hooks" in lines
    assert lines[-1] == "  nothing was patched"
    assert "forced backends" not in str(PatchReport("VAE"))


@torch.no_grad()
def test_context_with_another_batch_size_goes_to_diffusers():
    """A context whose batch differs from the queries' is diffusers' business (its processor
    reshapes the queries to the context's batch): the same result, shape included."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(16, cross_attention_dim=6, heads=2, dim_head=8).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 16, generator=g)
    for tokens in (1, 3):
        ctx = torch.randn(1, tokens, 6, generator=g)
        expected = attn(x, ctx)
        echofast.patch(attn)
        got = attn(x, ctx)
        assert attn.processor.last_path == "original"
        assert got.shape == expected.shape and torch.equal(got, expected)
        echofast.unpatch(attn)
