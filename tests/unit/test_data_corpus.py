"""Bundled corpus, input discovery, document readers and the data config section."""

from __future__ import annotations

import json
import re

import pytest

from layerfreeze.data import DataConfig, default_corpus_files, iter_documents, resolve_files
from layerfreeze.data import corpus_gen
from layerfreeze.errors import ConfigError
from layerfreeze.utils.schema import field_docs, from_dict


def test_bundled_corpus_is_the_generators_output():
    files = default_corpus_files()
    assert [f.name for f in files] == ["en.txt", "mixed.jsonl", "zh.txt"]
    generated = corpus_gen.generate()
    assert sorted(generated) == [f.name for f in files]
    for f in files:
        assert f.read_text(encoding="utf-8") == generated[f.name], f"{f.name} drifted: rerun corpus_gen"
    assert corpus_gen.generate() == generated  # deterministic


def test_bundled_corpus_size_and_languages():
    files = default_corpus_files()
    total = sum(f.stat().st_size for f in files)
    assert 300_000 <= total <= 800_000
    docs = [d for f in files for d in iter_documents(f)]
    assert len(docs) == sum(corpus_gen.FILES.values())
    han = sum(len(re.findall(r"[\u4e00-\u9fff]", d)) for d in docs)
    latin = sum(len(re.findall(r"[A-Za-z]", d)) for d in docs)
    assert han > 50_000 and latin > 150_000
    # Many distinct sentences, not a handful repeated.
    sentences = {s for d in docs for s in re.split(r"(?<=[。.])\s*", d) if s}
    assert len(sentences) > 3000


def test_generator_writes_files(tmp_path):
    paths = corpus_gen.write_corpus(tmp_path, seed=7)
    assert sorted(p.name for p in paths) == ["en.txt", "mixed.jsonl", "zh.txt"]
    assert (tmp_path / "zh.txt").read_text(encoding="utf-8") == corpus_gen.generate(7)["zh.txt"]
    assert corpus_gen.generate(7) != corpus_gen.generate()


def test_resolve_files_directories_recursive_sorted_and_dedup(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "deep").mkdir(parents=True)
    for rel in ["b/2.txt", "a/deep/1.jsonl", "a/0.txt", "a/skip.md", "z.txt"]:
        (tmp_path / rel).write_text("x", encoding="utf-8")
    got = resolve_files([tmp_path / "z.txt", tmp_path, str(tmp_path / "a" / "0.txt")])
    rel = [p.relative_to(tmp_path.resolve()).as_posix() for p in got]
    assert rel == ["z.txt", "a/0.txt", "a/deep/1.jsonl", "b/2.txt"]
    assert resolve_files(["@bundled"]) == default_corpus_files()


def test_resolve_files_reports_every_bad_entry(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(ConfigError) as err:
        resolve_files([tmp_path / "missing.txt", tmp_path / "empty", tmp_path / "notes.md"])
    p = err.value.problems
    assert len(p) == 3
    assert p[0].startswith("data.paths[0]: no such file or directory, got '") and "missing.txt" in p[0]
    assert p[1].startswith("data.paths[1]: directory '") and "holds no .txt or .jsonl files" in p[1]
    assert p[2].startswith("data.paths[2]: unsupported file type '.md'")
    with pytest.raises(ConfigError, match=r"data.paths: no input files given, got \[\]"):
        resolve_files([])


def test_txt_paragraph_and_line_modes(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("  first doc line one\nline two\n\n\n second doc \n   \nthird\n", encoding="utf-8")
    assert list(iter_documents(f)) == ["first doc line one\nline two", "second doc", "third"]
    assert list(iter_documents(f, txt_documents="line")) == [
        "first doc line one", "line two", "second doc", "third",
    ]
    with pytest.raises(ValueError, match="data.txt_documents: must be one of paragraph, line, got 'page'"):
        list(iter_documents(f, txt_documents="page"))


def test_jsonl_text_key_and_errors(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(
        json.dumps({"text": "一", "body": "b1"}) + "\n\n" + json.dumps({"text": "  ", "body": "b2"}) + "\n",
        encoding="utf-8",
    )
    assert list(iter_documents(f)) == ["一"]  # blank line and whitespace-only text skipped
    assert list(iter_documents(f, text_key="body")) == ["b1", "b2"]
    with pytest.raises(ValueError, match=r"d.jsonl:1: no 'content' field \(keys: body, text\)\. Set data.text_key"):
        list(iter_documents(f, text_key="content"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        list(iter_documents(bad))
    bad.write_text('["a list"]\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: expected a JSON object with a 'text' field, got list"):
        list(iter_documents(bad))
    bad.write_text('{"text": 3}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: field 'text' must be a string, got int"):
        list(iter_documents(bad))


def test_non_utf8_names_the_file(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("ok\n\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt:\d+: not valid UTF-8"):
        list(iter_documents(f))


def test_data_config_validation_names_keys():
    cfg = from_dict(DataConfig, {})
    assert cfg.paths == ["@bundled"] and cfg.seq_len == 256 and cfg.txt_documents == "paragraph"
    with pytest.raises(ConfigError) as err:
        from_dict(DataConfig, {"paths": [], "seq_len": 0, "text_key": ""})
    p = err.value.problems
    assert any(x.startswith("data.paths: no input given, got []") for x in p)
    assert any(x.startswith("data.seq_len: must be at least 1, got 0") for x in p)
    assert any(x.startswith("data.text_key: must not be empty") for x in p)
    with pytest.raises(ConfigError, match="txt_documents: must be one of 'paragraph', 'line', got 'page'"):
        from_dict(DataConfig, {"txt_documents": "page"})
    with pytest.raises(ConfigError, match="seq_length: unknown key. Did you mean 'seq_len'"):
        from_dict(DataConfig, {"seq_length": 4})


def test_every_config_field_is_documented():
    from layerfreeze.data import TokenizerConfig

    for cls in (DataConfig, TokenizerConfig):
        docs = field_docs(cls)
        missing = [f for f in cls.__dataclass_fields__ if not docs.get(f)]
        assert not missing, f"{cls.__name__} fields without a docstring: {missing}"


def test_cache_dir_default(monkeypatch, tmp_path):
    monkeypatch.setenv("LAYERFREEZE_CACHE", str(tmp_path / "c"))
    assert DataConfig().resolved_cache_dir() == tmp_path / "c"
    assert DataConfig(cache_dir=str(tmp_path / "x")).resolved_cache_dir() == tmp_path / "x"
    monkeypatch.delenv("LAYERFREEZE_CACHE")
    assert DataConfig().resolved_cache_dir().parts[-3:] == (".cache", "layerfreeze", "tokens")
