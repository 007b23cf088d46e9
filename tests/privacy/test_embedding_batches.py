"""A frame's embedding does not depend on how many frames are embedded with it, as
``ReIdentificationModel.embed_frames`` promises (and the filter's ``embed`` delivers)."""

from __future__ import annotations

import torch

from echofast.privacy import ReIdentificationModel, embed


def test_a_frames_embedding_does_not_depend_on_the_frames_embedded_with_it():
    torch.manual_seed(0)
    model = ReIdentificationModel(layers=(1, 1, 1, 1), width=8, n_features=16).eval()
    frames = torch.rand(7, 4, 14, 14, generator=torch.Generator().manual_seed(1)) * 2 - 1
    by_filter = torch.cat([embed(model, frames[k : k + 1]) for k in range(7)])
    assert torch.equal(embed(model, frames), by_filter)
    alone = torch.cat([model.embed_frames(frames[k : k + 1]) for k in range(7)])
    assert torch.equal(model.embed_frames(frames), alone)
    assert torch.equal(model.embed_frames(frames[2:5]), alone[2:5])
