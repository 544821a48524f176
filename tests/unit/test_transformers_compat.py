"""The family tests on the previous transformers release as well as the constrained one.

transformers 5.25 moved ``FalconAttention`` onto ``ALL_ATTENTION_FUNCTIONS`` (5.24 computes its
attention inline), so the prefix policy serves Falcon by a different route on each. The main
environment runs the constrained release (``constraints.txt``); ``launch/setup_env.sh`` with
``LAYERFREEZE_WITH_COMPAT=1`` (the default of ``tests/run.sh``) installs the previous one apart
(``--no-deps --target``), and this test runs the Falcon/BLOOM family tests on it in a child
process with that directory first on ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

#: The release before the constrained one changed Falcon (setup_env.sh's default too).
COMPAT_VERSION = os.environ.get("LAYERFREEZE_COMPAT_TRANSFORMERS", "5.24.0")
REPO = Path(__file__).resolve().parents[2]
FAMILY_TESTS = [
    "tests/unit/test_family_matrix.py",
    "tests/unit/test_apply.py",
    "tests/unit/test_models.py",
    "tests/unit/test_prefix.py",
    "tests/unit/test_prefix_paper.py",
]


def _compat_dir() -> Path:
    default = Path.home() / ".cache" / "layerfreeze" / f"transformers-{COMPAT_VERSION}"
    return Path(os.environ.get("LAYERFREEZE_COMPAT_DIR") or default)


@pytest.fixture(scope="module")
def compat_env() -> dict[str, str]:
    target = _compat_dir()
    if not (target / "transformers" / "__init__.py").is_file():
        why = (
            f"transformers {COMPAT_VERSION} is not installed in {target}; install it with "
            "LAYERFREEZE_WITH_COMPAT=1 bash launch/setup_env.sh"
        )
        if os.environ.get("LAYERFREEZE_WITH_COMPAT") == "1":
            pytest.fail(f"LAYERFREEZE_WITH_COMPAT=1 but {why}")
        pytest.skip(why)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(target), str(REPO)])
    return env


def test_the_child_runs_the_previous_release(compat_env):
    import transformers

    out = subprocess.run(
        [sys.executable, "-c", "import transformers; print(transformers.__version__)"],
        env=compat_env, capture_output=True, text=True, check=True, cwd=REPO,
    ).stdout.strip()
    assert out == COMPAT_VERSION != transformers.__version__


@pytest.mark.slow
def test_family_tests_pass_on_the_previous_release(compat_env):
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", *FAMILY_TESTS, "-q", "-p", "no:cacheprovider",
         "-k", "falcon or bloom or route or registry or prefix"],
        env=compat_env, capture_output=True, text=True, cwd=REPO, timeout=1800,
    )
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
    assert proc.returncode == 0, tail
    assert " passed" in tail and "failed" not in tail
