"""The megatron-core CPU test shim (tests/helpers/megatron.py) runs the real TP and PP code paths.

TP=2: logits and weight gradients equal the TP=1 model's (same seed: megatron's CPU
initialisation splits the same full matrices). PP=2: the real 1F1B schedule gives the PP=1
losses and gradients once the PP=1 weights are loaded into both stages by global layer index.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers.dist import run_distributed

pytestmark = pytest.mark.slow


def _tp_body(rank, world_size):
    from tests.helpers.megatron import (
        build_tiny_gpt,
        destroy_model_parallel,
        forward_logits,
        full_state_dict,
        gather_tp_logits,
        init_model_parallel,
        load_full_weights,
        megatron_cpu_shim,
        tiny_tokens,
    )

    tokens = tiny_tokens(batch=2, seq=8)
    with megatron_cpu_shim():
        init_model_parallel(tp=1)
        ref = build_tiny_gpt(tp=1, seed=3)
        ref_logits = forward_logits(ref, tokens)
        (ref_logits * torch.linspace(-1, 1, ref_logits.shape[-1])).sum().backward()
        ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
        ref_full = full_state_dict(ref)
        destroy_model_parallel()

        init_model_parallel(tp=2)
        try:
            model = build_tiny_gpt(tp=2, seed=3)
            same_seed = all(
                torch.equal(p, s)
                for p, s in zip(model.parameters(), _shards(model, ref_full), strict=True)
            )
            logits = gather_tp_logits(forward_logits(model, tokens))
            (logits * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
            grad_err = max(  # relative to each gradient's largest entry
                ((p.grad - s).abs().max() / s.abs().max()).item()
                for p, s in zip(model.parameters(), _shards(model, ref_grads), strict=True)
            )
            # loading the reference weights is a no-op here (same seed): they already match
            load_full_weights(model, ref_full)
        finally:
            destroy_model_parallel()
    return {
        "same_seed": same_seed,
        "logit_err": (logits - ref_logits).abs().max().item(),
        "logit_scale": ref_logits.abs().max().item(),
        "grad_err": grad_err,
    }


def _shards(model, full):
    from tests.helpers.megatron import _global_key, _shard

    return [_shard(p, full[_global_key(model, n)]) for n, p in model.named_parameters()]


def _pp_body(rank, world_size, pp, full):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from tests.helpers.megatron import (
        build_tiny_gpt,
        destroy_model_parallel,
        full_state_dict,
        init_model_parallel,
        load_full_weights,
        megatron_cpu_shim,
        position_ids,
        tiny_tokens,
    )

    tokens = tiny_tokens(batch=8, seq=8)
    micro = [tokens[i : i + 2] for i in range(0, 8, 2)]

    def loss_func(out):
        loss = out.float().mean()
        return loss, {"loss": loss.detach()}

    def forward_step(it, model):
        t = next(it)
        return model(t, position_ids(t), None, labels=t.roll(-1, 1)), loss_func

    with megatron_cpu_shim():
        init_model_parallel(tp=1, pp=pp)
        try:
            model = build_tiny_gpt(pp=pp, seed=5)
            if full is not None:
                load_full_weights(model, {k: torch.from_numpy(v) for k, v in full.items()})
            stage = [layer.layer_number for layer in model.decoder.layers]
            out = get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=iter(micro),
                model=[model],
                num_microbatches=4,
                seq_length=8,
                micro_batch_size=2,
            )
            # numpy, not tensors: results cross the process boundary by value (a tensor is
            # passed by shared-memory handle, which dies with the exiting rank)
            grads = {
                k: p.grad.numpy().copy()
                for k, p in zip(full_state_dict(model), model.parameters(), strict=True)
            }
            weights = (
                {k: v.numpy() for k, v in full_state_dict(model).items()} if full is None else None
            )
        finally:
            destroy_model_parallel()
    return {
        "losses": [o["loss"].item() for o in out],
        "grads": grads,
        "stage": stage,
        "weights": weights,
    }


def test_tp2_forward_backward_matches_tp1():
    for r in run_distributed(_tp_body, world_size=2):
        assert r["same_seed"]
        assert r["logit_scale"] > 1e-2  # a real signal, not all zeros
        assert r["logit_err"] < 1e-5
        assert r["grad_err"] < 1e-4


def test_pp2_schedule_matches_pp1():
    (ref,) = run_distributed(_pp_body, world_size=1, args=(1, None))
    first, last = run_distributed(_pp_body, world_size=2, args=(2, ref["weights"]))
    assert first["stage"] == [1, 2] and last["stage"] == [3, 4]
    assert first["losses"] == []  # only the last stage computes the loss
    assert len(last["losses"]) == 4
    torch.testing.assert_close(
        torch.tensor(last["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=1e-6
    )
    merged = {**first["grads"], **last["grads"]}
    assert set(merged) == set(ref["grads"])
    for name, g in ref["grads"].items():
        torch.testing.assert_close(
            torch.from_numpy(merged[name]), torch.from_numpy(g), rtol=1e-4, atol=1e-6, msg=name
        )
