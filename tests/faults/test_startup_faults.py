"""Start-up faults of ``layerfreeze train`` / ``validate``: one line and exit 2, never a traceback.

* rendezvous port: a single plain process picks a free port when ``MASTER_PORT`` is unset (it
  used to bind 29500, so two runs on one machine collided); a given port that is in use is one
  line naming it;
* special-token ids: a model built from ``model.architecture`` takes the tokenizer's pad / bos /
  eos ids (Phi-3's default pad id 32000 made torch fail with ``Padding_idx must be within
  num_embeddings`` on a small vocabulary); an id the user sets outside the vocabulary is one
  line naming the field;
* outputs on kernel pseudo-filesystems (``/proc/x``, ``/dev/null/x``) and inputs that are FIFOs
  or character devices: one line naming the key;
* ``engine: megatron`` without CUDA: one line saying what is needed (it used to fail deep in
  megatron-core's DDP buffer allocation: ``Torch not compiled with CUDA enabled``);
* ``layerfreeze validate`` on an ``engine: megatron`` config prints the Megatron layout and runs
  Megatron's own checks (it printed a DeepSpeed config);
* the Megatron plan log reports model-wide parameter totals and what each pipeline stage holds
  (it counted rank 0's stage only), checked against the Hugging Face model's own counts.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.faults._train import launcher_env
from tests.helpers.cli import error_line
from tests.helpers.tiny_models import TINY_FAMILIES

REPO = Path(__file__).resolve().parents[2]
MEGATRON_ENTRY = "tests.helpers.megatron_train_entry"

ARCH = {
    "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
    "tie_word_embeddings": False,
}


def _config(tmp: Path, out: Path, arch: dict | None = None, **sections) -> Path:
    cfg = {
        "model": {"architecture": dict(arch or ARCH), "attn_implementation": "eager"},
        "tokenizer": {"vocab_size": 1000},
        "data": {"paths": ["@bundled"], "seq_len": 16, "cache_dir": str(tmp / "cache")},
        "plan": {"spec": "freeze_deep"},
        "deepspeed": {
            "zero_optimization": {"stage": 0},
            "optimizer": {"type": "AdamW", "params": {"torch_adam": True}},
            "steps_per_print": 1000000,
        },
        "optim": {"lr": 1e-3, "warmup_steps": 0},
        "train": {"steps": 1, "micro_batch_size": 2, "seed": 3, "num_threads": 1},
        "logging": {"out_dir": str(out), "progress": "none"},
        "checkpoint": {"export_final": False, "save_final": False},
        "eval": {"every_steps": 0, "at_end": False},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path = tmp / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture
def plain_process(monkeypatch):
    """An in-process CLI run as a plain process: no launcher variables."""
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")


# ---------------------------------------------------------------------------------------------
# rendezvous port
# ---------------------------------------------------------------------------------------------


def test_given_port_in_use_is_one_line(tmp_path, capsys, plain_process, monkeypatch):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        monkeypatch.setenv("MASTER_PORT", str(port))
        out = tmp_path / "run"
        line = error_line(capsys, ["train", "--config", str(_config(tmp_path, out))])
    assert f"MASTER_PORT: port {port} is in use" in line and "Unset MASTER_PORT" in line
    assert not out.exists()


@pytest.mark.slow
def test_unset_port_picks_a_free_one_while_29500_is_taken(tmp_path):
    held = socket.socket()
    try:
        held.bind(("127.0.0.1", 29500))
        held.listen(1)
    except OSError as e:  # someone else holds it: the run must not need it either way
        assert e.errno == errno.EADDRINUSE
    try:
        out = tmp_path / "run"
        proc = subprocess.run(
            [sys.executable, "-m", "layerfreeze", "train", "--config", str(_config(tmp_path, out))],
            cwd=REPO, env=launcher_env(), capture_output=True, text=True, timeout=600,
        )
    finally:
        held.close()
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (out / "summary.json").is_file()


# ---------------------------------------------------------------------------------------------
# special-token ids
# ---------------------------------------------------------------------------------------------

FAMILY_ARCH = {
    "llama": dict(ARCH),
    "qwen2": dict(ARCH, model_type="qwen2", use_sliding_window=False),
    "mistral": dict(ARCH, model_type="mistral", sliding_window=None),
    "gpt2": {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64},
    "gpt_neox": {"model_type": "gpt_neox", "hidden_size": 32, "intermediate_size": 64,
                 "num_hidden_layers": 2, "num_attention_heads": 4,
                 "max_position_embeddings": 64},
    "phi3": dict(ARCH, model_type="phi3"),  # its default pad id is 32000
}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from layerfreeze.config import TokenizerConfig
    from layerfreeze.data import prepare_tokenizer
    from layerfreeze.data.corpus import default_corpus_files

    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    return prepare_tokenizer(TokenizerConfig(vocab_size=1000), default_corpus_files(), out)


@pytest.mark.parametrize("family", [*TINY_FAMILIES, "phi3"])
def test_built_model_takes_the_tokenizers_special_ids(family, tokenizer):
    from layerfreeze.config import ModelConfig
    from layerfreeze.modeling import build_model, special_token_ids

    ids = special_token_ids(tokenizer)
    assert set(ids) == {"pad_token_id", "bos_token_id", "eos_token_id"}
    model = build_model(ModelConfig(architecture=FAMILY_ARCH[family], attn_implementation="eager"),
                        len(tokenizer), seed=0, special_ids=ids)
    for name, value in ids.items():
        assert getattr(model.config, name) == value == getattr(tokenizer, name), name
    emb = model.get_input_embeddings()
    assert emb.num_embeddings == len(tokenizer)
    if emb.padding_idx is not None:  # the families that use the pad id in the embedding
        assert emb.padding_idx == tokenizer.pad_token_id
    batch = torch.tensor([tokenizer("hello world")["input_ids"]])
    assert torch.isfinite(model(input_ids=batch).logits).all()


def test_special_id_outside_the_vocabulary_names_the_field(tokenizer):
    from layerfreeze.config import ModelConfig
    from layerfreeze.errors import ConfigError
    from layerfreeze.modeling import build_model, special_token_ids

    arch = dict(ARCH, model_type="phi3", eos_token_id=5000)
    with pytest.raises(ConfigError) as e:
        build_model(ModelConfig(architecture=arch), len(tokenizer), 0,
                    special_ids=special_token_ids(tokenizer))
    msg = str(e.value)
    assert msg.startswith("model.architecture.eos_token_id: 5000 is outside the 1000-token")
    assert "\n" not in msg


@pytest.mark.slow
def test_phi3_trains_from_the_tiny_config(tmp_path):
    out = tmp_path / "run"
    config = _config(tmp_path, out, arch=dict(ARCH, model_type="phi3"))
    proc = subprocess.run(
        [sys.executable, "-m", "layerfreeze", "train", "--config", str(config)],
        cwd=REPO, env=launcher_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------
# pseudo-filesystem outputs, special-file inputs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("logging.out_dir=/proc/layerfreeze_x", "logging.out_dir"),
        ("logging.out_dir=/dev/null/x", "logging.out_dir"),
        ("checkpoint.dir=/proc/self/x", "checkpoint.dir"),
        ("data.cache_dir=/sys/layerfreeze_y", "data.cache_dir"),
    ],
)
def test_output_on_a_pseudo_filesystem_is_one_line(tmp_path, capsys, plain_process, override, key):
    config = _config(tmp_path, tmp_path / "run")
    line = error_line(capsys, ["train", "--config", str(config), override])
    assert f"ERROR layerfreeze.train: {key}: cannot create" in line
    assert not (tmp_path / "run").exists()


def test_special_file_inputs_are_one_line(tmp_path, capsys, plain_process):
    fifo = tmp_path / "corpus.txt"
    os.mkfifo(fifo)
    config = _config(tmp_path, tmp_path / "run")
    line = error_line(capsys, ["train", "--config", str(config), f"data.paths=[{fifo}]"])
    assert f"data.paths[0]: not a regular file (a FIFO), got '{fifo}'" in line
    line = error_line(capsys, ["train", "--config", str(config), "data.paths=[/dev/zero]"])
    assert "data.paths[0]: not a regular file (a character device)" in line
    line = error_line(capsys, ["train", "--config", str(config), "data.paths=[/proc/self/mem]"])
    assert "data.paths[0]:" in line
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# Megatron: no CUDA, validate, plan totals
# ---------------------------------------------------------------------------------------------


def _megatron_config(tmp: Path, out: Path, tp: int = 1, pp: int = 1, **megatron) -> Path:
    path = _config(tmp, out)
    cfg = yaml.safe_load(path.read_text())
    cfg.pop("deepspeed")
    cfg["engine"] = "megatron"
    cfg["model"]["attn_implementation"] = "sdpa"
    cfg["model"]["architecture"]["num_hidden_layers"] = 4
    cfg["megatron"] = {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
                       **megatron}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


@pytest.mark.skipif(torch.cuda.is_available(), reason="the check is for machines without CUDA")
def test_megatron_without_cuda_is_one_line(tmp_path, capsys, plain_process):
    out = tmp_path / "run"
    line = error_line(capsys, ["train", "--config", str(_megatron_config(tmp_path, out))])
    assert "engine: megatron needs CUDA" in line and "engine: deepspeed" in line
    assert "tests/helpers/megatron.py is for the test suite only" in line
    assert not out.exists()


def test_validate_megatron_prints_the_layout(tmp_path, capsys, monkeypatch):
    from layerfreeze.cli import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    config = _megatron_config(tmp_path, tmp_path / "run", tp=2, pp=2,
                              virtual_pipeline_model_parallel_size=2)
    assert main(["validate", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "DeepSpeed config" not in out
    assert ("Megatron layout for 4 rank(s): tensor parallel 2 x pipeline parallel 2 (virtual "
            "chunks per stage: 2) x data parallel 1; 4 layers, 1 per model chunk") in out
    # interleaved: chunk c (one layer each) sits on stage c % 2
    assert "  stage 0: layers 0, 2 + embeddings\n" in out
    assert "  stage 1: layers 1, 3 + final norm + output layer\n" in out


def test_validate_megatron_runs_megatrons_checks(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    config = _megatron_config(tmp_path, tmp_path / "run", tp=1, pp=3)  # 4 layers over 3 stages
    line = error_line(capsys, ["validate", "--config", str(config)])
    assert "megatron.pipeline_model_parallel_size: 4 layers do not split evenly over 3" in line


def _hf_counts(config: Path, tokenizer_dir: Path) -> tuple[int, int]:
    """Trainable / total parameters of the Hugging Face model of the run (the same build and
    plan on the Hugging Face path: an independent count)."""
    from transformers import AutoTokenizer

    from layerfreeze.apply import apply_plan
    from layerfreeze.config import load_config
    from layerfreeze.modeling import build_model, special_token_ids

    cfg = load_config(config)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    model = build_model(cfg.model, len(tok), cfg.train.seed, special_token_ids(tok))
    applied = apply_plan(model, cfg.plan.spec)
    return applied.num_trainable_params(), applied.num_total_params()


@pytest.mark.slow
@pytest.mark.parametrize(("tp", "pp"), [(1, 2), (2, 1)])
def test_megatron_plan_log_counts_the_whole_model(tmp_path, tp, pp):
    out = tmp_path / "run"
    config = _megatron_config(tmp_path, out, tp=tp, pp=pp)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", MEGATRON_ENTRY, "train", "--config", str(config)]
    proc = subprocess.run(cmd, cwd=REPO, env=launcher_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    lines = [x for x in proc.stderr.splitlines() if "plan applied:" in x]
    assert len(lines) == 1, lines  # rank 0, once
    m = re.search(r"\((\d+) of (\d+) parameters trainable, model-wide: (\d) pipeline stage\(s\) "
                  r"x (\d) tensor-parallel rank\(s\)\)", lines[0])
    assert m, lines[0]
    trainable, total = _hf_counts(config, out / "tokenizer")
    assert (int(m.group(1)), int(m.group(2))) == (trainable, total)
    assert 0 < trainable < total  # freeze_deep: the deep half is frozen
    assert (int(m.group(3)), int(m.group(4))) == (pp, tp)
    if pp == 2:
        stage = re.findall(r"stage (\d): (.*?) \((\d+) of (\d+) trainable\)", lines[0])
        assert [s[:2] for s in stage] == [("0", "layers 0-1, embeddings"),
                                          ("1", "layers 2-3, final norm, output layer")]
        assert sum(int(s[2]) for s in stage) == trainable
        assert sum(int(s[3]) for s in stage) == total
        assert int(stage[1][2]) == 0  # freeze_deep: the deep stage trains nothing
