"""Tiny tokenizers and models for the evaluation tests (and ``bench/eval_speed.py``).

Tokenizers are SentencePiece BPE models trained here on generated text (never on the
benchmark files), with byte fallback so every Chinese character encodes, saved as
``tokenizer.model`` and loaded through ``transformers.LlamaTokenizer.from_pretrained`` (which
converts it to a tokenizers backend), then saved/loaded again with ``AutoTokenizer`` so the
real loading path is used.

- ``letters="merged"``: the corpus has `` A`` … `` D`` as words, so ``" A"`` is one piece.
- ``letters="split"``: the corpus has no Latin letters, so ``" A"`` becomes ``"▁" + <0x41>``:
  a two-token continuation whose first token is shared by the four letters.
"""

from __future__ import annotations

import random
from pathlib import Path

# Template words of the prompt formats (not benchmark content).
_TEMPLATE = "以下是中国关于考试的单项选择题，请选出其中的正确答案。直接给出选项题目答案是："


def _common_chars(n: int, seed: int) -> list[str]:
    """``n`` frequent simplified characters: the GB2312 level-1 block (rows 16-55)."""
    chars = []
    for hi in range(0xB0, 0xD8):
        for lo in range(0xA1, 0xFF):
            try:
                chars.append(bytes([hi, lo]).decode("gb2312"))
            except UnicodeDecodeError:
                continue
    rng = random.Random(seed)
    rng.shuffle(chars)
    return chars[:n]


def generate_corpus(path: Path, letters: str, num_lines: int = 3000, num_chars: int = 600,
                    seed: int = 0) -> Path:
    """Write generated training text for a tokenizer (random words, template, digits)."""
    rng = random.Random(seed)
    chars = _common_chars(num_chars, seed) + list(_TEMPLATE)
    lines = []
    for _ in range(num_lines):
        words = []
        for _ in range(rng.randint(3, 12)):
            words.append("".join(rng.choice(chars) for _ in range(rng.randint(1, 4))))
        if letters == "merged":
            words.append(rng.choice(["A", "B", "C", "D"]))
            words.append(f"{rng.choice('ABCD')}. {rng.randint(0, 99)}")
        else:
            words.append(str(rng.randint(0, 999)))
        lines.append(" ".join(words) + rng.choice(["。", "，", "：", "？", ""]))
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def build_tokenizer(directory: Path, letters: str = "merged", vocab_size: int = 1000,
                    num_chars: int = 600):
    """Train a byte-fallback SentencePiece model and return it as a transformers tokenizer.

    The tokenizer is saved to ``directory/hf`` (``AutoTokenizer.from_pretrained`` loads it).
    """
    import sentencepiece as spm
    from transformers import AutoTokenizer, LlamaTokenizer

    if letters not in ("merged", "split"):
        raise ValueError(f"letters: use 'merged' or 'split', got {letters!r}.")
    directory = Path(directory)
    (directory / "sp").mkdir(parents=True, exist_ok=True)
    corpus = generate_corpus(directory / "corpus.txt", letters, num_chars=num_chars)
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(directory / "sp" / "tokenizer"),
        vocab_size=vocab_size, model_type="bpe", byte_fallback=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2, num_threads=1,
        split_digits=True, normalization_rule_name="identity",
    )
    tok = LlamaTokenizer.from_pretrained(
        str(directory / "sp"), bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        add_bos_token=True,
    )
    tok.save_pretrained(str(directory / "hf"))
    return AutoTokenizer.from_pretrained(str(directory / "hf"))


def build_eval_model(vocab_size: int, num_layers: int = 2, hidden: int = 64, seed: int = 0,
                     max_positions: int = 8192, attn_implementation: str = "sdpa"):
    """A seeded tiny Llama sized for a tokenizer (long context: 5-shot prompts are long)."""
    from tests.helpers.tiny_models import build_tiny_model

    return build_tiny_model(
        "llama", num_layers=num_layers, hidden=hidden, num_heads=4, num_kv_heads=2,
        vocab_size=vocab_size, seed=seed, attn_implementation=attn_implementation,
        max_positions=max_positions,
    )


_TOKENIZERS: dict[str, tuple[object, Path]] = {}


def cached_tokenizer(letters: str = "merged"):
    """One trained tokenizer per process and ``letters`` kind (tests share it)."""
    import tempfile

    if letters not in _TOKENIZERS:
        d = Path(tempfile.mkdtemp(prefix=f"lf-tok-{letters}-"))
        _TOKENIZERS[letters] = (build_tokenizer(d, letters), d / "hf")
    return _TOKENIZERS[letters][0]


def cached_tokenizer_dir(letters: str = "merged") -> Path:
    """The saved directory of :func:`cached_tokenizer` (``AutoTokenizer.from_pretrained`` it)."""
    cached_tokenizer(letters)
    return _TOKENIZERS[letters][1]


# -- lm-evaluation-harness as the independent reference ---------------------------------------

def lm_eval_task_dir() -> Path:
    import lm_eval

    return Path(lm_eval.__file__).parent / "tasks"


def lm_eval_task_config(benchmark: str, subject: str, data_dir: Path, work: Path) -> dict:
    """The installed lm-eval task config of one subject, pointed at local JSON copies of the CSVs.

    The config (templates, description, splits, sampler) is read from the installed package's
    YAML files (``ceval-valid_<s>.yaml`` + ``_default_ceval_yaml``, ``cmmlu_<s>.yaml`` +
    ``_default_template_yaml``); only ``dataset_path``/``dataset_kwargs`` are replaced because
    the hub is unreachable. The CSVs are converted with ``csv.DictReader`` (every cell a
    string); C-Eval dev's ``explanation`` and CMMLU's unnamed index column are dropped (lm-eval
    does not read them and ``datasets`` needs one schema across splits).
    """
    import csv
    import json

    import yaml

    tasks = lm_eval_task_dir()
    if benchmark == "ceval":
        sub = yaml.safe_load((tasks / "ceval" / f"ceval-valid_{subject}.yaml").read_text("utf-8"))
        base = yaml.safe_load((tasks / "ceval" / "_default_ceval_yaml").read_text("utf-8"))
        files = {"val": f"val/{subject}_val.csv", "dev": f"dev/{subject}_dev.csv"}
    else:
        sub = yaml.safe_load((tasks / "cmmlu" / f"cmmlu_{subject}.yaml").read_text("utf-8"))
        base = yaml.safe_load((tasks / "cmmlu" / "_default_template_yaml").read_text("utf-8"))
        files = {"test": f"test/{subject}.csv", "dev": f"dev/{subject}.csv"}
    cfg = {**base, **{k: v for k, v in sub.items() if k != "include"}}
    work.mkdir(parents=True, exist_ok=True)
    data_files = {}
    for split, rel in files.items():
        with open(Path(data_dir) / benchmark / rel, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
        out = work / f"{benchmark}_{subject}_{split}.jsonl"
        with open(out, "w", encoding="utf-8") as f:
            for r in rows:
                r.pop("explanation", None)
                r.pop("", None)
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        data_files[split] = str(out)
    cfg["dataset_path"] = "json"
    cfg.pop("dataset_name", None)
    cfg["dataset_kwargs"] = {"data_files": data_files}
    return cfg


def lm_eval_task(benchmark: str, subject: str, data_dir: Path, work: Path):
    """An lm-eval ``ConfigurableTask`` for one subject (see :func:`lm_eval_task_config`)."""
    from lm_eval.api.task import ConfigurableTask

    return ConfigurableTask(config=lm_eval_task_config(benchmark, subject, data_dir, work))


def save_eval_checkpoint(directory: Path, num_layers: int = 4, hidden: int = 32) -> Path:
    """A seeded tiny Llama sized for the merged tokenizer, saved with that tokenizer (what the
    CLI commands take as ``--model``)."""
    from transformers import AutoTokenizer

    tok = cached_tokenizer("merged")
    model = build_eval_model(len(tok), num_layers=num_layers, hidden=hidden, max_positions=512)
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(str(cached_tokenizer_dir("merged"))).save_pretrained(directory)
    return Path(directory)
