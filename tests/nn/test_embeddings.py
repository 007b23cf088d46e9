"""distinct_timesteps: one shared timestep is embedded once, however the batch was built.
timestep_features: diffusers' sinusoidal ``get_timestep_embedding``, odd dims included."""

import pytest
import torch

from echofast.nn.embeddings import distinct_timesteps, timestep_features


def test_shared_and_distinct_timesteps():
    expanded = torch.tensor(500).expand(4)  # stride 0: shared without looking at the values
    assert distinct_timesteps(expanded).tolist() == [500]
    assert distinct_timesteps(torch.tensor([7, 7, 7])).tolist() == [7]
    assert distinct_timesteps(torch.tensor([7, 8, 7])).tolist() == [7, 8, 7]
    assert distinct_timesteps(torch.tensor([3])).tolist() == [3]


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
