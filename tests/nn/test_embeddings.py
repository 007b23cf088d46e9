"""distinct_timesteps: one shared timestep is embedded once, however the batch was built.
timestep_features: diffusers' sinusoidal ``get_timestep_embedding``, odd dims included."""

import pytest
import torch

from echofast.nn.embeddings import (
    RunMemo,
    TimeEmbedding,
    TimeProjections,
    batch_timesteps,
    distinct_timesteps,
    timestep_features,
)


def test_shared_and_distinct_timesteps():
    expanded = torch.tensor(500).expand(4)  # stride 0: shared without looking at the values
    assert distinct_timesteps(expanded).tolist() == [500]
    assert distinct_timesteps(torch.tensor([7, 7, 7])).tolist() == [7]
    assert distinct_timesteps(torch.tensor([7, 8, 7])).tolist() == [7, 8, 7]
    assert distinct_timesteps(torch.tensor([3])).tolist() == [3]


def test_batch_timesteps_forms_and_a_count_that_is_not_the_batch():
    cpu = torch.device("cpu")
    assert batch_timesteps(15.7, 3, cpu).tolist() == [15, 15, 15]  # truncated, as diffusers
    assert batch_timesteps(torch.tensor(4), 2, cpu).tolist() == [4, 4]
    assert batch_timesteps(torch.tensor([1, 2, 3]), 3, cpu).tolist() == [1, 2, 3]
    for n in (2, 5):  # 2 rows would broadcast over a batch of 4 by groups: refused
        with pytest.raises(ValueError, match=f"got {n} timesteps for a batch of 4"):
            batch_timesteps(torch.arange(n), 4, cpu)


@pytest.mark.parametrize("shift", [0.0, 1.0])
@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("dim", [1, 5, 8])
def test_timestep_features_match_diffusers(dim, flip, shift):
    """Same frequencies, same [sin, cos] / [cos, sin] order, an odd dim's zero column last."""
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0, 1, 17, 500, 999])
    got = timestep_features(t, dim, flip_sin_to_cos=flip, freq_shift=shift)
    expected = get_timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
    assert got.shape == expected.shape == (5, dim) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    if dim % 2:
        assert (got[:, -1] == 0).all()


def test_timestep_features_refuse_a_batch_that_is_not_one_dimensional():
    with pytest.raises(ValueError, match=r"timesteps must be 1-D, got shape \(2, 1\)"):
        timestep_features(torch.zeros(2, 1), 8, flip_sin_to_cos=True, freq_shift=0)


def test_run_memo_reuses_only_in_inference_with_the_same_weights():
    """An entry is reused while grad mode is off and the weights are the ones it saw: an
    in-place update recomputes; under autograd nothing is kept."""
    lin = torch.nn.Linear(3, 2)
    memo = RunMemo()
    calls = []

    def value():
        calls.append(1)
        return lin.weight.sum().item()

    with torch.no_grad():
        first = memo.get((lin,), "k", value)
        assert memo.get((lin,), "k", value) == first and len(calls) == 1
        lin.weight.add_(1.0)
        assert memo.get((lin,), "k", value) == pytest.approx(first + 6.0)
    assert (memo.hits, memo.misses) == (1, 2)
    memo.get((lin,), "k", value)  # autograd on: computed afresh
    assert len(calls) == 3 and memo.hits == 1


def test_time_embedding_needs_an_embedding_or_a_projections_table():
    with pytest.raises(ValueError, match="needs emb, or a projections table"):
        TimeEmbedding(None)
    with pytest.raises(ValueError, match="needs emb, or a projections table"):
        TimeEmbedding(None, table=torch.zeros(1, 4))


@torch.no_grad()
def test_projection_with_another_fold_is_not_taken_from_the_table():
    """The one-GEMM table holds each projection plus the conv bias its block folds; asked for a
    projection without that fold (or with another), the embedding computes it on its own."""
    lins = [torch.nn.Linear(4, 3), torch.nn.Linear(4, 5)]
    convs = [torch.nn.Conv2d(2, 3, 1), torch.nn.Conv2d(2, 5, 1)]
    projections = TimeProjections(lins, convs)
    projections.pack()
    emb = torch.randn(2, 4)
    temb = TimeEmbedding(emb, projections=projections)
    silu = torch.nn.functional.silu(emb)
    for lin, conv in zip(lins, convs):
        torch.testing.assert_close(temb.project(lin, conv), lin(silu) + conv.bias)
        torch.testing.assert_close(temb.project(lin), lin(silu))


@torch.no_grad()
def test_folded_conv_biases_are_rounded_like_autocasts_conv_bias():
    """Under autocast the projections are bf16 and a folded conv bias is cast to bf16 before it
    is added (as autocast casts a conv's bias): the one-GEMM table gives what each block's own
    projection gives. 1 + bf16(2^-8 + 2^-20) = 1 + 2^-8 is a tie, rounded to even (1.0); adding
    the fp32 bias in one rounding would give the next bf16 value above 1."""
    lins = [torch.nn.Linear(4, n) for n in (3, 5)]
    convs = [torch.nn.Conv2d(2, n, 1) for n in (3, 5)]
    for lin, conv in zip(lins, convs):
        lin.weight.zero_()
        lin.bias.fill_(1.0)
        conv.bias.fill_(2.0**-8 + 2.0**-20)
    projections = TimeProjections(lins, convs)
    projections.pack()
    emb = torch.randn(2, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        table = projections.all(emb)
        own = [TimeEmbedding(emb).project(lin, conv) for lin, conv in zip(lins, convs)]
    assert table.dtype == torch.bfloat16
    assert torch.equal(table, torch.ones_like(table))
    assert torch.equal(table, torch.cat(own, dim=-1))
