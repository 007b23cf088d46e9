"""distinct_timesteps: one shared timestep is embedded once, however the batch was built.
timestep_features: diffusers' sinusoidal ``get_timestep_embedding``, odd dims included."""

import pytest
import torch

from echofast.nn.embeddings import batch_timesteps, distinct_timesteps, timestep_features


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
