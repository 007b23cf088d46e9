"""``config.json`` names the architecture: only the reference's ResNet-50 (layers [3, 4, 6, 3],
width 64) is written without ``resnet_layers`` / ``resnet_width``."""

from __future__ import annotations

import pytest

from echofast.privacy import ReIdentificationModel
from echofast.privacy.model import RESNET50_LAYERS


@pytest.mark.parametrize(
    "layers,width",
    [((1, 1, 1, 1), 64), (RESNET50_LAYERS, 8), ((1, 2, 1, 1), 4)],
)
def test_small_models_record_their_layers_and_width(layers, width):
    cfg = ReIdentificationModel(layers=layers, width=width, n_features=8).config()
    assert cfg["siamese_architecture"] == "ResNet"
    assert cfg["resnet_layers"] == list(layers) and cfg["resnet_width"] == width
    again = ReIdentificationModel.from_config(cfg)
    assert (again.layers, again.width) == (tuple(layers), width)
