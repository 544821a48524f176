"""SentencePiece tokenizers: train one, save it so ``AutoTokenizer`` loads it, load either form.

A trained tokenizer directory holds:

- ``tokenizer.model``: the SentencePiece model itself (reference; ``load_tokenizer`` accepts it).
- ``tokenizer.json`` + ``tokenizer_config.json``: the same model as a ``tokenizers`` pipeline,
  written by ``transformers.TokenizersBackend.save_pretrained``; ``AutoTokenizer.from_pretrained``
  loads it as a fast tokenizer that encodes exactly like the SentencePiece processor.
- ``layerfreeze_tokenizer.json``: how it was trained (options, input files).

The conversion builds the ``tokenizers`` pipeline from the SentencePiece proto: the Unigram
(or BPE, with merges recovered from piece scores) model with byte fallback, a normalizer that
reproduces SentencePiece's (optional precompiled NFKC map, optional whitespace cleanup, the
dummy ``▁`` prefix, spaces to ``▁``), and a decoder that undoes it. ``load_tokenizer`` on a raw
``.model`` file runs the same conversion in memory.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from layerfreeze.errors import ConfigError
from layerfreeze.utils.io import atomic_directory, atomic_write_json
from layerfreeze.utils.logging import get_logger, log_rank0

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from layerfreeze.data.config import TokenizerConfig

logger = get_logger(__name__)

__all__ = [
    "SPECIAL_TOKENS",
    "train_tokenizer",
    "sentencepiece_to_hf",
    "auto_tokenizer",
    "load_tokenizer",
    "prepare_tokenizer",
    "save_tokenizer",
    "tokenizer_fingerprint",
]

# id -> piece of the special tokens every trained tokenizer has (Llama's layout, plus a pad id).
SPECIAL_TOKENS = {"unk": (0, "<unk>"), "bos": (1, "<s>"), "eos": (2, "</s>"), "pad": (3, "<pad>")}
MODEL_TYPES = ("unigram", "bpe")
_META_FILE = "layerfreeze_tokenizer.json"
# SentencePiece skips training sentences longer than this many bytes; documents are fed line by line.
_MAX_SENTENCE_BYTES = 1 << 16
_REQUIRED_CHARS = "".join(chr(c) for c in range(33, 127))


def _cut_line(line: str, max_bytes: int) -> Iterator[str]:
    """``line`` in pieces of at most ``max_bytes`` UTF-8 bytes, cut before a space when one is
    in the second half of a piece (else between two characters, never inside one)."""
    data = line.encode("utf-8")
    start = 0
    while len(data) - start > max_bytes:
        end = start + max_bytes
        while end > start and (data[end] & 0xC0) == 0x80:  # a continuation byte: back off
            end -= 1
        space = data.rfind(b" ", start + max_bytes // 2, end)
        cut = space if space > start else end
        yield data[start:cut].decode("utf-8")
        start = cut
    yield data[start:].decode("utf-8")


class _TrainingLines:
    """The non-empty lines of the documents, lines over ``max_bytes`` cut into pieces.

    SentencePiece skips a sentence longer than its ``max_sentence_length`` (and fails with
    ``[!sentences_.empty()]`` when every one is skipped): such a line is cut instead, and
    :attr:`cut` records ``(file, document number, bytes)`` of each for the note after training.
    """

    def __init__(self, files: Sequence[Path], text_key: str, txt_documents: str, max_bytes: int):
        self.files, self.text_key, self.txt_documents = files, text_key, txt_documents
        self.max_bytes = max_bytes
        self.cut: list[tuple[Path, int, int]] = []

    def __iter__(self) -> Iterator[str]:
        from layerfreeze.data.corpus import iter_documents

        for path in self.files:
            docs = iter_documents(path, text_key=self.text_key, txt_documents=self.txt_documents)
            for number, doc in enumerate(docs, start=1):
                for line in doc.splitlines():
                    if not line.strip():
                        continue
                    # a character is at most 4 bytes: only a line this long can be over
                    size = len(line.encode("utf-8")) if len(line) * 4 > self.max_bytes else 0
                    if size <= self.max_bytes:
                        yield line
                        continue
                    self.cut.append((path, number, size))
                    yield from (p for p in _cut_line(line, self.max_bytes) if p.strip())

    def note(self) -> str | None:
        """One line saying how many lines were cut and where (the first few), or None."""
        if not self.cut:
            return None
        where = ", ".join(f"{p} (document {n}, {b} bytes)" for p, n, b in self.cut[:5])
        more = f" and {len(self.cut) - 5} more" if len(self.cut) > 5 else ""
        return (
            f"{len(self.cut)} line{'s' if len(self.cut) > 1 else ''} longer than "
            f"{self.max_bytes} bytes (SentencePiece's max_sentence_length) cut into pieces of at "
            f"most that size for tokenizer training: {where}{more}"
        )


def train_tokenizer(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    vocab_size: int = 8000,
    model_type: str = "unigram",
    character_coverage: float = 0.9995,
    text_key: str = "text",
    txt_documents: str = "paragraph",
    input_sentence_size: int = 0,
    seed: int = 0,
    config_section: str | None = None,
    inputs_key: str = "input",
) -> Path:
    """Train a SentencePiece tokenizer and save it in a form ``AutoTokenizer`` loads.

    Byte fallback is on (any text encodes, nothing maps to ``<unk>``); special ids are
    ``<unk>``=0, ``<s>``=1 (BOS), ``</s>``=2 (EOS), ``<pad>``=3. Normalization is the identity
    (text is kept as written, full-width punctuation included), digits are split, and a dummy
    ``▁`` prefix marks the start of the text (Llama's settings). Every printable ASCII
    character is a piece regardless of ``character_coverage``. The HF tokenizer adds BOS when
    called with ``add_special_tokens=True`` (the default), never EOS.

    Args:
        inputs: ``.txt`` / ``.jsonl`` files or directories (searched recursively, sorted).
        out_dir: directory to create (replaced atomically when it exists).
        vocab_size: number of pieces, including the 4 special and 256 byte pieces.
        model_type: ``unigram`` or ``bpe``.
        character_coverage: fraction of characters covered by pieces (rarer ones go to bytes);
            0.9995 suits Chinese, 1.0 small alphabets.
        text_key: JSONL field holding the text.
        txt_documents: ``paragraph`` (documents separated by blank lines) or ``line``.
        input_sentence_size: sample at most this many lines for training (0: use all).
        seed: seed of that sampling (SentencePiece's random seed).
        config_section: when the options come from a run config, its section (``"tokenizer"``):
            a vocabulary size the text cannot support is then reported with the config keys
            (``tokenizer.vocab_size=918``) instead of the ``layerfreeze tokenizer train`` flags.
        inputs_key: the name of ``inputs`` in messages (a run config's ``data.paths``).

    Returns:
        ``out_dir`` as a ``Path``.

    Raises:
        ValueError: bad option, missing or empty input, or a vocabulary size the text cannot
            support (the message says which size would work).
    """
    import sentencepiece as spm

    from layerfreeze.data.corpus import resolve_files

    problems = []
    if model_type not in MODEL_TYPES:
        problems.append(f"model_type: must be one of {', '.join(MODEL_TYPES)}, got {model_type!r}.")
    if not isinstance(vocab_size, int) or vocab_size <= 260:
        problems.append(
            "vocab_size: must be an integer above 260 (4 special + 256 byte pieces), "
            f"got {vocab_size!r}."
        )
    if not 0.0 < character_coverage <= 1.0:
        problems.append(f"character_coverage: must be in (0, 1], got {character_coverage!r}.")
    if problems:
        raise ConfigError(problems)
    files = resolve_files(inputs, key=inputs_key)
    training_lines = _TrainingLines(files, text_key, txt_documents, _MAX_SENTENCE_BYTES)
    lines = iter(training_lines)
    first = next(lines, None)
    if first is None:
        raise ValueError(
            f"{inputs_key}: no text found in {', '.join(str(f) for f in files)}. "
            "Give files with at least some non-empty documents."
        )

    def _all_lines() -> Iterator[str]:
        yield first
        yield from lines

    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        model_file = tmp / "tokenizer.model"
        options: dict[str, Any] = dict(
            model_type=model_type,
            vocab_size=vocab_size,
            character_coverage=character_coverage,
            byte_fallback=True,
            split_digits=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=True,
            allow_whitespace_only_pieces=True,
            # Every printable ASCII character gets a piece, whatever the coverage: code and
            # markup stay readable, and text such as "</s>" or "<0x41>" is always spelled with
            # real pieces (never with the control/byte pieces, see sentencepiece_to_hf).
            required_chars=_REQUIRED_CHARS,
            unk_id=SPECIAL_TOKENS["unk"][0],
            bos_id=SPECIAL_TOKENS["bos"][0],
            eos_id=SPECIAL_TOKENS["eos"][0],
            pad_id=SPECIAL_TOKENS["pad"][0],
            unk_piece=SPECIAL_TOKENS["unk"][1],
            bos_piece=SPECIAL_TOKENS["bos"][1],
            eos_piece=SPECIAL_TOKENS["eos"][1],
            pad_piece=SPECIAL_TOKENS["pad"][1],
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            max_sentence_length=_MAX_SENTENCE_BYTES,
            minloglevel=2,
        )
        spm.set_random_generator_seed(seed)
        with model_file.open("wb") as f:
            try:
                spm.SentencePieceTrainer.train(
                    sentence_iterator=_all_lines(), model_writer=f, **options
                )
            except RuntimeError as e:
                raise _explain_training_error(e, vocab_size, config_section) from None
            finally:  # also when training fails: the cut lines explain what it saw
                note = training_lines.note()
                if note:
                    logger.warning("%s", note)
        hf = sentencepiece_to_hf(model_file)
        hf.save_pretrained(str(tmp))
        atomic_write_json(
            tmp / _META_FILE,
            {
                "trainer": "sentencepiece",
                "options": {k: v for k, v in options.items() if k != "minloglevel"},
                "text_key": text_key,
                "txt_documents": txt_documents,
                "inputs": [{"path": str(p), "bytes": p.stat().st_size} for p in files],
            },
        )
    log_rank0(logger, "trained a %s tokenizer with %d pieces into %s", model_type, vocab_size, out_dir)
    return out_dir


def _explain_training_error(
    err: RuntimeError, vocab_size: int, config_section: str | None = None
) -> ValueError:
    if config_section:  # run-config keys: tokenizer.vocab_size=N
        key, size_opt = f"{config_section}.vocab_size", f"{config_section}.vocab_size="
        coverage_opt = f"{config_section}.character_coverage"
    else:  # the command-line flags of `layerfreeze tokenizer train`
        key, size_opt, coverage_opt = "vocab_size", "--vocab-size ", "--character-coverage"
    msg = str(err)
    high = re.search(
        r"Vocabulary size (?:is )?too high \((\d+)\)\. Please set it to a value <= (\d+)", msg
    )
    if high:
        return ValueError(
            f"{key}: {vocab_size} is too large for this text (sentencepiece found room for at most "
            f"{high.group(2)} pieces). Use {size_opt}{high.group(2)} or less, or train on more text."
        )
    low = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", msg)
    if low:
        need = int(low.group(2))
        return ValueError(
            f"{key}: {vocab_size} is too small: the text needs {low.group(2)} pieces for its "
            f"characters and the special/byte pieces. Use {size_opt}{need} or more, or lower "
            f"{coverage_opt} so rare characters fall back to bytes."
        )
    return ValueError(f"sentencepiece training failed: {msg}")


def _load_proto(model_file: Path):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(model_file.read_bytes())
    except Exception as e:  # protobuf raises its own DecodeError type
        raise ValueError(f"{model_file}: not a SentencePiece model ({e}).") from None
    if not proto.pieces:
        raise ValueError(f"{model_file}: not a SentencePiece model (no pieces).")
    return proto


def sentencepiece_to_hf(model_file: str | Path) -> PreTrainedTokenizerBase:
    """Convert a SentencePiece ``.model`` file to a fast HF tokenizer that encodes identically.

    The result adds BOS (when the model defines one) for ``add_special_tokens=True``.

    Raises:
        ValueError: the file is not a SentencePiece model, or uses a model type other than
            unigram / bpe.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE, Unigram
    from transformers.tokenization_utils_base import generate_merges
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    model_file = Path(model_file)
    proto = _load_proto(model_file)
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    pieces = [(p.piece, p.score) for p in proto.pieces]
    # piece types: 1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte
    special_types = {2, 3, 5, 6}
    if spec.model_type == 1:
        # SentencePiece never matches control, unknown, unused or byte pieces against text, but
        # a tokenizers Unigram matches every vocab entry: "</s>" written in a document would
        # become EOS. Scores far below any real piece make them unreachable the same way.
        floor = min((p.score for p in proto.pieces if p.type == 1), default=0.0) - 1e4
        scored = [(p.piece, p.score if p.type in (1, 4) else floor) for p in proto.pieces]
        model = Unigram(scored, unk_id=spec.unk_id, byte_fallback=spec.byte_fallback)
    elif spec.model_type == 2:
        vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
        skip = {p.piece for p in proto.pieces if p.type in special_types}
        merges = generate_merges(vocab, dict(pieces), skip_tokens=skip)
        model = BPE(
            vocab, merges, unk_token=spec.unk_piece, fuse_unk=True,
            byte_fallback=spec.byte_fallback, dropout=None,
        )
    else:
        raise ValueError(
            f"{model_file}: SentencePiece model type {spec.model_type} is not supported; "
            "train it with model_type unigram or bpe."
        )
    tok = Tokenizer(model)
    steps = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    steps.append(normalizers.Replace(" ", "▁"))
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = None
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if norm.add_dummy_prefix:
        dec.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(dec)
    control = [AddedToken(p.piece, normalized=False, special=True) for p in proto.pieces if p.type == 3]
    user = [AddedToken(p.piece, normalized=False, special=False) for p in proto.pieces if p.type == 4]
    if control:
        tok.add_special_tokens(control)
    if user:
        tok.add_tokens(user)

    def piece(id_: int) -> str | None:
        return proto.pieces[id_].piece if 0 <= id_ < len(proto.pieces) else None

    bos = piece(spec.bos_id)
    return TokenizersBackend(
        tokenizer_object=tok,
        unk_token=piece(spec.unk_id),
        bos_token=bos,
        eos_token=piece(spec.eos_id),
        pad_token=piece(spec.pad_id),
        add_bos_token=bos is not None,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
    )


def auto_tokenizer(path: str | Path, **kwargs: Any) -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained(path)``, as the class recorded in tokenizer_config.json.

    transformers replaces the recorded ``tokenizer_class`` for some model types (5.25 loads any
    tokenizer next to a ``qwen2`` config as ``Qwen2Tokenizer``, which rebuilds a byte-level BPE
    from the vocabulary and encodes other ids). A directory saved before :func:`save_tokenizer`
    pinned the class is loaded here with the recorded class itself (a warning says so).

    Raises:
        OSError, ValueError: transformers cannot load a tokenizer from ``path``.
    """
    import transformers
    from transformers import AutoTokenizer

    path = Path(path)
    if "config" not in kwargs and (path / "config.json").is_file():
        from layerfreeze.export import EXPORT_MODEL_TYPE, export_base_config

        try:
            marked = json.loads((path / "config.json").read_text(encoding="utf-8")).get(
                "model_type") == EXPORT_MODEL_TYPE
        except (ValueError, AttributeError):
            marked = False
        if marked:  # a layerfreeze export: its base config, not transformers' custom-code prompt
            kwargs["config"] = export_base_config(path)
    tokenizer = AutoTokenizer.from_pretrained(str(path), **kwargs)
    try:
        recorded = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return tokenizer
    name = recorded.get("tokenizer_class") if isinstance(recorded, dict) else None
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    got = type(tokenizer).__name__
    if cls is None or got in (name, name.removesuffix("Fast"), name + "Fast"):
        return tokenizer
    log_rank0(
        logger, "%s: AutoTokenizer gives %s but tokenizer_config.json records %s; loading %s "
        "(the tokenizer the model was saved with)", path, got, name, name, level=30,
    )
    return cls.from_pretrained(str(path), **kwargs)


def load_tokenizer(cfg: TokenizerConfig | str | Path) -> PreTrainedTokenizerBase:
    """Load the tokenizer named by ``cfg.path``: an HF tokenizer directory or a ``.model`` file.

    Args:
        cfg: the ``tokenizer`` config section, or a path directly.

    Raises:
        ConfigError: no path given, the path does not exist, or it holds no tokenizer.
    """
    path_value = cfg if isinstance(cfg, (str, Path)) else cfg.path
    if not path_value:
        raise ConfigError(
            "tokenizer.path: no tokenizer given, got None. Set it to an HF tokenizer directory or a "
            "SentencePiece .model file, or train one with `layerfreeze tokenizer train`."
        )
    path = Path(path_value).expanduser()
    if not path.exists():
        raise ConfigError(
            f"tokenizer.path: no such file or directory, got '{path_value}'. Give an HF tokenizer "
            "directory or a SentencePiece .model file (`layerfreeze tokenizer train` makes one)."
        )
    if path.is_file():
        try:
            return sentencepiece_to_hf(path)
        except ValueError as e:
            raise ConfigError(
                f"tokenizer.path: {e} Give an HF tokenizer directory or a .model file."
            ) from None
    try:
        return auto_tokenizer(path)
    except (OSError, ValueError) as e:
        if (path / "tokenizer.model").is_file() and not (path / "tokenizer.json").is_file():
            return sentencepiece_to_hf(path / "tokenizer.model")
        raise ConfigError(
            f"tokenizer.path: '{path_value}' holds no tokenizer AutoTokenizer can load "
            f"({' '.join(str(e).split())}). "  # transformers' message spans lines: one here
            "Give an HF tokenizer directory (tokenizer.json + tokenizer_config.json) or a "
            "SentencePiece .model file."
        ) from None


#: Written next to a saved tokenizer when transformers would replace its recorded class (below).
TOKENIZER_MODULE = "layerfreeze_tokenizer.py"
_TOKENIZER_MODULE_TEXT = '''"""Written by layerfreeze next to a saved tokenizer: ``AutoTokenizer`` loads it as itself.

transformers replaces the ``tokenizer_class`` recorded in tokenizer_config.json for some model
types (e.g. ``qwen2``: every tokenizer next to a Qwen2 config would load as ``Qwen2Tokenizer``,
which encodes other ids). The ``auto_map`` entry pointing here makes ``AutoTokenizer`` read the
recorded class again; with ``trust_remote_code=True`` it loads this subclass of it, which reads
tokenizer.json as saved.
"""

from transformers import {base}


class LayerfreezeTokenizer({base}):
    """The saved ``{base}``, loaded from tokenizer.json unchanged."""
'''
# Mixed Chinese / English, digits and punctuation: a tokenizer that loads as another class
# (e.g. Qwen2Tokenizer rebuilt from the vocabulary) encodes it differently.
_PROBE_TEXT = "混合文本：Hello 世界, layerfreeze 训练 2026 年 — the quick brown fox 跳过 13 只 lazy dogs!"


def _loaded_as(directory: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))


def _same_tokenizer(saved: Any, loaded: Any) -> bool:
    return (
        type(loaded).__name__ == type(saved).__name__
        and len(loaded) == len(saved)
        and loaded(_PROBE_TEXT)["input_ids"] == saved(_PROBE_TEXT)["input_ids"]
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, directory: str | Path) -> None:
    """Save ``tokenizer`` into a model directory so that ``AutoTokenizer`` loads it as itself.

    Call it after the model's config.json is written (``AutoTokenizer`` reads the model type).
    The class is recorded as ``tokenizer_class`` in tokenizer_config.json. Some model types make
    transformers ignore that record (5.25 loads any tokenizer next to a ``qwen2`` config as
    ``Qwen2Tokenizer``): then an ``auto_map`` entry and a small tokenizer module
    (:data:`TOKENIZER_MODULE`, a subclass of the recorded class) are written too, which makes
    ``AutoTokenizer`` honour the record (and, with ``trust_remote_code=True``, load the subclass).
    The result is checked by loading it back with ``AutoTokenizer`` (class, size and the ids of a
    mixed Chinese/English text).

    Args:
        tokenizer: the tokenizer the model was trained with.
        directory: the model directory (its config.json already written).

    Raises:
        ValueError: ``AutoTokenizer`` still loads another tokenizer from ``directory``.
    """
    directory = Path(directory)
    tokenizer.save_pretrained(str(directory))
    cls = type(tokenizer).__name__
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("tokenizer_class") != cls:
        config["tokenizer_class"] = cls
        atomic_write_json(config_path, config)
    loaded = _loaded_as(directory)
    if _same_tokenizer(tokenizer, loaded):
        return
    import transformers

    if getattr(transformers, cls, None) is not type(tokenizer):
        raise ValueError(
            f"{directory}: AutoTokenizer loads the saved {cls} as {type(loaded).__name__}, "
            f"and {cls} is not a transformers class that an auto_map could name. Save a "
            "transformers tokenizer (e.g. load_tokenizer on its files) next to the model."
        )
    log_rank0(
        logger, "%s: AutoTokenizer would load the saved %s as %s here; pinning the class with an "
        "auto_map (%s)", directory, cls, type(loaded).__name__, TOKENIZER_MODULE,
    )
    (directory / TOKENIZER_MODULE).write_text(
        _TOKENIZER_MODULE_TEXT.format(base=cls), encoding="utf-8"
    )
    config["auto_map"] = {
        "AutoTokenizer": [None, f"{TOKENIZER_MODULE[:-3]}.LayerfreezeTokenizer"]
    }
    atomic_write_json(config_path, config)
    loaded = _loaded_as(directory)
    if not _same_tokenizer(tokenizer, loaded):
        raise ValueError(
            f"{directory}: AutoTokenizer loads the saved {cls} as {type(loaded).__name__} with "
            "other ids, even with tokenizer_class and auto_map recorded. Load the tokenizer "
            f"with {cls}.from_pretrained, or report this transformers version."
        )


def prepare_tokenizer(
    cfg: TokenizerConfig,
    train_inputs: Sequence[str | Path],
    out_dir: str | Path | None,
    *,
    text_key: str = "text",
    txt_documents: str = "paragraph",
) -> PreTrainedTokenizerBase:
    """Load ``cfg.path``; without one, train a tokenizer on ``train_inputs`` into ``out_dir``.

    Training happens once: an existing ``out_dir`` with a trained tokenizer is reused (so a
    resumed run gets the same ids). With ``cfg.extend_from`` the base tokenizer is extended
    with pieces trained on the inputs instead
    (:func:`~layerfreeze.data.extend_run.prepare_extended`). Under ``torch.distributed`` only
    local rank 0 trains; the
    other ranks wait and then load the result. A failure on the training rank is raised on
    every rank (nobody hangs in a barrier).

    Args:
        cfg: the ``tokenizer`` section (``vocab_size``, ``model_type``, ``character_coverage``
            and ``train_inputs`` drive training; ``train_inputs`` overrides the argument).
        train_inputs: files/directories to train on when ``cfg.train_inputs`` is empty
            (normally the data section's files).
        out_dir: where to save a trained tokenizer (unused when ``cfg.path`` is set).
        text_key: JSONL field of the training inputs (pass ``data.text_key``).
        txt_documents: ``.txt`` document split of the training inputs (``data.txt_documents``).

    Raises:
        ConfigError: ``cfg.path`` is empty and so is ``out_dir``, or loading fails.
        ValueError: training fails (see :func:`train_tokenizer`).
    """
    if cfg.path:
        return load_tokenizer(cfg)
    if out_dir is None:
        raise ConfigError(
            "tokenizer.path: no tokenizer given and nowhere to train one, got None. Set "
            "tokenizer.path, or pass an output directory for the trained tokenizer."
        )
    out_dir = Path(out_dir)
    inputs = list(cfg.train_inputs) or list(train_inputs)
    if cfg.extend_from:
        from layerfreeze.data.extend_run import prepare_extended

        run_on_local_rank0(
            lambda: prepare_extended(cfg, inputs, out_dir, text_key, txt_documents)
        )
        return load_tokenizer(out_dir)

    def build() -> None:
        if (out_dir / "tokenizer.json").is_file():
            _check_reused(out_dir, cfg)
            log_rank0(logger, "reusing the tokenizer trained earlier in %s", out_dir)
            return
        train_tokenizer(
            inputs, out_dir, vocab_size=cfg.vocab_size, model_type=cfg.model_type,
            character_coverage=cfg.character_coverage, text_key=text_key,
            txt_documents=txt_documents, input_sentence_size=cfg.input_sentence_size,
            config_section="tokenizer",
            inputs_key="tokenizer.train_inputs" if cfg.train_inputs else "data.paths",
        )

    run_on_local_rank0(build)
    return load_tokenizer(out_dir)


def _check_reused(out_dir: Path, cfg: TokenizerConfig) -> None:
    """A tokenizer trained earlier must match the config, or a resumed run would change ids."""
    try:
        options = json.loads((out_dir / _META_FILE).read_text(encoding="utf-8"))["options"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # not trained by layerfreeze: nothing to compare, the user put it there
    problems = [
        f"tokenizer.{k}: {out_dir} holds a tokenizer trained with {k}={options.get(k)!r}, "
        f"got {getattr(cfg, k)!r}. Use the same value, or delete {out_dir} to train a new one "
        "(a run resumed from a checkpoint must keep its tokenizer)."
        for k in ("vocab_size", "model_type", "character_coverage")
        if options.get(k) != getattr(cfg, k)
    ]
    if problems:
        raise ConfigError(problems)


def run_on_local_rank0(fn: Callable[[], None]) -> None:
    """Run ``fn`` on local rank 0 (every process when not distributed); the other ranks wait.

    All ranks meet in one collective afterwards, so a failure on a building rank is raised on
    every rank instead of leaving the others in a barrier.
    """
    from layerfreeze.utils.dist import all_gather_objects, get_local_rank, get_rank, is_dist

    error: BaseException | None = None
    if get_local_rank() == 0 or not is_dist():
        try:
            fn()
        except Exception as e:  # re-raised below on this rank, reported to the others
            error = e
    if is_dist():
        statuses = all_gather_objects(None if error is None else f"{type(error).__name__}: {error}")
        if error is None:
            failed = [(r, s) for r, s in enumerate(statuses) if s is not None]
            if failed:
                rank, msg = failed[0]
                raise RuntimeError(
                    f"rank {rank} failed while preparing data for rank {get_rank()}: {msg}"
                )
    if error is not None:
        raise error


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of everything that decides the ids a tokenizer produces (its full serialization)."""
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode("utf-8"))
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode("utf-8"))
    specials = {k: getattr(tokenizer, f"{k}_token_id", None) for k in ("bos", "eos", "unk", "pad")}
    h.update(json.dumps(specials, sort_keys=True).encode())
    return h.hexdigest()
