"""Gated LoRA and gated prefix under megatron-core sequence parallelism (TP=2, 2 gloo ranks, CPU).

The reference is the same model, weights and plan with sequence parallelism off (TP=2): the
per-token losses at initialisation and after 3 optimizer steps through the real
``MegatronRunner`` (megatron-core's DDP, ``finalize_model_grads`` and optimizer), the reduced
gradient of every trainable parameter at every step, and the frozen weights (bit-identical to
their initial values) must agree. A replicated adapter parameter whose gradient comes from this
rank's sequence shard only and that is not summed over TP (``sequence_parallel`` attribute)
gives a different gradient here.

The model: megatron-core 0.16.1 refuses sequence parallelism in the local spec's torch norm
(``WrappedTorchNorm`` asserts ``not config.sequence_parallel``, on every machine; with
``normalization="RMSNorm"`` the local spec uses it even when Apex is installed). The spec here
swaps only that norm for :class:`SequenceParallelRMSNorm` (``torch.nn.RMSNorm`` whose weight
carries ``sequence_parallel``, as megatron-core's ``FusedLayerNorm`` and ``TENorm`` mark
theirs); the linears, the sequence scatter/gather mappings, the embedding scatter, the output
gather, DDP and ``finalize_model_grads`` are megatron-core's own.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers.dist import run_distributed

pytestmark = pytest.mark.slow

LAYERS = 4
SEQ = 8
GAS = 2
STEPS = 3
ATOL = 2e-6

PLANS = {
    # gated LoRA on every linear: column (linear_qkv, linear_fc1) and row (linear_proj, linear_fc2)
    "gated_lora": {
        "rules": [{"layers": "all", "policy": "lora", "r": 4, "target": "all", "gated": True}],
    },
    # gated LoRA on the FFN of layers 0-2, gated prefix (paper form, gate on the logits) on 3
    "hlpt": "hlpt(r=4,tokens=2)",
    # gated LoRA on layer 0, layers 1-2 frozen, gated prefix (paper form) on layer 3
    "h2lpt": "h2lpt(r=4,tokens=2)",
    # the branch form (gate and per-head factor outside the softmax) and the value gate
    "prefix_branch": (
        "0:freeze,1-2:prefix(tokens=2,gated,form=branch),"
        "3:prefix(tokens=2,gated,form=paper,gate_at=value)"
    ),
}


class SequenceParallelRMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` taking megatron's norm arguments; its weight carries
    ``sequence_parallel`` (summed over TP by ``finalize_model_grads``), as megatron-core's
    ``FusedLayerNorm`` / ``TENorm`` do."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        super().__init__(hidden_size, eps=eps)
        self.weight.sequence_parallel = bool(config.sequence_parallel)


def build_sp_gpt(sequence_parallel: bool, tp: int = 2, seed: int = 3):
    """The tiny GPTModel of ``tests/helpers/megatron.py`` with a sequence-parallel-capable norm."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    from tests.helpers.megatron import tiny_config

    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.input_layernorm = SequenceParallelRMSNorm
    spec.submodules.pre_mlp_layernorm = SequenceParallelRMSNorm
    block = TransformerBlockSubmodules(
        layer_specs=[spec] * LAYERS, layer_norm=SequenceParallelRMSNorm
    )
    config = tiny_config(LAYERS, tp=tp, sequence_parallel=sequence_parallel)
    torch.manual_seed(seed)
    return GPTModel(
        config=config,
        transformer_layer_spec=block,
        vocab_size=128,
        max_sequence_length=64,
        pre_process=True,
        post_process=True,
        position_embedding_type="rope",
    )


def _window(step: int) -> list[dict]:
    from tests.helpers.megatron import tiny_tokens

    out = []
    for j in range(GAS):
        ids = tiny_tokens(batch=2, seq=SEQ, seed=100 * step + j)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


@torch.no_grad()
def _token_losses(model) -> torch.Tensor:
    """Per-token losses ``[b, s]`` of a fixed batch (megatron's vocab-parallel cross entropy)."""
    from tests.helpers.megatron import position_ids, tiny_tokens

    model.eval()
    ids = tiny_tokens(batch=2, seq=SEQ, seed=999)
    return model(ids, position_ids(ids), None, labels=torch.roll(ids, -1, 1)).detach().clone()


def _run(plan, sequence_parallel: bool) -> dict:
    from layerfreeze.engines.megatron.runner import MegatronRunner
    from tests.helpers.megatron import init_model_parallel

    init_model_parallel(tp=2)
    model = build_sp_gpt(sequence_parallel)
    runner = MegatronRunner(model, plan=plan, lr=1e-2, gradient_accumulation_steps=GAS)
    params = dict(model.named_parameters())
    trainable = sorted(n for n, p in params.items() if p.requires_grad)
    frozen = {n: p.detach().clone() for n, p in params.items() if not p.requires_grad}
    out = {"init": _token_losses(model), "trainable": trainable, "steps": [], "grads": []}
    for step in range(STEPS):
        out["steps"].append(runner.train_step(_window(step)).loss)
        out["grads"].append({n: params[n].main_grad.detach().clone() for n in trainable})
    out["after"] = _token_losses(model)
    out["frozen_same"] = all(torch.equal(params[n], t) for n, t in frozen.items())
    out["n_frozen"] = len(frozen)
    out["sp_marked"] = sorted(n for n in trainable if getattr(params[n], "sequence_parallel", 0))
    runner.close()
    return out


def _body(rank, world_size, plan):
    from tests.helpers.megatron import megatron_cpu_shim

    with megatron_cpu_shim():
        return {"off": _run(plan, False), "on": _run(plan, True)}


@pytest.mark.parametrize("name", sorted(PLANS))
def test_sequence_parallel_matches_tp_without_it(name):
    results = run_distributed(_body, world_size=2, args=(PLANS[name],), timeout=1200)
    for rank, res in enumerate(results):
        off, on = res["off"], res["on"]
        assert on["trainable"] == off["trainable"] and on["trainable"], name
        torch.testing.assert_close(on["init"], off["init"], atol=ATOL, rtol=0)
        for step in range(STEPS):
            for n in on["trainable"]:
                torch.testing.assert_close(
                    on["grads"][step][n],
                    off["grads"][step][n],
                    atol=ATOL,
                    rtol=1e-4,
                    msg=lambda m, n=n, s=step, r=rank: f"rank {r} step {s} grad of {n}: {m}",
                )
        assert on["steps"] == pytest.approx(off["steps"], abs=ATOL)
        torch.testing.assert_close(on["after"], off["after"], atol=ATOL, rtol=0)
        assert (on["after"] - on["init"]).abs().max() > 1e-3  # the adapters did train
        assert on["frozen_same"] and off["frozen_same"]
        assert not off["sp_marked"]
        assert on["sp_marked"]  # replicated adapter tensors fed by sequence shards


# ---------------------------------------------------------------------------------------------
# `layerfreeze train engine=megatron megatron.sequence_parallel=true`: trains, evaluates, resumes


def test_cli_trains_evaluates_and_resumes_with_sequence_parallel(tmp_path, eval_data_dir):
    from tests.e2e.test_train_cli import _losses, _write
    from tests.e2e.test_train_megatron import _eval_files, _mconfig, _mtrain

    runs = {}
    for name, sp in (("sp", True), ("tp", False)):
        out = tmp_path / name
        cfg = _mconfig(out, tmp_path / "cache", 2, 1, eval_data_dir, plan={"spec": "hlpt"})
        cfg["megatron"]["sequence_parallel"] = sp
        config = _write(tmp_path / f"{name}.yaml", cfg)
        proc = _mtrain(config, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-8000:]
        runs[name] = (config, out)
    sp_losses, tp_losses = _losses(runs["sp"][1]), _losses(runs["tp"][1])
    assert sorted(sp_losses) == [1, 2, 3, 4]
    for step in sp_losses:  # the same training with and without sequence parallelism
        assert sp_losses[step] == pytest.approx(tp_losses[step], abs=1e-5), (sp_losses, tp_losses)
    # C-Eval / CMMLU prompts of any length (padded to a multiple of TP for the forward)
    sp_evals, tp_evals = _eval_files(runs["sp"][1]), _eval_files(runs["tp"][1])
    assert [e["step"] for e in sp_evals] == [2, 4]
    for a, b in zip(sp_evals, tp_evals, strict=True):
        assert a.keys() == b.keys()
        assert json_round(a) == json_round(b)

    config, out = runs["sp"]
    resumed = tmp_path / "resumed"
    ckpt = out / "checkpoints" / "step_00000002"
    proc = _mtrain(config, f"logging.out_dir={resumed}", f"checkpoint.resume={ckpt}", timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-8000:]
    again = _losses(resumed)
    assert sorted(again) == [3, 4]
    for step in again:
        assert again[step] == pytest.approx(sp_losses[step], rel=1e-6, abs=1e-7), (again, sp_losses)


def json_round(obj, digits: int = 4):
    """Floats rounded (scores computed from logits equal to float32 rounding); other values kept."""
    if isinstance(obj, float):
        return round(obj, digits)
    if isinstance(obj, dict):
        return {k: json_round(v, digits) for k, v in obj.items() if k not in ("time", "seconds")}
    if isinstance(obj, list):
        return [json_round(v, digits) for v in obj]
    return obj
