"""Hostile ``new_rows`` plans on the megatron engine (layerfreeze/engines/megatron/new_rows.py):
each is refused with one line naming the plan key, before anything is installed.

Real megatron-core GPTModel, TP=1 in this process (vocabulary 91 padded to 92 with
``make_vocab_size_divisible_by=4``).
"""

from __future__ import annotations

import pytest
import torch

from layerfreeze.errors import ConfigError

VOCAB, PADDED = 91, 92


@pytest.fixture
def gpt():
    from layerfreeze.engines.megatron import convert as C
    from tests.helpers.megatron import (
        destroy_model_parallel,
        init_model_parallel,
        megatron_cpu_shim,
    )
    from tests.helpers.tiny_models import build_tiny_model

    hf = build_tiny_model("llama", num_layers=2, num_heads=4, num_kv_heads=2, vocab_size=VOCAB)
    with megatron_cpu_shim():
        init_model_parallel(tp=1, pp=1)
        try:
            model = C.build_gpt_from_hf_config(
                hf.config, config_overrides={"use_cpu_initialization": True},
                make_vocab_size_divisible_by=4,
            )
            C.load_hf_weights(model, hf.state_dict(), hf.config)
            assert model.vocab_size == PADDED
            yield model
        finally:
            destroy_model_parallel()


def _apply(model, plan: str):
    from layerfreeze.engines.megatron.provider import apply_megatron_plan

    return apply_megatron_plan(model, plan)


def _refused(model, plan: str) -> str:
    with pytest.raises(ConfigError) as e:
        _apply(model, plan)
    msg = str(e.value)
    assert not any("new_rows_weight" in n for n, _ in model.named_parameters())  # nothing half-done
    return msg


def test_unknown_real_vocabulary_is_refused(gpt):
    msg = _refused(gpt, "embeddings:new_rows(from_id=80)")
    assert "plan.embeddings" in msg and "record_vocab_size" in msg and "92 rows" in msg


def test_from_id_in_the_padding_is_refused(gpt):
    from layerfreeze.engines.megatron.new_rows import record_vocab_size

    record_vocab_size(gpt, VOCAB)
    msg = _refused(gpt, "embeddings:new_rows(from_id=91),lm_head:new_rows(from_id=91)")
    assert "plan.embeddings: new_rows from_id=91 is out of range for a 91-token vocabulary" in msg
    assert "plan.lm_head" in msg


def test_sequence_parallel_is_refused(gpt):
    from layerfreeze.engines.megatron.new_rows import record_vocab_size

    record_vocab_size(gpt, VOCAB)
    gpt.config.sequence_parallel = True  # what a TP>1 sequence-parallel run configures
    msg = _refused(gpt, "lm_head:new_rows(from_id=80)")
    assert "plan.lm_head: new_rows is not supported with megatron.sequence_parallel: true" in msg


def test_tied_embeddings_on_a_pipeline_are_refused(gpt):
    from layerfreeze.engines.megatron.layout import megatron_layout
    from layerfreeze.engines.megatron.new_rows import record_vocab_size
    from layerfreeze.models import ModelLayout
    from layerfreeze.plan import LayerPlan
    from layerfreeze.policies.new_rows import check_plans

    record_vocab_size(gpt, VOCAB)
    gpt.config.pipeline_model_parallel_size = 2  # a tied model split over two stages (the
    # layout of a real tied GPTModel on a pipeline marks it tied, as below)

    layout = megatron_layout(gpt)
    tied = ModelLayout(**{**layout.__dict__, "tied_embeddings": True})
    resolved = LayerPlan.parse("embeddings:new_rows(from_id=80)").resolve(2)
    problems = check_plans(gpt, tied, [("plan", resolved)])
    assert problems and problems[0].startswith(
        "plan.embeddings: new_rows on tied embeddings is not supported with pipeline parallelism"
    )


def test_record_vocab_size_rejects_a_size_past_the_padding(gpt):
    from layerfreeze.engines.megatron.new_rows import record_vocab_size

    with pytest.raises(ValueError, match=r"record_vocab_size: vocab_size must be an integer in "
                                         r"1\.\.92 .*got 93"):
        record_vocab_size(gpt, PADDED + 1)


def test_padding_rows_are_never_trained(gpt):
    """from_id below the vocabulary: the parameter covers rows from_id..vocab-1 only."""
    from layerfreeze.engines.megatron.new_rows import record_vocab_size

    record_vocab_size(gpt, VOCAB)
    applied = _apply(gpt, "embeddings:new_rows(from_id=80),lm_head:new_rows(from_id=80)")
    emb = gpt.embedding.word_embeddings
    assert emb.new_rows_weight.shape == (VOCAB - 80, emb.weight.shape[1])
    assert torch.equal(emb.new_rows_weight, emb.weight[80:VOCAB])
    assert sorted(applied.trainable_names()) == [
        "embedding.word_embeddings.new_rows_weight", "output_layer.new_rows_weight"]
