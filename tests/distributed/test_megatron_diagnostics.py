"""Megatron sensitivity hooks (layerfreeze/engines/megatron/diagnostics.py) against the Hugging Face
hooks, on real megatron-core over 2 gloo ranks (CPU shim from tests/helpers/megatron.py).

The reference is :class:`layerfreeze.diagnostics.hooks.SensitivityHooks` on the Hugging Face
model the Megatron one was converted from (``convert.load_hf_weights``): same probe batch, same
weights at every call (after training, the Megatron weights are exported with
``MegatronRunner.export_merged`` and loaded into the Hugging Face model), so every number must
agree to float32 round-off, at TP=2, at PP=2 and at DP=2 (each replica its own probe rows; the
reference gets the union of the rows).
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers.dist import run_distributed
from tests.helpers.tiny_models import build_tiny_model, tiny_batch

VOCAB = 100
LAYERS = 4
ATOL = 1e-5
PLAN = "0:freeze,1:full,2:freeze,3:full"  # embeddings, final norm and head frozen too
MEASURES = ["update_ratio", "drift", "angular"]
CPU = {"use_cpu_initialization": True}


def _hf():
    return build_tiny_model(
        "llama",
        num_layers=LAYERS,
        num_heads=4,
        num_kv_heads=2,
        vocab_size=VOCAB,
        seed=0,
        tie_word_embeddings=False,
    )


def _probe(dp_rank: int) -> torch.Tensor:
    return tiny_batch(VOCAB, batch=2, seq=8, seed=1 + dp_rank)


def _train_ids(step: int) -> torch.Tensor:
    return tiny_batch(VOCAB, batch=2, seq=8, seed=50 + step)


def _body(rank, world_size, tp, pp, hf_dir, export_dir):
    from megatron.core import parallel_state as ps
    from transformers import AutoConfig

    from layerfreeze.engines.megatron import convert as C
    from layerfreeze.engines.megatron.diagnostics import MegatronSensitivityHooks
    from layerfreeze.engines.megatron.runner import MegatronRunner
    from tests.helpers.megatron import (
        destroy_model_parallel,
        init_model_parallel,
        megatron_cpu_shim,
    )

    hf_config = AutoConfig.from_pretrained(hf_dir)
    with megatron_cpu_shim():
        init_model_parallel(tp=tp, pp=pp)
        try:
            pre, post = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
            model = C.build_gpt_from_hf_config(hf_config, pre, post, config_overrides=CPU)
            C.load_hf_weights(model, hf_dir)
            runner = MegatronRunner(model, plan=PLAN, lr=5e-2, hf_config=hf_config)
            hooks = MegatronSensitivityHooks(runner, _probe(ps.get_data_parallel_rank()), MEASURES)
            first = hooks.compute(runner.model, 0)
            for s in range(2):  # both replicas read the same rows: the weights stay comparable
                ids = _train_ids(s)
                runner.train_step([{"input_ids": ids, "labels": ids.clone()}])
            second = hooks.compute(runner.model, 2)
            # hooks are gone: no forward hook left on any layer
            left = sum(
                len(m._forward_hooks) + len(m._forward_pre_hooks) for m in runner.model.modules()
            )
            runner.export_merged(export_dir)
            runner.close()
        finally:
            destroy_model_parallel()
    return {"first": first, "second": second, "hooks_left": left}


def _reference(hf, trained_dir, probe):
    from transformers import AutoModelForCausalLM

    from layerfreeze.diagnostics.hooks import SensitivityHooks
    from layerfreeze.models import discover_layout

    trainable = {1, 3}
    for name, p in hf.named_parameters():
        p.requires_grad_(any(name.startswith(f"model.layers.{i}.") for i in trainable))
    hooks = SensitivityHooks(discover_layout(hf), probe, MEASURES)
    first = hooks.compute(hf, 0)
    trained = AutoModelForCausalLM.from_pretrained(trained_dir, attn_implementation="eager")
    with torch.no_grad():
        hf.load_state_dict(trained.float().state_dict())
    second = hooks.compute(hf, 2)
    return first, second


def _close(got: dict, want: dict) -> None:
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=ATOL), (k, got[k], v)


@pytest.mark.slow
@pytest.mark.parametrize(("tp", "pp"), [(2, 1), (1, 2), (1, 1)], ids=["tp2", "pp2", "dp2"])
def test_megatron_hooks_equal_hf_hooks(tmp_path, tp, pp):
    hf = _hf()
    hf.save_pretrained(str(tmp_path / "hf"), safe_serialization=True)
    out = run_distributed(
        _body, world_size=2, args=(tp, pp, str(tmp_path / "hf"), str(tmp_path / "trained"))
    )
    dp = 2 // (tp * pp)
    probe = torch.cat([_probe(r) for r in range(dp)])
    want_first, want_second = _reference(hf, tmp_path / "trained", probe)
    assert set(want_first) == {"diag/probe_loss"} | {
        f"diag/{m}/layers.{i}" for m in ("drift", "angular") for i in range(LAYERS)
    }
    for r in out:
        assert r["hooks_left"] == 0
        _close(r["first"], want_first)
        _close(r["second"], want_second)
    second = out[0]["second"]
    for i in (1, 3):  # trained layers moved, and their outputs with them
        assert second[f"diag/update_ratio/layers.{i}"] > 1e-3
        assert second[f"diag/drift/layers.{i}"] > 1e-4
    assert second["diag/update_ratio/layers.0"] == 0.0 == second["diag/update_ratio/layers.2"]
    assert second["diag/drift/layers.0"] == 0.0  # frozen, and so is everything before it
    assert all(out[0]["first"][f"diag/drift/layers.{i}"] == 0.0 for i in range(LAYERS))
    assert all(0 < out[0]["first"][f"diag/angular/layers.{i}"] < 1 for i in range(LAYERS))


@pytest.mark.parametrize(
    ("measures", "ids", "message"),
    [
        (["grad_norm", "drift"], tiny_batch(VOCAB), "logging.per_layer_every"),
        (["drift", "cka"], tiny_batch(VOCAB), "Choose from update_ratio, drift, angular"),
        ([], tiny_batch(VOCAB), "unknown or empty"),
        (["drift"], torch.zeros(2, 8), "integer tensor"),
        (["drift"], torch.zeros(2, 1, dtype=torch.long), "seq >= 2"),
    ],
)
def test_bad_measures_or_probe_name_what_is_valid(measures, ids, message):
    from layerfreeze.engines.megatron.diagnostics import MegatronSensitivityHooks

    with pytest.raises(ValueError, match=message):
        MegatronSensitivityHooks(None, ids, measures)
