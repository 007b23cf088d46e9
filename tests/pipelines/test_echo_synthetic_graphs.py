"""``EchoSyntheticPipeline.release_graphs``: frees what both its LIDM and LVDM pipelines keep
between calls (CUDA graphs, UNet input buffers, reduced-precision UNet copies). Graphs cannot be
captured on CPU, so the test leaves in each sub-pipeline what a captured run leaves behind."""

from __future__ import annotations

import torch

from echofast.pipelines import EchoSyntheticPipeline


def test_release_graphs_frees_both_sub_pipelines(weights_root):
    pipe = EchoSyntheticPipeline.from_pretrained(weights_root)
    subs = (pipe.lidm_pipe, pipe.lvdm_pipe)
    pipe.release_graphs()  # nothing captured yet: nothing to free, no error
    for sub in subs:
        sub.graphs._graphs[("signature",)] = object()
        sub._inputs.get("x", (1, 4, 8, 8), torch.float32, torch.device("cpu"))
        sub._autocast_model = (("key",), torch.nn.Identity())
    assert all(sub.graphs.num_graphs == 1 for sub in subs)
    pipe.release_graphs()
    for sub in subs:
        assert sub.graphs.num_graphs == 0
        assert not sub._inputs._tensors and sub._autocast_model is None
