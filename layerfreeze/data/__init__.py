"""Training data: SentencePiece tokenizers, the bundled corpus, token cache, packing, sharded loader.

Typical use (see docs/data.md)::

    tok = load_tokenizer(cfg.tokenizer)            # or prepare_tokenizer(cfg.tokenizer, files, out)
    cache = build_token_cache(cfg.data.paths, tok, cfg.data.resolved_cache_dir(),
                              text_key=cfg.data.text_key, txt_documents=cfg.data.txt_documents,
                              add_bos=cfg.data.add_bos)
    loader = DistributedBatchIterator(PackedDataset(cache, cfg.data.seq_len), micro_batch_size=4,
                                      seed=seed)
    batch = loader.next_batch()                    # {"input_ids", "labels"}: LongTensor [4, seq_len]
"""

from layerfreeze.data.cache import TokenCache, build_token_cache
from layerfreeze.data.config import DataConfig, TokenizerConfig
from layerfreeze.data.corpus import BUNDLED, default_corpus_files, iter_documents, resolve_files
from layerfreeze.data.dataset import DistributedBatchIterator, PackedDataset
from layerfreeze.data.tokenizer import (
    load_tokenizer,
    prepare_tokenizer,
    sentencepiece_to_hf,
    tokenizer_fingerprint,
    train_tokenizer,
)
from layerfreeze.data.vocab_extend import ExtendReport, extend_tokenizer

__all__ = [
    "BUNDLED",
    "DataConfig",
    "DistributedBatchIterator",
    "ExtendReport",
    "PackedDataset",
    "TokenCache",
    "TokenizerConfig",
    "build_token_cache",
    "default_corpus_files",
    "extend_tokenizer",
    "iter_documents",
    "load_tokenizer",
    "prepare_tokenizer",
    "resolve_files",
    "sentencepiece_to_hf",
    "tokenizer_fingerprint",
    "train_tokenizer",
]
