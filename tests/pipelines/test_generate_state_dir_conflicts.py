"""`echofast generate` / `echofast merge` into a folder whose ``.echofast`` is not a folder: a
typed refusal naming the folder (as for any folder that is not an echofast dataset), nothing
written."""

from __future__ import annotations

import pytest
from pipelines.test_generate_sharding import _cfg, _RecordingPipe

from echofast.pipelines.dataset import GenerationConflict, generate_dataset


def test_a_folder_holding_a_file_named_like_the_state_folder_is_refused(weights_root, tmp_path):
    out = tmp_path / "ds"
    out.mkdir()
    (out / ".echofast").write_text("not ours")
    with pytest.raises(GenerationConflict, match="is not an echofast generation folder"):
        generate_dataset(_cfg(weights_root, out), pipe=_RecordingPipe())
    assert sorted(p.name for p in out.iterdir()) == [".echofast"]
    assert (out / ".echofast").read_text() == "not ours"
