"""``echofast.patch`` on single diffusers blocks and small module trees: which call sites it takes,
which it leaves alone (and why), and that every one computes what diffusers computes.

Oracle: the same diffusers modules, unpatched (fp32, random weights and norm affines).
"""

from __future__ import annotations

import functools
import inspect

import pytest
import torch
import torch.nn.functional as F
from support.models import randomize_norms, rel_err

import echofast
from echofast.patching.report import SITE_KINDS, LeftAlone, PatchReport, Replacement
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


@pytest.mark.parametrize("where", ["to_q", "to_k", "group_norm", "norm_q", "norm_k"])
@torch.no_grad()
def test_attention_with_a_hooked_fused_part_is_left_alone(where):
    """Parts the echofast processor calls itself (the GroupNorm) or skips (q/k on the
    single-key path): a hook on any of them keeps diffusers' processor."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(16, heads=2, dim_head=8, norm_num_groups=4, qk_norm="layer_norm").eval()
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    seen = []
    getattr(attn, where).register_forward_hook(lambda *a: seen.append(1))
    expected = attn(x)
    report = echofast.patch(attn)
    assert "attention" not in report.counts()
    assert not isinstance(attn.processor, AttentionProcessor)
    assert {r for r in _reasons(report) if r[1] == "Attention"} == {
        ("", "Attention", f"{where} has forward hooks: a fused call would bypass it")
    }
    assert torch.equal(attn(x), expected) and len(seen) == 2
    echofast.unpatch(attn)


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({"added_kv_proj_dim": 8}, "added key/value projections"),
        ({"kv_heads": 1}, "grouped key/value heads"),
        ({"pre_only": True}, "no to_k/to_v/to_out projections"),
    ],
    ids=["added_kv", "kv_heads", "pre_only"],
)
def test_attention_variants_the_processor_does_not_cover_are_left_alone(options, reason):
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    attn = Attention(16, heads=2, dim_head=8, **options).eval()
    report = echofast.patch(attn)
    assert report.patched == [] and type(attn.processor) is AttnProcessor2_0
    assert _reasons(report) == {("", "Attention", reason)}
    echofast.unpatch(attn)


def _plain_norm2(block: torch.nn.Module) -> None:
    class ScaledGroupNorm(torch.nn.GroupNorm):
        def forward(self, x):
            return 2 * super().forward(x)

    norm = block.norm2
    block.norm2 = ScaledGroupNorm(norm.num_groups, norm.num_channels, norm.eps)
    block.norm2.load_state_dict(norm.state_dict())


def _instance_level_forward(block: torch.nn.Module) -> None:
    original = block.forward
    block.forward = functools.update_wrapper(lambda *a, **k: original(*a, **k), original)


@pytest.mark.parametrize(
    ("change", "options", "reason"),
    [
        (_plain_norm2, {}, "norm1/norm2 are not plain GroupNorm"),
        (
            None,
            {"temb_channels": None, "time_embedding_norm": "scale_shift"},
            "scale_shift without time_emb_proj",
        ),
        (_instance_level_forward, {}, "its forward is wrapped at instance level"),
    ],
    ids=["norm_subclass", "scale_shift_without_projection", "instance_forward"],
)
@torch.no_grad()
def test_resnet_blocks_the_fused_forward_does_not_cover_are_left_alone(
    kit, change, options, reason
):
    block = kit.resnet(**options)
    if change is not None:
        change(block)
    x, temb = _resnet_inputs()
    if options.get("time_embedding_norm") == "scale_shift":  # used as is: (B, 2C, 1, 1)
        temb = torch.randn(3, 16, 1, 1, generator=torch.Generator().manual_seed(6))
    expected = block(x, temb)
    report = echofast.patch(block)
    assert "resnet" not in report.counts()
    ((path, what, why),) = [r for r in _reasons(report) if r[1] == "ResnetBlock2D"]
    assert path == "" and why.startswith(reason)
    assert torch.equal(block(x, temb), expected)
    echofast.unpatch(block)


@torch.no_grad()
def test_switched_class_keeps_the_diffusers_name_module_doc_and_signature(kit):
    """``isinstance``, ``save_pretrained``'s class name, ``help`` and ``inspect.signature``
    (pipelines read the UNet's forward arguments) see diffusers' class."""
    from diffusers.models.resnet import ResnetBlock2D

    block = kit.resnet()
    echofast.patch(block)
    cls = type(block)
    assert cls is not ResnetBlock2D and issubclass(cls, ResnetBlock2D)
    for attr in ("__name__", "__qualname__", "__module__", "__doc__"):
        assert getattr(cls, attr) == getattr(ResnetBlock2D, attr), attr
    assert inspect.signature(block.forward) == inspect.signature(
        ResnetBlock2D.forward.__get__(block)
    )
    echofast.unpatch(block)
    assert type(block) is ResnetBlock2D


@torch.no_grad()
def test_resnet_deprecated_scale_argument_warns_as_diffusers(kit):
    block = kit.resnet()
    x, temb = _resnet_inputs()
    expected = block(x, temb)
    echofast.patch(block)
    with pytest.warns(FutureWarning, match="scale"):
        got = block(x, temb, scale=1.0)
    assert rel_err(got, expected) <= TOL
    echofast.unpatch(block)


@pytest.mark.parametrize(
    "shape", [(4, 6), (2, 6, 7), (2, 6, 3, 5), (1, 6, 2, 3, 4)], ids=lambda s: f"{len(s)}d"
)
@torch.no_grad()
def test_lone_group_norm_matches_torch_for_every_rank(shape, op_calls):
    """Inputs of 3+ dims run ``ops.group_norm``, (N, C) ones torch's own forward; the module's
    eps and affine parameters are used either way."""
    g = torch.Generator().manual_seed(7)
    norm = torch.nn.GroupNorm(3, 6, eps=0.5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(6, generator=g))
        norm.bias.copy_(torch.randn(6, generator=g))
    x = torch.randn(*shape, generator=g) * 0.3
    expected = F.group_norm(x, 3, norm.weight, norm.bias, 0.5)
    assert echofast.patch(norm).counts() == {"group_norm": 1}
    got = norm(x)
    assert got.shape == expected.shape and rel_err(got, expected) <= TOL
    ran = sum(n for (op, _), n in op_calls.items() if op == "group_norm")
    assert ran == (0 if len(shape) < 3 else 1)
    echofast.unpatch(norm)


@torch.no_grad()
def test_group_norm_whose_forward_is_wrapped_per_instance_is_left_alone():
    norm = torch.nn.GroupNorm(2, 4)
    original = norm.forward
    norm.forward = functools.update_wrapper(lambda x: original(x), original)
    report = echofast.patch(norm)
    assert report.patched == [] and type(norm) is torch.nn.GroupNorm
    assert _reasons(report) == {
        (
            "",
            "GroupNorm",
            "its forward is wrapped at instance level (e.g. accelerate offload hooks)",
        )
    }
    echofast.unpatch(norm)


@torch.no_grad()
def test_temporal_resnet_with_a_shortcut_matches_diffusers():
    """A ``TemporalResnetBlock`` changing its channel count (SVD's never do): shortcut conv and
    the SiLU before the time projection, against diffusers."""
    from diffusers.models.resnet import TemporalResnetBlock

    torch.manual_seed(0)
    block = randomize_norms(TemporalResnetBlock(32, 64, temb_channels=6, eps=1e-5).eval())
    g = torch.Generator().manual_seed(0)
    x, temb = torch.randn(2, 32, 3, 4, 5, generator=g), torch.randn(2, 3, 6, generator=g)
    expected = block(x, temb)
    assert echofast.patch(block).counts() == {"temporal_resnet": 1}
    got = block(x, temb)
    assert got.shape == expected.shape and rel_err(got, expected) <= TOL
    echofast.unpatch(block)


@torch.no_grad()
def test_attention_dropout_and_output_rescale_match_diffusers():
    """Training-mode output dropout draws one mask over (B, queries, C) as diffusers' does, on
    both paths (same seed, same output); a rescale factor below 1 divides too."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(
        16, cross_attention_dim=6, heads=2, dim_head=8, dropout=0.5, rescale_output_factor=0.5
    ).train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 16, generator=g)
    for tokens, path in [(1, "single_key"), (3, "general")]:
        ctx = torch.randn(2, tokens, 6, generator=g)
        torch.manual_seed(3)
        expected = attn(x, ctx)
        echofast.patch(attn)
        torch.manual_seed(3)
        got = attn(x, ctx)
        assert attn.processor.last_path == path
        assert rel_err(got, expected) <= TOL, path
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
    replaced_only = PatchReport("VAE", replaced=[Replacement("", "AutoencoderKL", "VAE")])
    assert str(replaced_only).splitlines() == [
        "echofast.patch(VAE)",
        "  replaced (parameters shared, not copied):",
        "    <root>: AutoencoderKL -> VAE",
    ]


@torch.no_grad()
def test_report_text_of_a_patched_model_names_dtype_replacement_and_site_kinds(kit):
    model = kit.build("lidm")
    report = echofast.patch(model, dtype="bfloat16")
    lines = str(report).splitlines()
    assert lines[:4] == [
        "echofast.patch(UNet2DModel)",
        "  autocast dtype: torch.bfloat16",
        "  replaced (parameters shared, not copied):",
        "    <root>: UNet2DModel -> echofast.models.LIDM",
    ]
    counts = report.counts()
    assert set(counts) == {"resnet", "attention", "group_norm"}
    assert lines[4:] == ["  patched call sites:"] + [
        f"    {counts[kind]:4d} x {SITE_KINDS[kind]}" for kind in sorted(counts)
    ]
    echofast.unpatch(model)


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


@pytest.mark.parametrize(
    ("shape", "context"), [((2, 3, 4, 5, 16), None), ((2, 5, 16), (2, 6))], ids=["5d", "2d_context"]
)
@torch.no_grad()
def test_inputs_diffusers_refuses_go_to_diffusers(shape, context):
    """Shapes outside (B, L, C) / (B, C, H, W) queries and (B, L, C) contexts are diffusers'
    business: its processor's error, not a silent echofast result."""
    from diffusers.models.attention_processor import Attention

    attn = Attention(16, cross_attention_dim=6, heads=2, dim_head=8).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    ctx = None if context is None else torch.randn(*context, generator=g)
    with pytest.raises(ValueError, match="values to unpack"):
        attn(x, ctx)
    echofast.patch(attn)
    with pytest.raises(ValueError, match="values to unpack"):
        attn(x, ctx)
    assert attn.processor.last_path == "original"
    echofast.unpatch(attn)
