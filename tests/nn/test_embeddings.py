"""distinct_timesteps: one shared timestep is embedded once, however the batch was built."""

import torch

from echofast.nn.embeddings import distinct_timesteps


def test_shared_and_distinct_timesteps():
    expanded = torch.tensor(500).expand(4)  # stride 0: shared without looking at the values
    assert distinct_timesteps(expanded).tolist() == [500]
    assert distinct_timesteps(torch.tensor([7, 7, 7])).tolist() == [7]
    assert distinct_timesteps(torch.tensor([7, 8, 7])).tolist() == [7, 8, 7]
    assert distinct_timesteps(torch.tensor([3])).tolist() == [3]
