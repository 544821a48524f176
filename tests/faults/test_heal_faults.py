"""Bad input to ``layerfreeze prune --heal``: one line on stderr naming the option, exit 2, and
nothing written. bitsandbytes being absent is real: the child process blocks the import
(``sys.modules['bitsandbytes'] = None`` makes ``import bitsandbytes`` raise ImportError, as for a
package that is not installed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from layerfreeze.cli import main
from tests.helpers.tiny_models import build_tiny_model

REPO = Path(__file__).resolve().parents[2]
VOCAB = 400


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from layerfreeze.data import train_tokenizer
    from layerfreeze.data.corpus import default_corpus_files

    out = tmp_path_factory.mktemp("tok") / "tok"
    train_tokenizer([default_corpus_files()[0]], out, vocab_size=VOCAB)
    return out


def _checkpoint(root: Path, tokenizer_dir: Path, family: str = "llama") -> Path:
    from layerfreeze.data.tokenizer import load_tokenizer

    path = root / f"src-{family}"
    build_tiny_model(family, num_layers=3, vocab_size=VOCAB).save_pretrained(str(path))
    load_tokenizer(str(tokenizer_dir)).save_pretrained(str(path))
    return path


def _bad(capsys, root: Path, args: list[str]) -> str:
    before = sorted(p.name for p in root.iterdir())
    capsys.readouterr()
    assert main(["prune", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert sorted(p.name for p in root.iterdir()) == before  # nothing left behind
    return err[0]


def test_nf4_without_bitsandbytes_is_one_line_before_loading(tmp_path, tokenizer_dir):
    src = _checkpoint(tmp_path, tokenizer_dir)
    code = (
        "import sys; sys.modules['bitsandbytes'] = None\n"
        "from layerfreeze.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code, "prune", "--model", str(src), "--num-layers", "1",
         "--out", str(tmp_path / "out"), "--heal", "--heal-quantize", "nf4"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert "--heal-quantize: nf4 needs bitsandbytes, which is not installed" in err[0]
    assert "pip install 'layerfreeze[quant]'" in err[0]
    assert not (tmp_path / "out").exists()


def test_nf4_on_a_layer_linear4bit_cannot_replace_names_it(tmp_path, tokenizer_dir, capsys):
    pytest.importorskip("bitsandbytes")
    src = _checkpoint(tmp_path, tokenizer_dir, "gpt2")  # GPT-2's projections are Conv1D
    line = _bad(capsys, tmp_path, ["--model", str(src), "--num-layers", "1", "--out",
                                   str(tmp_path / "out"), "--strategy", "deepest", "--heal",
                                   "--heal-quantize", "nf4", "--heal-seq-len", "32"])
    assert ": --heal-quantize: nf4 cannot quantize layer 0 (transformer.h.0).attn.c_attn" in line
    assert "is a Conv1D (and 11 more)" in line and "Use none for this model" in line, line


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--heal", "--heal-quantize", "int8"],
         "--heal-quantize: must be one of none, nf4, got 'int8'."),
        (["--heal-quantize", "nf4"], "--heal-quantize: given without --heal."),
        (["--heal", "--heal-steps", "0"], "--heal-steps: must be an integer >= 1, got 0."),
        (["--heal", "--heal-lr", "nan"], "--heal-lr: must be a finite number > 0, got nan."),
        (["--heal", "--heal-heldout-fraction", "1"], "--heal-heldout-fraction: must be in (0, 1)"),
        (["--heal", "--heal-plan", "0:nosuch"], "--heal-plan[0]: unknown policy 'nosuch'."),
        (["--heal", "--heal-data", "missing.txt"],
         "--heal-data[0]: no such file or directory, got 'missing.txt'."),
    ],
)
def test_bad_heal_options_are_one_line(tmp_path, tokenizer_dir, capsys, args, expected):
    src = _checkpoint(tmp_path, tokenizer_dir)
    line = _bad(capsys, tmp_path, ["--model", str(src), "--num-layers", "1", "--out",
                                   str(tmp_path / "out"), "--strategy", "deepest", *args])
    assert expected in line, line
