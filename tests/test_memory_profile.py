"""bench/memory_profile.py on CPU: every phase and the module-peak tables run (tiny configs);
the numbers are empty without CUDA memory statistics. On a GPU it found the GroupNorm
input leak (every phase's "after" column grew)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "memory_profile.py"


def test_cpu_smoke_runs_every_phase():
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--batch-size", "1", "2", "--top", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    assert "tiny configs" in text and text.count("batch ") >= 2
    for phase in ("lidm", "lvdm cuda_graphs=False", "decode float32 chunk 64", "decode float16"):
        assert text.count(phase) == 2, phase
    assert text.count("top module calls, one eager LVDM sampling step") == 2
    assert "MiB  " in text  # module rows printed
