"""launch/setup_env.sh's "already installed" probe: an environment without bitsandbytes (what
``prune --heal-quantize nf4`` and tests/unit/test_heal.py need) is not taken as installed, and
the pin in constraints.txt is the version the tests run with.

The probe is the script's own Python (its heredoc), run as the script runs it; bitsandbytes is
made absent for real in that child (``sys.modules['bitsandbytes'] = None`` makes the import fail
as for a package that is not installed)."""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _probe_source() -> str:
    text = (REPO / "launch" / "setup_env.sh").read_text(encoding="utf-8")
    m = re.search(r"<<'PY'\n(.*?)\nPY\n", text, re.S)
    assert m, "setup_env.sh: the probe heredoc is gone"
    return m.group(1)


def _run_probe(block: str | None) -> subprocess.CompletedProcess:
    pre = f"import sys; sys.modules[{block!r}] = None\n" if block else ""
    code = pre + "import sys; exec(compile(sys.stdin.read(), 'setup_env probe', 'exec'))\n"
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}
    return subprocess.run(
        [sys.executable, "-c", code, str(REPO), "dev", str(REPO / "constraints.txt")],
        input=_probe_source(), cwd="/", env=env, capture_output=True, text=True, timeout=600,
    )


def test_probe_sends_an_environment_without_bitsandbytes_to_pip():
    proc = _run_probe("bitsandbytes")
    assert proc.returncode != 0
    assert "bitsandbytes" in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]


def test_constraints_pin_the_installed_bitsandbytes():
    pins = dict(
        re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)$", (REPO / "constraints.txt").read_text(), re.M)
    )
    assert pins.get("bitsandbytes") == md.version("bitsandbytes").split("+")[0]
