"""Hostile and mistaken ``tokenizer.extend_from`` settings: each a one-line error naming the key
(exit 2 from the CLI), nothing half-written, and a reused tokenizer never silently different."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from layerfreeze.cli import main
from layerfreeze.config import load_config
from layerfreeze.data.config import TokenizerConfig
from layerfreeze.data.extend_run import prepare_extended
from layerfreeze.errors import ConfigError
from tests.faults._train import tiny_config, write_config
from tests.helpers.tokenizer_fixtures import build_llama2_style, build_qwen_style, bundled

BASE = ["model.path=/nonexistent-model", "plan.spec=freeze_deep"]


@pytest.fixture(scope="module")
def llama2_base(tmp_path_factory) -> Path:
    return build_llama2_style(tmp_path_factory.mktemp("llama2") / "base")


def _one(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_extend_from_needs_model_path():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.architecture.model_type=llama", "plan.spec=freeze_deep",
                           "tokenizer.extend_from=/some/tok"])
    assert _one(e).startswith("tokenizer.extend_from:") and "model.path" in str(e.value)


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"extend_from": "tok", "path": "other"}, "tokenizer.extend_from:"),
        ({"extend_from": "  "}, "tokenizer.extend_from:"),
        ({"extend_from": "tok", "max_new": 0}, "tokenizer.max_new:"),
        ({"max_new": 5}, "tokenizer.max_new:"),
    ],
)
def test_bad_combinations(kwargs, key):
    with pytest.raises(ConfigError) as e:
        TokenizerConfig(**kwargs)
    assert _one(e).startswith(key)


def test_from_id_auto_without_extend_from_is_refused(tmp_path):
    """``validate`` (and ``train``) exit 2 naming the plan part and tokenizer.extend_from."""
    cfg = tiny_config(tmp_path / "run", tmp_path / "cache")
    cfg["plan"] = {"spec": "0:full,embeddings:new_rows(from_id=auto)"}
    config = write_config(tmp_path / "run.yaml", cfg)
    from torch import nn

    from layerfreeze.policies.new_rows import install_new_rows
    from layerfreeze.train import build_schedule

    plan = build_schedule(load_config(config)).plans[0].resolve(2, path="plan.spec")
    assert plan.embeddings.options.from_id == "auto"  # left as written
    with pytest.raises(ConfigError) as e:
        install_new_rows(nn.Embedding(10, 4), "auto", "embedding", "plan.spec.embeddings")
    assert _one(e).startswith("plan.spec.embeddings: new_rows(from_id=auto)")
    assert "tokenizer.extend_from" in str(e.value)


@pytest.mark.slow
def test_from_id_auto_without_extend_from_cli(tmp_path, capsys):
    cfg = tiny_config(tmp_path / "run", tmp_path / "cache")
    cfg["plan"] = {"spec": "0:full,embeddings:new_rows(from_id=auto)"}
    config = write_config(tmp_path / "run.yaml", cfg)
    from tests.faults._train import last_line, train

    r = train(config)
    assert r.returncode == 2
    line = last_line(r.stderr)
    assert "new_rows(from_id=auto)" in line and "tokenizer.extend_from" in line
    assert not (tmp_path / "run").exists()  # nothing left behind


def test_missing_base_named_before_anything_is_written(tmp_path):
    cfg = tiny_config(tmp_path / "run", tmp_path / "cache")
    cfg["model"] = {"path": str(tmp_path / "model")}
    cfg["tokenizer"] = {"extend_from": str(tmp_path / "nope")}
    cfg["plan"] = {"spec": "embeddings:new_rows(from_id=auto)"}
    config = write_config(tmp_path / "run.yaml", cfg)
    rc = main(["validate", "--config", str(config)])
    assert rc == 2
    from layerfreeze.train import build_schedule

    with pytest.raises(ConfigError) as e:
        build_schedule(load_config(config))
    assert _one(e).startswith("tokenizer.extend_from:") and "nope" in str(e.value)
    assert not (tmp_path / "run").exists()


def _cfg(base: Path, **kw) -> TokenizerConfig:
    return TokenizerConfig(extend_from=str(base), vocab_size=kw.pop("vocab_size", 1200), **kw)


def test_reuse_only_when_settings_match(tmp_path, llama2_base):
    out = tmp_path / "tokenizer"
    zh = [str(bundled("zh.txt"))]
    prepare_extended(_cfg(llama2_base), zh, out)
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    prepare_extended(_cfg(llama2_base), zh, out)  # reused as it is
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files

    with pytest.raises(ConfigError) as e:
        prepare_extended(_cfg(llama2_base, vocab_size=1300), zh, out)
    assert _one(e).startswith("tokenizer.vocab_size:") and "1200" in str(e.value)
    with pytest.raises(ConfigError) as e:
        prepare_extended(_cfg(llama2_base, max_new=10), zh, out)
    assert _one(e).startswith("tokenizer.max_new:")

    # same path, other content: the base tokenizer was replaced under the run
    other = build_qwen_style(tmp_path / "qwen")
    moved = tmp_path / "moved"
    shutil.move(str(llama2_base), moved)
    try:
        shutil.copytree(other, llama2_base)
        with pytest.raises(ConfigError) as e:
            prepare_extended(_cfg(llama2_base), zh, out)
        assert _one(e).startswith("tokenizer.extend_from:") and "another base" in str(e.value)
    finally:
        shutil.rmtree(llama2_base)
        shutil.move(str(moved), llama2_base)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files


def test_foreign_tokenizer_in_out_dir_refused(tmp_path, llama2_base):
    out = tmp_path / "tokenizer"
    shutil.copytree(llama2_base, out)  # a tokenizer the run did not extend
    with pytest.raises(ConfigError) as e:
        prepare_extended(_cfg(llama2_base), [str(bundled("zh.txt"))], out)
    assert _one(e).startswith("tokenizer.extend_from:") and "layerfreeze_vocab_extend.json" in str(
        e.value
    )


def test_report_without_settings_refused(tmp_path, llama2_base):
    out = tmp_path / "tokenizer"
    prepare_extended(_cfg(llama2_base), [str(bundled("zh.txt"))], out)
    report = out / "layerfreeze_vocab_extend.json"
    data = json.loads(report.read_text())
    data.pop("settings")
    report.write_text(json.dumps(data))
    with pytest.raises(ConfigError):
        prepare_extended(_cfg(llama2_base), [str(bundled("zh.txt"))], out)


def test_corpus_too_small_names_run_keys(tmp_path, llama2_base):
    out = tmp_path / "tokenizer"
    with pytest.raises(ConfigError) as e:
        prepare_extended(_cfg(llama2_base, vocab_size=300), [str(bundled("zh.txt"))], out)
    assert _one(e).startswith("tokenizer.vocab_size:")
    assert not out.exists()  # nothing half-written
