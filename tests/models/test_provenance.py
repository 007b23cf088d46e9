"""``read_export_info``: what counts as an export record (``echofast_export.json``) and how a
file that is not one is refused, naming the file."""

from __future__ import annotations

import json

import pytest

from echofast.errors import WeightsError
from echofast.models.provenance import EXPORT_INFO_NAME, read_export_info


def test_a_folder_without_a_record_has_none(tmp_path):
    assert read_export_info(tmp_path) is None


@pytest.mark.parametrize("weights", ["ema", "model"])
def test_a_record_is_read_as_written(tmp_path, weights):
    info = {"checkpoint": "/runs/a/step-3.pt", "step": 3, "weights": weights, "latents_vae": None}
    (tmp_path / EXPORT_INFO_NAME).write_text(json.dumps(info))
    assert read_export_info(tmp_path) == info


@pytest.mark.parametrize(
    "record",
    [
        {"checkpoint": "/runs/a/step-3.pt", "step": 3},  # no "weights"
        {"step": 3, "weights": "best"},  # weights neither "ema" nor "model"
        {"weights": None},
    ],
)
def test_a_json_object_that_is_not_a_record_is_refused(tmp_path, record):
    (tmp_path / EXPORT_INFO_NAME).write_text(json.dumps(record))
    with pytest.raises(WeightsError, match=f"{EXPORT_INFO_NAME}: not an export record"):
        read_export_info(tmp_path)


def test_a_file_that_is_not_json_is_refused(tmp_path):
    (tmp_path / EXPORT_INFO_NAME).write_text('{"weights": "ema",')
    with pytest.raises(WeightsError, match=f"{EXPORT_INFO_NAME}: not valid JSON"):
        read_export_info(tmp_path)
