"""docs/cpt-chinese.md runs as written: every fenced ``bash`` block, in order, in one shell, in
an empty directory (``$EVAL_DATA`` = the real C-Eval/CMMLU files), then the outcomes are
checked against the base model and tokenizer the page built: the tokenizer grew with every old
id kept, old embedding/head rows are bit-identical after training, the new rows moved, the
evaluation JSON exists, and the export loads with transformers and AutoTokenizer."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
PAGE = REPO / "docs" / "cpt-chinese.md"


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)


def test_page_has_the_commands():
    blocks = bash_blocks(PAGE.read_text(encoding="utf-8"))
    script = "\n".join(blocks)
    assert len(blocks) >= 4
    for needed in ("layerfreeze tokenizer train", "extend_from:", "new_rows(from_id=auto)",
                   "layerfreeze train --config cpt-zh.yaml", "layerfreeze eval", "Qwen2Tokenizer"):
        assert needed in script, needed


@pytest.fixture(scope="module")
def page_run(tmp_path_factory, eval_data_dir):
    work = tmp_path_factory.mktemp("cpt_zh_page")
    script = "set -euo pipefail\n" + "\n".join(bash_blocks(PAGE.read_text(encoding="utf-8")))
    env = dict(os.environ)
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update({
        "EVAL_DATA": str(eval_data_dir), "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline",
        "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore",
        "PYTHONPATH": str(REPO), "PATH": f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
    })
    r = subprocess.run(["bash", "-c", script], cwd=work, env=env, capture_output=True, text=True,
                       timeout=1800)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    return work, r


def _rows_check(base_dir: Path, export_dir: Path, tied: bool) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    old = AutoTokenizer.from_pretrained(str(base_dir))
    new = AutoTokenizer.from_pretrained(str(export_dir))
    assert type(new) is type(old)
    n_old, n_new = len(old), len(new)
    assert n_new > n_old  # the tokenizer grew
    vocab = new.get_vocab()
    assert all(vocab[t] == i for t, i in old.get_vocab().items())  # old ids unchanged
    base = AutoModelForCausalLM.from_pretrained(str(base_dir))
    export = AutoModelForCausalLM.from_pretrained(str(export_dir))
    gets = ["get_input_embeddings"] + ([] if tied else ["get_output_embeddings"])
    for get in gets:
        before = getattr(base, get)().weight.detach()
        after = getattr(export, get)().weight.detach()
        assert after.shape[0] == n_new
        assert torch.equal(after[:n_old], before)  # old rows bit-identical after training
        # new rows moved off their resize init: the mean of the old sub-token rows (Llama-2
        # page run, subtoken_mean) or of all old rows (Qwen run, mean)
        inits = []
        for i in range(n_old, n_new):
            ids = old.encode(new.decode([i]), add_special_tokens=False) if not tied else []
            inits.append(before[ids].float().mean(0) if ids else before.float().mean(0))
        moved = (after[n_old:].float() - torch.stack(inits)).abs().amax(dim=1)
        assert (moved > 0).float().mean() > 0.9 and moved.max() < 0.1


def test_llama2_style_run(page_run):
    work, r = page_run
    run = work / "runs" / "cpt-zh"
    _rows_check(work / "runs" / "en" / "export", run / "export", tied=False)
    report = json.loads((run / "tokenizer" / "layerfreeze_vocab_extend.json").read_text())
    assert report["kind"] == "sentencepiece"
    assert report["tokens_per_zh_char_after"] < report["tokens_per_zh_char_before"]
    # the page's printed numbers are the report's
    before, after = report["tokens_per_zh_char_before"], report["tokens_per_zh_char_after"]
    assert f"{before} -> {after}" in r.stdout
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert summary["history"]
    assert sorted((run / "eval").glob("step_*.json"))
    scores = json.loads((work / "cmmlu-export.json").read_text())
    assert scores  # eval of the export wrote its JSON
    assert "embedding rows" in r.stdout


def test_qwen_style_run(page_run):
    work, _ = page_run
    run = work / "runs" / "cpt-zh-qwen"
    _rows_check(work / "qwen-en", run / "export", tied=True)
    report = json.loads((run / "tokenizer" / "layerfreeze_vocab_extend.json").read_text())
    assert report["kind"] == "byte_level_bpe"
    assert report["tokens_per_zh_char_after"] < report["tokens_per_zh_char_before"]
