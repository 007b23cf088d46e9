"""``echofast report`` reads generation.json like every other input: a file that is not a JSON
object, or whose ``arguments`` is not an object, is refused with a ReportError naming it."""

from __future__ import annotations

import pytest

from echofast.eval.report import ReportError, main_report


@pytest.mark.parametrize(
    "manifest", ['["seed_rule"]', '"text"', '{"arguments": [1, 2]}', '{"arguments": "seed=7"}']
)
def test_a_manifest_that_is_not_an_object_of_arguments_is_refused(tmp_path, manifest):
    root = tmp_path / "d"
    root.mkdir()
    (root / "generation.json").write_text(manifest)
    with pytest.raises(ReportError, match="generation.json"):
        main_report([str(root)])
    assert not (root / "report.md").exists()
