"""One output rule for every command that writes: a missing or empty output is written, a
non-empty one only with ``--overwrite``, and a directory holding a training run (checkpoints, a
run lock) never, not even with ``--overwrite`` (``export --out`` used to delete a whole run
directory with its checkpoints). Same wording in every command (``check_output_path``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from layerfreeze import checkpoint as ckpt
from tests.faults._train import tree_snapshot
from tests.helpers.cli import error_line

REPO = Path(__file__).resolve().parents[2]


def _argv(command: str, tmp: Path, out: Path) -> list[str]:
    """A command line of ``command`` writing to ``out``; its other inputs need not be valid
    (the output is checked before any of them is loaded)."""
    model, adapter = tmp / "model", tmp / "adapter"
    model.mkdir(exist_ok=True)
    adapter.mkdir(exist_ok=True)
    config = str(REPO / "configs" / "tiny_llama" / "cpt_freeze_deep_deepspeed.yaml")
    return {
        "export": ["export", "--model", str(model), "--adapter-dir", str(adapter),
                   "--format", "merged", "--out", str(out)],
        "tokenizer train": ["tokenizer", "train", "--input", "@bundled", "--vocab-size", "1000",
                            "--out", str(out)],
        "compose": ["compose", "--base", "A", "--model", f"A={model}", "--layers", "0-1:A",
                    "--out", str(out)],
        "prune": ["prune", "--model", str(model), "--num-layers", "1", "--out", str(out)],
        "trace": ["trace", "--model", str(model), "--probe", "@bundled", "--out", str(out)],
        "eval --out": ["eval", "--model", str(model), "--benchmark", "ceval", "--out", str(out)],
        "eval --predictions": ["eval", "--model", str(model), "--benchmark", "ceval",
                               "--predictions", str(out)],
        "eval --submission": ["eval", "--model", str(model), "--benchmark", "ceval",
                              "--split", "test", "--submission", str(out)],
        "launch --out": ["launch", "--scheduler", "slurm", "--config", config, "--out", str(out)],
    }[command]


DIRECTORY_OUTPUTS = ["export", "tokenizer train", "compose", "prune", "trace"]
FILE_OUTPUTS = ["eval --out", "eval --predictions", "eval --submission", "launch --out"]


def _flag(command: str) -> str:
    return command.split()[-1] if command.split()[-1].startswith("--") else "--out"


@pytest.mark.parametrize("command", DIRECTORY_OUTPUTS + FILE_OUTPUTS)
def test_non_empty_output_is_refused_without_overwrite(tmp_path, capsys, command):
    if command in DIRECTORY_OUTPUTS:
        out = tmp_path / "out"
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    else:
        out = tmp_path / "out.json"
        out.write_text('{"mine": 1}')
    argv = _argv(command, tmp_path, out)
    before = tree_snapshot(tmp_path)
    line = error_line(capsys, argv)
    assert line.endswith(
        f"{_flag(command)}: {str(out)!r} already exists and is not empty. Choose a new path or "
        "pass --overwrite to replace it."
    ), line
    assert tree_snapshot(tmp_path) == before


def _run_directory(root: Path) -> Path:
    """A training run's output directory: metrics and a committed checkpoint."""
    root.mkdir()
    (root / "metrics.jsonl").write_text('{"type": "train", "step": 1}\n')
    staging = ckpt.prepare_staging(root / "checkpoints", 1)
    (staging / "weights.bin").write_bytes(b"w" * 64)
    ckpt.commit_checkpoint(root / "checkpoints", staging, 1)
    return root


@pytest.mark.parametrize("command", DIRECTORY_OUTPUTS)
def test_run_directory_is_never_replaced_even_with_overwrite(tmp_path, capsys, command):
    out = _run_directory(tmp_path / "run")
    argv = _argv(command, tmp_path, out) + ["--overwrite"]
    before = tree_snapshot(tmp_path)
    line = error_line(capsys, argv)
    assert f"--out: {str(out)!r} holds a training run (checkpoint " in line, line
    assert line.endswith("it is never replaced, not even with --overwrite. Choose another path.")
    assert tree_snapshot(tmp_path) == before


@pytest.mark.parametrize("command", DIRECTORY_OUTPUTS)
def test_run_lock_alone_protects_a_directory(tmp_path, capsys, command):
    out = tmp_path / "starting_run"
    out.mkdir()
    (out / ".layerfreeze.lock").write_text("host=x pid=1\n")
    line = error_line(capsys, _argv(command, tmp_path, out) + ["--overwrite"])
    assert "holds a training run (a run lock" in line, line


def test_tokenizer_train_writes_into_an_empty_directory_and_replaces_with_overwrite(tmp_path):
    from layerfreeze.cli import main

    out = tmp_path / "tok"
    out.mkdir()  # empty: written without --overwrite
    argv = _argv("tokenizer train", tmp_path, out)
    assert main(argv) == 0 and (out / "tokenizer.model").is_file()
    (out / "stale.txt").write_text("old")
    assert main(argv + ["--overwrite"]) == 0
    assert (out / "tokenizer.model").is_file() and not (out / "stale.txt").exists()
