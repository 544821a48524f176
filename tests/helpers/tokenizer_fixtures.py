"""Base tokenizers built locally (no hub) for the vocabulary-extension tests.

- :func:`build_llama2_style`: a SentencePiece BPE model (byte fallback, split digits, dummy
  prefix: Llama-2's trainer settings) trained on English only, saved as transformers'
  ``LlamaTokenizer`` (tokenizer.json + tokenizer_config.json) with ``tokenizer.model`` beside.
- :func:`build_qwen_style`: a byte-level BPE trained with ``tokenizers`` on English only behind
  Qwen2's pre-tokenizer (regex split, then ``ByteLevel``), ``<|endoftext|>`` added after the BPE
  vocabulary (as Qwen's specials are), saved as ``Qwen2Tokenizer``.
"""

from __future__ import annotations

from pathlib import Path

from layerfreeze.data.corpus import default_corpus_files

# Qwen2's pre-tokenizer split pattern (tokenizer.json of Qwen/Qwen2-0.5B).
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)


def bundled(name: str) -> Path:
    """One file of the bundled corpus (``en.txt``, ``zh.txt``, ``mixed.jsonl``)."""
    return next(p for p in default_corpus_files() if p.name == name)


def _english_lines() -> list[str]:
    return [x for x in bundled("en.txt").read_text(encoding="utf-8").splitlines() if x.strip()]


def build_llama2_style(directory: Path, vocab_size: int = 600) -> Path:
    import io

    import sentencepiece as spm
    from transformers import LlamaTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_english_lines()),
        model_writer=buf,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        split_digits=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    (directory / "tokenizer.model").write_bytes(buf.getvalue())
    tok = LlamaTokenizer.from_pretrained(str(directory))
    tok.save_pretrained(str(directory))
    return directory


def build_qwen_style(directory: Path, vocab_size: int = 600) -> Path:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        special_tokens=[],
    )
    tok.train_from_iterator(_english_lines(), trainer)
    hf = Qwen2Tokenizer(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
    )
    directory.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(directory))
    return directory


# Llama-3's pre-tokenizer split pattern (tokenizer.json of meta-llama/Meta-Llama-3-8B).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)


def build_llama3_style(directory: Path, vocab_size: int = 600) -> Path:
    """Byte-level BPE with ``ignore_merges`` (a whole pre-token in the vocabulary is taken as
    is), ``<|begin_of_text|>`` / ``<|end_of_text|>`` after the vocabulary, BOS added by a
    template post-processor, saved as the generic fast tokenizer (Llama-3's own class)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        special_tokens=[],
    )
    tok.train_from_iterator(_english_lines(), trainer)
    tok.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>"])
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)],
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>"
    )
    directory.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(directory))
    return directory
