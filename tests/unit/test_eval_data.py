"""C-Eval / CMMLU loading from the released layouts, and every bad-data error."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from layerfreeze.evaluation.data import list_subjects, load_benchmark

CEVAL_SUBJECTS = 52
CMMLU_SUBJECTS = 67


def _count_rows(path: Path) -> int:
    with open(path, encoding="utf-8", newline="") as f:
        return sum(1 for _ in csv.DictReader(f))


def test_ceval_val_loads_all_subjects(eval_data_dir):
    b = load_benchmark("ceval", eval_data_dir, "val")
    assert len(b.subjects) == CEVAL_SUBJECTS
    assert b.num_questions == 1346
    for s in b.subjects:
        assert len(s.questions) == _count_rows(eval_data_dir / "ceval" / "val" / f"{s.name}_val.csv")
        assert len(s.dev) == 5
        assert [q.index for q in s.questions] == list(range(len(s.questions)))
        assert all(q.answer in "ABCD" and len(q.answer) == 1 for q in s.questions)
    cats = {s.name: s.categories for s in b.subjects}
    assert cats["clinical_medicine"] == ("Other",)  # no category in the official mapping
    assert cats["computer_network"] == ("STEM",)
    counts = {c: sum(1 for v in cats.values() if v == (c,)) for c in
              ("STEM", "Social Science", "Humanities", "Other")}
    assert sum(counts.values()) == CEVAL_SUBJECTS
    mapping = json.loads((eval_data_dir / "ceval" / "subject_mapping.json").read_text("utf-8"))
    assert b.subject("accountant").name_zh == mapping["accountant"][1]


def test_ceval_test_has_no_answers(eval_data_dir):
    b = load_benchmark("ceval", eval_data_dir / "ceval", "test", ["accountant", "law"])
    assert [s.name for s in b.subjects] == ["accountant", "law"]
    assert all(q.answer is None for s in b.subjects for q in s.questions)
    n = sum(_count_rows(eval_data_dir / "ceval" / "test" / f"{s}_test.csv")
            for s in ("accountant", "law"))
    assert b.num_questions == n


def test_cmmlu_test_loads_all_subjects(eval_data_dir):
    b = load_benchmark("cmmlu", eval_data_dir)
    assert b.split == "test"
    assert len(b.subjects) == CMMLU_SUBJECTS
    assert b.num_questions == 11582
    cats = {s.name: s.categories for s in b.subjects}
    meta = json.loads((eval_data_dir / "cmmlu" / "categories.json").read_text("utf-8"))
    for name, subs in meta["subcategories"].items():
        expected = {c for c, members in meta["categories"].items() if set(subs) & set(members)}
        assert set(cats[name]) == expected, name
    assert "China specific" in cats["chinese_history"]
    assert any(len(v) == 2 for v in cats.values())


def test_every_cell_is_read_verbatim_as_a_string(eval_data_dir):
    # An independent reader: the csv module's DictReader on the same file, cell by cell.
    path = eval_data_dir / "cmmlu" / "dev" / "college_actuarial_science.csv"
    with open(path, encoding="utf-8", newline="") as f:
        raw = list(csv.DictReader(f))
    b = load_benchmark("cmmlu", eval_data_dir, "dev", ["college_actuarial_science"])
    got = b.subjects[0].questions
    assert [(q.question, *q.choices, q.answer) for q in got] == [
        (r["Question"], r["A"], r["B"], r["C"], r["D"], r["Answer"]) for r in raw
    ]
    assert all(isinstance(c, str) for q in got for c in q.choices)


def test_multiline_cells_and_edge_whitespace_survive(eval_data_dir):
    b = load_benchmark("ceval", eval_data_dir, "val", ["high_school_politics", "college_programming"])
    assert any("\n" in q.question for q in b.subject("high_school_politics").questions)
    assert any("\n" in c for q in b.subject("college_programming").questions for c in q.choices)
    c = load_benchmark("cmmlu", eval_data_dir)
    assert any(ch != ch.strip() for s in c.subjects for q in s.questions for ch in q.choices)


def test_parent_or_benchmark_dir_both_work(eval_data_dir):
    a = load_benchmark("ceval", eval_data_dir, "val", ["law"])
    b = load_benchmark("ceval", eval_data_dir / "ceval", "val", ["law"])
    assert a.subjects[0].questions == b.subjects[0].questions
    assert len(list_subjects("ceval", eval_data_dir)) == CEVAL_SUBJECTS
    assert len(list_subjects("cmmlu")) == CMMLU_SUBJECTS  # built-in table for the hub path
    assert list_subjects("ceval") == list_subjects("ceval", eval_data_dir)
    assert list_subjects("cmmlu") == list_subjects("cmmlu", eval_data_dir)


# -- bad data: tmp copies of a few files ----------------------------------------------------

@pytest.fixture
def ceval_copy(eval_data_dir, tmp_path) -> Path:
    root = tmp_path / "ceval"
    for split in ("dev", "val"):
        (root / split).mkdir(parents=True)
        for s in ("law", "logic"):
            shutil.copy(eval_data_dir / "ceval" / split / f"{s}_{split}.csv", root / split)
    shutil.copy(eval_data_dir / "ceval" / "subject_mapping.json", root)
    return root


@pytest.fixture
def cmmlu_copy(eval_data_dir, tmp_path) -> Path:
    root = tmp_path / "cmmlu"
    for split in ("dev", "test"):
        (root / split).mkdir(parents=True)
        shutil.copy(eval_data_dir / "cmmlu" / split / "agronomy.csv", root / split)
    shutil.copy(eval_data_dir / "cmmlu" / "categories.json", root)
    return root


def _rewrite(path: Path, edit) -> None:
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    rows = edit(rows)
    with open(path, "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows(rows)


def test_error_missing_column(ceval_copy):
    path = ceval_copy / "val" / "law_val.csv"
    _rewrite(path, lambda rows: [r[:-1] for r in rows])  # drop 'answer'
    with pytest.raises(ValueError, match=r"law_val\.csv: missing column\(s\) 'answer'"):
        load_benchmark("ceval", ceval_copy, "val", ["law"])


def test_error_answer_outside_a_to_d(cmmlu_copy):
    path = cmmlu_copy / "test" / "agronomy.csv"

    def bad(rows):
        rows[3][-1] = "E"
        return rows

    _rewrite(path, bad)
    with pytest.raises(ValueError, match=r"agronomy\.csv row 2 \(line 4\): answer must be one of "
                                         r"A, B, C, D, got 'E'"):
        load_benchmark("cmmlu", cmmlu_copy, "test", ["agronomy"])


def test_error_empty_file_and_header_only(ceval_copy):
    path = ceval_copy / "val" / "law_val.csv"
    path.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match=r"law_val\.csv: file is empty"):
        load_benchmark("ceval", ceval_copy, "val", ["law"])
    path.write_text("id,question,A,B,C,D,answer\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"law_val\.csv: has a header but no questions"):
        load_benchmark("ceval", ceval_copy, "val", ["law"])


def test_error_missing_subject_file(ceval_copy):
    (ceval_copy / "val" / "logic_val.csv").unlink()
    with pytest.raises(ValueError, match=r"logic_val\.csv: subject file is missing for ceval "
                                         r"subject 'logic'"):
        load_benchmark("ceval", ceval_copy, "val", ["law", "logic"])


def test_error_unknown_subject_suggests(ceval_copy):
    with pytest.raises(ValueError, match=r"subjects: ceval has no subject 'lawx'\. Did you mean 'law'\?"):
        load_benchmark("ceval", ceval_copy, "val", ["lawx"])


def test_error_ragged_row(ceval_copy):
    path = ceval_copy / "val" / "law_val.csv"
    _rewrite(path, lambda rows: rows[:2] + [rows[2][:4]] + rows[3:])
    with pytest.raises(ValueError, match=r"law_val\.csv row 1 \(line 3\): has 4 cells but the "
                                         r"header has 7"):
        load_benchmark("ceval", ceval_copy, "val", ["law"])


def test_error_bad_split_benchmark_dir_mapping(ceval_copy, tmp_path):
    with pytest.raises(ValueError, match=r"split: cmmlu has no split 'val'"):
        load_benchmark("cmmlu", ceval_copy, "val")
    with pytest.raises(ValueError, match=r"benchmark: unknown benchmark, got 'mmlu'"):
        load_benchmark("mmlu", ceval_copy)
    with pytest.raises(ValueError, match=r"data_dir: no cmmlu data found"):
        load_benchmark("cmmlu", tmp_path / "nowhere")
    (ceval_copy / "subject_mapping.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match=r"subject_mapping\.json: not valid JSON"):
        load_benchmark("ceval", ceval_copy, "val", ["law"])


def test_error_hub_unreachable_is_clear(monkeypatch, tmp_path):
    # No network here: the real datasets.load_dataset call fails and the error says what to do.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ValueError, match=r"loading 'ceval/ceval-exam' \(config 'law', split 'val'\) "
                                         r"from the Hugging Face hub failed.*pass --data-dir"):
        load_benchmark("ceval", None, "val", ["law"])
