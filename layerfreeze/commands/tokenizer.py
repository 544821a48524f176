"""`layerfreeze tokenizer train|extend`: train a SentencePiece tokenizer, or extend one with pieces
trained on a corpus (continued pre-training on a new language).

Example::

    layerfreeze tokenizer train --input @bundled --vocab-size 2000 --out runs/tok
    layerfreeze tokenizer train --input corpus/ extra.jsonl --vocab-size 32000 --out tok
    layerfreeze tokenizer train --input corpus/ --vocab-size 32000 --model-type bpe --out tok
    layerfreeze tokenizer extend --base llama2-tok --corpus zh/ --vocab-size 20000 --out tok-zh
    layerfreeze tokenizer extend --base qwen-tok --corpus zh/ --vocab-size 20000 --max-new 8000 \
        --held-out zh-val.txt --out tok-zh
"""

from __future__ import annotations

import argparse
import json
import sys

from layerfreeze.utils.io import OVERWRITE_HELP, check_output_path
from layerfreeze.utils.logging import get_logger

logger = get_logger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    sub.required = True
    tp = sub.add_parser("train", help="train a SentencePiece tokenizer and save it for AutoTokenizer")
    tp.add_argument("--input", nargs="+", required=True, metavar="PATH",
                    help=".txt/.jsonl files or directories (recursive); "
                    "'@bundled' = the bundled corpus")
    tp.add_argument("--vocab-size", type=int, required=True, help="number of pieces (> 260)")
    tp.add_argument("--out", required=True, help="output directory (must be new or empty)")
    tp.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    tp.add_argument("--model-type", choices=["unigram", "bpe"], default="unigram")
    tp.add_argument("--character-coverage", type=float, default=0.9995,
                    help="fraction of characters covered by pieces; rarer ones become bytes")
    tp.add_argument("--text-key", default="text", help="JSONL field with the text")
    tp.add_argument("--txt-documents", choices=["paragraph", "line"], default="paragraph",
                    help="documents in .txt files: blank-line separated paragraphs or single lines")
    tp.add_argument("--input-sentence-size", type=int, default=0,
                    help="train on a random sample of this many lines (0: all)")
    tp.add_argument("--seed", type=int, default=0, help="seed of that sample")

    ep = sub.add_parser("extend", help="add pieces trained on a corpus to a tokenizer (ids kept)")
    ep.add_argument(
        "--base",
        required=True,
        metavar="DIR",
        help="tokenizer directory: SentencePiece (tokenizer.model, Llama-2/Mistral) "
        "or byte-level BPE tokenizer.json (Llama-3/Qwen)",
    )
    ep.add_argument(
        "--corpus",
        nargs="+",
        required=True,
        metavar="PATH",
        help=".txt/.jsonl files or directories (recursive); '@bundled' = the bundled corpus",
    )
    ep.add_argument(
        "--vocab-size",
        type=int,
        default=8000,
        help="vocabulary size trained on the corpus (> 260); pieces the base already "
        "has are not added again",
    )
    ep.add_argument(
        "--max-new",
        type=int,
        default=None,
        help="add at most this many pieces (default: every new trained piece)",
    )
    ep.add_argument(
        "--held-out",
        nargs="+",
        default=None,
        metavar="PATH",
        help="text measuring tokens per Chinese character before/after (default: "
        "every 10th corpus document, not trained on)",
    )
    ep.add_argument("--out", required=True, help="output directory (must be new or empty)")
    ep.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    ep.add_argument("--text-key", default="text", help="JSONL field with the text")
    ep.add_argument(
        "--txt-documents",
        choices=["paragraph", "line"],
        default="paragraph",
        help="documents in .txt files: blank-line separated paragraphs or single lines",
    )
    ep.add_argument("--seed", type=int, default=0, help="SentencePiece's random seed")
    ep.add_argument(
        "--json",
        action="store_true",
        help="print the report as JSON (it is also saved as "
        "layerfreeze_vocab_extend.json in --out)",
    )


def run(args: argparse.Namespace) -> int:
    if args.tokenizer_command == "extend":
        return _extend(args)
    from layerfreeze.data.tokenizer import load_tokenizer, train_tokenizer

    if args.input_sentence_size < 0:
        logger.error("--input-sentence-size: must be >= 0 (0: all lines), got %d.",
                     args.input_sentence_size)
        return 2
    try:
        check_output_path(args.out, overwrite=args.overwrite)
    except ValueError as e:
        logger.error("%s", e)
        return 2
    try:
        out = train_tokenizer(
            args.input,
            args.out,
            vocab_size=args.vocab_size,
            model_type=args.model_type,
            character_coverage=args.character_coverage,
            text_key=args.text_key,
            txt_documents=args.txt_documents,
            input_sentence_size=args.input_sentence_size,
            seed=args.seed,
        )
    except (ValueError, OSError) as e:  # ConfigError is a ValueError
        logger.error("%s", e)
        return 2
    tok = load_tokenizer(out)
    sys.stdout.write(
        f"saved to {out}: {len(tok)} ids, bos={tok.bos_token_id} eos={tok.eos_token_id} "
        f"pad={tok.pad_token_id} unk={tok.unk_token_id}; load with "
        f"AutoTokenizer.from_pretrained({str(out)!r})\n"
    )
    return 0


def _extend(args: argparse.Namespace) -> int:
    from layerfreeze.data.vocab_extend import extend_tokenizer

    try:
        check_output_path(args.out, overwrite=args.overwrite)
        report = extend_tokenizer(
            args.base,
            args.corpus,
            args.out,
            vocab_size=args.vocab_size,
            max_new=args.max_new,
            held_out=args.held_out,
            text_key=args.text_key,
            txt_documents=args.txt_documents,
            seed=args.seed,
        )
    except (ValueError, OSError) as e:  # ConfigError is a ValueError
        logger.error("%s", " ".join(str(e).split()))
        return 2
    if args.json:
        sys.stdout.write(json.dumps(report.to_dict(), ensure_ascii=False) + "\n")
    else:
        sys.stdout.write(report.summary() + "\n")
    return 0
