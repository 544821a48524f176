"""Under torchrun a user error ends in one clear line and exit 2 (launch/torchrun.sh), not only in
torch's ChildFailedError report with exit 1; nothing is left behind."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.dist import find_free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def test_torchrun_script_ends_with_the_ranks_error_line(tmp_path):
    out_dir = tmp_path / "run"
    env = dict(os.environ, NPROC_PER_NODE="2", MASTER_PORT=str(find_free_port()),
               PYTHON=sys.executable, TMPDIR=str(tmp_path))
    proc = subprocess.run(
        ["bash", "launch/torchrun.sh", "configs/tiny_llama/cpt_freeze_deep_deepspeed.yaml",
         "plan.spec=freeze_deeep", f"logging.out_dir={out_dir}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        r"layerfreeze: rank [01]: plan\.spec: unknown preset 'freeze_deeep'; presets are .*", last
    ), last
    assert "ChildFailedError" in proc.stderr  # torchrun's own report stays above it
    assert proc.stdout == ""
    assert not out_dir.exists()
    # the error file is removed too (torchelastic_* is torchrun's own scratch directory)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("layerfreeze-error")]
