"""Damaged checkpoints never go unnoticed: a run that has checkpoints never silently restarts
from step 0, and a corrupted file (even one of the same size) is caught before it is loaded.

Every test trains the same tiny model for real (DeepSpeed, one process) and damages its
checkpoints on disk the way a full disk, a bad node or a stray copy does."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from tests.faults._train import last_line, tiny_config, train, tree_snapshot, write_config

pytestmark = pytest.mark.slow

DS_FILE = "ds/mp_rank_00_model_states.pt"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4; tests work on copies."""
    tmp = tmp_path_factory.mktemp("integrity")
    out = tmp / "run"
    config = write_config(tmp / "cfg.yaml", tiny_config(out, tmp / "cache"))
    proc = train(config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return config, out


def _copy(trained, tmp_path: Path) -> tuple[Path, Path]:
    config, out = trained
    run = tmp_path / "run"
    shutil.copytree(out, run)
    return config, run


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("case", ["only_checkpoint", "every_checkpoint"])
def test_all_checkpoints_damaged_exits_2_and_touches_nothing(trained, tmp_path, case):
    config, run = _copy(trained, tmp_path)
    ck = run / "checkpoints"
    if case == "only_checkpoint":
        shutil.rmtree(ck / "step_00000002")
        damaged = ["step_00000004"]
    else:
        damaged = ["step_00000002", "step_00000004"]
    for tag in damaged:
        _truncate(ck / tag / DS_FILE)
    before = tree_snapshot(run)
    metrics = (run / "metrics.jsonl").read_bytes()

    proc = train(config, f"logging.out_dir={run}", "train.steps=6")

    assert proc.returncode == 2, proc.stderr[-3000:]
    line = last_line(proc.stderr)
    assert "Traceback" not in proc.stderr
    for tag in damaged:  # each damaged checkpoint and why
        assert str(ck / tag) in line, line
    assert line.count(DS_FILE) == len(damaged) and "bytes" in line, line
    assert "checkpoint.resume=none" in line and "logging.out_dir" in line, line  # how to go on
    assert tree_snapshot(run) == before
    assert (run / "metrics.jsonl").read_bytes() == metrics


def _flip(path: Path, offset: int | None = None) -> None:
    """Change bytes in place, keeping the size (what a size check cannot see)."""
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if offset is None else offset
    for i in range(at, at + 16):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _drop_checksums(checkpoint: Path) -> None:
    """Make a checkpoint look like one saved before layerfreeze recorded checksums."""
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest.pop("sha256")
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


def test_manifest_checksums_are_the_files_sha256(trained):
    _config, out = trained
    for checkpoint in sorted((out / "checkpoints").glob("step_*")):
        manifest = json.loads((checkpoint / "manifest.json").read_text())
        assert sorted(manifest["sha256"]) == sorted(manifest["files"])
        for rel, digest in manifest["sha256"].items():
            assert digest == hashlib.sha256((checkpoint / rel).read_bytes()).hexdigest(), rel


def test_same_size_corruption_falls_back_to_newest_intact_with_a_warning(trained, tmp_path):
    config, run = _copy(trained, tmp_path)
    bad = run / "checkpoints" / "step_00000004"
    _flip(bad / DS_FILE)

    proc = train(config, f"logging.out_dir={run}", "train.steps=6")

    assert proc.returncode == 0, proc.stderr[-3000:]
    warning = next(x for x in proc.stderr.splitlines() if "is damaged" in x)
    assert "WARNING" in warning and str(bad) in warning and DS_FILE in warning, warning
    assert str(run / "checkpoints" / "step_00000002") in warning, warning
    assert f"resumed from {run / 'checkpoints' / 'step_00000002'} at step 2" in proc.stderr


def test_same_size_corruption_of_every_checkpoint_exits_2_and_touches_nothing(trained, tmp_path):
    config, run = _copy(trained, tmp_path)
    ck = run / "checkpoints"
    _flip(ck / "step_00000002" / "elastic" / "rank_00000.safetensors")
    _flip(ck / "step_00000004" / DS_FILE)
    before = tree_snapshot(run)

    proc = train(config, f"logging.out_dir={run}", "train.steps=6")

    assert proc.returncode == 2, proc.stderr[-3000:]
    line = last_line(proc.stderr)
    assert "Traceback" not in proc.stderr
    assert f"{ck / 'step_00000002'}: elastic/rank_00000.safetensors content differs" in line, line
    assert f"{ck / 'step_00000004'}: {DS_FILE} content differs" in line, line
    assert tree_snapshot(run) == before


def test_explicit_resume_path_with_changed_content_exits_2(trained, tmp_path):
    config, run = _copy(trained, tmp_path)
    bad = run / "checkpoints" / "step_00000004"
    _flip(bad / "elastic" / "rank_00000.safetensors")
    before = tree_snapshot(run)
    proc = train(config, f"logging.out_dir={run}", f"checkpoint.resume={bad}", "train.steps=6")
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = last_line(proc.stderr)
    assert str(bad) in line and "elastic/rank_00000.safetensors content differs" in line, line
    assert tree_snapshot(run) == before


def test_manifest_without_checksums_is_accepted_with_a_note(trained, tmp_path):
    config, run = _copy(trained, tmp_path)
    _drop_checksums(run / "checkpoints" / "step_00000004")
    proc = train(config, f"logging.out_dir={run}", "train.steps=6")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "has no content checksums (saved by an older layerfreeze)" in proc.stderr
    assert "at step 4" in proc.stderr


def test_torch_detected_corruption_is_one_line_naming_the_file(trained, tmp_path):
    config, run = _copy(trained, tmp_path)
    bad = run / "checkpoints" / "step_00000004"
    _drop_checksums(bad)  # only torch itself can notice now
    _flip(bad / DS_FILE, offset=0)  # the zip header of torch's file format
    proc = train(config, f"logging.out_dir={run}", "train.steps=6")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    line = last_line(proc.stderr)
    assert f"{bad}: {DS_FILE} cannot be loaded" in line, line


# ---------------------------------------------------------------------------------------------
# resume compatibility: each difference named by its field, exit 2, nothing changed
# ---------------------------------------------------------------------------------------------


def _refused(config: Path, run: Path, *overrides: str) -> str:
    before = tree_snapshot(run)
    proc = train(config, f"logging.out_dir={run}", "train.steps=6", *overrides)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert tree_snapshot(run) == before
    line = last_line(proc.stderr)
    assert f"checkpoint.resume: cannot resume from {run / 'checkpoints' / 'step_00000004'}" in line
    return line


def test_resume_with_another_tokenizer_of_the_same_size_names_the_tokenizer(trained, tmp_path):
    from layerfreeze.cli import main
    from layerfreeze.data.tokenizer import load_tokenizer

    config, run = _copy(trained, tmp_path)
    other = tmp_path / "bpe_tokenizer"
    argv = ["tokenizer", "train", "--input", "@bundled", "--vocab-size", "1000",
            "--model-type", "bpe", "--out", str(other)]
    assert main(argv) == 0
    assert len(load_tokenizer(other)) == len(load_tokenizer(run / "tokenizer"))  # same size
    line = _refused(config, run, f"tokenizer.path={other}")
    assert "another tokenizer (tokenizer vocabulary: sha256 " in line, line
    assert "(same size, other pieces or ids)" in line and "tokenizer.path" in line, line


def test_resume_with_another_model_architecture_names_the_field(trained, tmp_path):
    config, run = _copy(trained, tmp_path)
    line = _refused(config, run, "model.architecture.intermediate_size=96")
    assert (
        "another model architecture (model architecture.intermediate_size: 64 in the checkpoint, "
        "96 in this run)" in line
    ), line


def test_resume_with_another_plan_names_only_the_differing_fields(trained, tmp_path):
    config, run = _copy(trained, tmp_path)
    line = _refused(config, run, "plan.spec=full")
    assert (
        "the plan differs (plan.schedule[0].plan.name: 'freeze_deep' in the checkpoint, 'full' "
        "in this run;" in line
    ), line
    assert "{" not in line and len(line) < 700, line


# ---------------------------------------------------------------------------------------------
# save faults: the filesystem refuses the writes; an output directory that cannot be written
# ---------------------------------------------------------------------------------------------

# `layerfreeze train` whose file-size limit (RLIMIT_FSIZE, enforced by the kernel) drops to
# argv[1] bytes when the first checkpoint save starts: every write past that offset fails with
# EFBIG, as a full disk fails with ENOSPC. SIGXFSZ is ignored so the write returns the error.
_LIMITED_TRAIN = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
from layerfreeze import train as recipe
limit, save = int(sys.argv[1]), recipe.Recipe._save
def limited_save(self):
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return save(self)
recipe.Recipe._save = limited_save
from layerfreeze.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_filesystem_refusing_a_save_removes_the_partial_save_and_exits_2(trained, tmp_path):
    import subprocess
    import sys

    from tests.faults._train import REPO, train_env

    config, run = _copy(trained, tmp_path)
    ck = run / "checkpoints"
    before = {p: tree_snapshot(ck / p) for p in ("step_00000002", "step_00000004")}
    assert (ck / DS_FILE.join(["step_00000004/", ""])).stat().st_size > 100_000
    proc = subprocess.run(
        [sys.executable, "-c", _LIMITED_TRAIN, "100000", "train", "--config", str(config),
         f"logging.out_dir={run}", "train.steps=6"],
        cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    line = last_line(proc.stderr)
    assert f"checkpoint.dir: saving the step-6 checkpoint into {ck} failed: " in line, line
    assert "file too large" in line.lower() and f"resume from {ck / 'step_00000004'}" in line, line
    assert sorted(p.name for p in ck.iterdir()) == ["latest", "step_00000002", "step_00000004"]
    assert (ck / "latest").read_text().strip() == "step_00000004"
    assert {p: tree_snapshot(ck / p) for p in before} == before


def test_output_directory_that_cannot_be_written_is_one_line(trained, tmp_path):
    config, _run = _copy(trained, tmp_path)
    target = "/sys/layerfreeze-test-run"  # refused even to root (sysfs)
    proc = train(config, f"logging.out_dir={target}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    line = last_line(proc.stderr)
    assert f"logging.out_dir: cannot create {target!r}: /sys is on the kernel's sysfs" in line, line
    assert "init_distributed" not in proc.stderr and "Initializing" not in proc.stderr
