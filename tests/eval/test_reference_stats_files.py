"""Reference statistics files that carry the format marker but not what it promises."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from echofast.eval.fidelity import STATS_FORMAT, STATS_VERSION, MetricsError, ReferenceStats


@pytest.mark.parametrize(
    "tensors, meta",
    [
        ({"fid.mu": torch.zeros(3)}, {"protocol": json.dumps({"version": STATS_VERSION})}),
        ({"fid.mu": torch.zeros(3), "fid.sigma": torch.eye(3)}, {}),
        ({"fid.mu": torch.zeros(3), "fid.sigma": torch.eye(3)}, {"protocol": "{not json"}),
    ],
    ids=["no-sigma", "no-protocol", "protocol-not-json"],
)
def test_an_incomplete_statistics_file_is_refused_naming_it(tmp_path, tensors, meta):
    path = tmp_path / "stats.safetensors"
    save_file(tensors, path, metadata={"format": STATS_FORMAT, **meta})
    with pytest.raises(MetricsError, match=str(path)):
        ReferenceStats.load(path)


@pytest.mark.parametrize(
    "tensors",
    [
        {"fid.sigma": torch.eye(3)},
        {"fid.mu": torch.zeros(3), "fid.sigma": torch.eye(4)},
        {"fid.mu": torch.zeros(3, 1), "fid.sigma": torch.eye(3)},
    ],
    ids=["no-mean", "sizes-differ", "mean-not-a-vector"],
)
def test_statistics_of_mismatched_shapes_are_refused_naming_them(tmp_path, tensors):
    path = tmp_path / "stats.safetensors"
    meta = {"format": STATS_FORMAT, "protocol": json.dumps({"version": STATS_VERSION})}
    save_file(tensors, path, metadata=meta)
    with pytest.raises(MetricsError, match=rf"{path}: statistics 'fid' need a mean"):
        ReferenceStats.load(path)


def test_a_protocol_that_is_not_an_object_is_refused(tmp_path):
    path = tmp_path / "stats.safetensors"
    save_file({"fid.mu": torch.zeros(2)}, path, metadata={"format": STATS_FORMAT, "protocol": "[]"})
    with pytest.raises(MetricsError, match="protocol metadata is not a JSON object"):
        ReferenceStats.load(path)
