"""MegatronRunner on real megatron-core (CPU, gloo, 2 ranks, the test shim of tests/helpers/megatron.py).

Expected values come from independent runs, not from the runner itself:

* TP=2 and PP=2 runs are compared with a TP=1, PP=1 run of the same weights (two data-parallel
  replicas fed identical micro-batches, which is single-model training);
* element counts of the optimizer and the gradient buffers are compared with counts taken from
  ``requires_grad`` and the parameters' own TP split attributes;
* a resumed run is compared with a straight run; weights loaded into another TP/PP layout are
  compared with the saving run's gathered weights.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.helpers.dist import run_distributed

pytestmark = pytest.mark.slow

GAS = 2
LR = 1e-3
WD = 0.1
#: layers 0-2 full, layer 3 frozen: at PP=2 the boundary lies inside stage 1 (layers 2, 3)
BOUNDARY_PLAN = {
    "rules": [{"layers": "0-2", "policy": "full"}],
    "embeddings": "freeze",
    "final_norm": "full",
    "lm_head": "full",
}


def _window(step: int, gas: int = GAS) -> list[dict]:
    from tests.helpers.megatron import tiny_tokens

    out = []
    for j in range(gas):
        ids = tiny_tokens(batch=2, seq=8, seed=100 * step + j)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def _runner(model, **kw):
    from layerfreeze.engines.megatron.runner import MegatronRunner

    kw.setdefault("lr", LR)
    kw.setdefault("weight_decay", WD)
    kw.setdefault("gradient_accumulation_steps", GAS)
    return MegatronRunner(model, **kw)


def _model(tp: int, pp: int, full: dict | None = None, seed: int = 3):
    from tests.helpers.megatron import build_tiny_gpt, init_model_parallel, load_full_weights

    init_model_parallel(tp=tp, pp=pp)
    model = build_tiny_gpt(tp=tp, pp=pp, seed=seed)
    if full is not None:
        load_full_weights(model, full)
    return model


def _reference_weights(seed: int = 3) -> dict:
    from tests.helpers.megatron import build_tiny_gpt, destroy_model_parallel, full_state_dict
    from tests.helpers.megatron import init_model_parallel

    init_model_parallel(tp=1, pp=1)
    full = full_state_dict(build_tiny_gpt(tp=1, seed=seed))
    destroy_model_parallel()
    return full


def _np(tensors):
    """Tensors as numpy arrays (returned from a spawned rank by value, not shared memory)."""
    if tensors is None:
        return None
    if isinstance(tensors, torch.Tensor):
        return tensors.detach().cpu().numpy()
    return {k: v.detach().cpu().numpy() for k, v in tensors.items()}


def _t(arrays):
    if arrays is None or not isinstance(arrays, dict):
        return torch.from_numpy(arrays)
    return {k: torch.from_numpy(v) for k, v in arrays.items()}


def _train(runner, steps: int, start: int = 0) -> list[float]:
    return [runner.train_step(_window(s)).loss for s in range(start, start + steps)]


# ------------------------------------------------------------------------------------------
# optimizer and gradient buffers hold exactly the trainable parameters (TP=2, freeze_deep)


def _exact_body(rank, world_size):
    from megatron.core import parallel_state as ps

    from tests.helpers.megatron import megatron_cpu_shim

    with megatron_cpu_shim():
        model = _model(tp=2, pp=1)
        runner = _runner(model, plan="freeze_deep")
        params = dict(model.named_parameters())
        trainable = {n for n, p in params.items() if p.requires_grad}
        # the plan: layers 0-1 and the embeddings train (freeze_deep, fraction 0.5)
        want = {
            n for n in params
            if n.startswith(("decoder.layers.0.", "decoder.layers.1.", "embedding."))
        }
        opt_params = [
            p for opt in runner.optimizer.chained_optimizers for g in opt.optimizer.param_groups
            for p in g["params"]
        ]
        buf_params = [p for c in runner.ddp_chunks for b in c.buffers for p in b.params]
        frozen_before = {n: p.detach().clone() for n, p in params.items() if not p.requires_grad}
        losses = _train(runner, 2)
        numel = runner.optimizer_state_numel()
        # whole-model trainable elements: TP-split tensors are summed over ranks, replicated once
        local = sum(
            p.numel() if getattr(p, "tensor_model_parallel", False) or
            ps.get_tensor_model_parallel_rank() == 0 else 0
            for n, p in params.items() if n in want
        )
        whole = torch.tensor([float(local)])
        torch.distributed.all_reduce(whole)
        replicated = sum(
            p.numel() for n, p in params.items()
            if n in want and not getattr(p, "tensor_model_parallel", False)
        )
        out = {
            "trainable_is_plan": trainable == want,
            "opt_is_trainable": {id(p) for p in opt_params} == {id(params[n]) for n in trainable},
            "opt_numel": sum(p.numel() for p in opt_params),
            "buf_is_trainable": {id(p) for p in buf_params} == {id(params[n]) for n in trainable},
            "buf_numel": runner.grad_buffer_numel(),
            "local_trainable": sum(params[n].numel() for n in trainable),
            "state_numel": numel,
            "whole_trainable": int(whole.item()),
            "replicated": replicated,
            "frozen_same": all(torch.equal(params[n], t) for n, t in frozen_before.items()),
            "n_frozen": len(frozen_before),
            "losses": losses,
        }
        runner.close()
    return out


def test_optimizer_holds_exactly_the_trainable_elements_tp2():
    res = run_distributed(_exact_body, world_size=2)
    for r in res:
        assert r["trainable_is_plan"]
        assert r["opt_is_trainable"] and r["buf_is_trainable"]
        assert r["opt_numel"] == r["buf_numel"] == r["local_trainable"] > 0
        assert r["n_frozen"] > 0 and r["frozen_same"]
        assert all(math.isfinite(x) for x in r["losses"])
    # the optimizer state over both TP ranks: every trainable element once per TP rank holding
    # it (replicated norms on both ranks), moments for each
    total = res[0]["whole_trainable"] + res[0]["replicated"]
    for r in res:
        assert r["state_numel"] == {"master": total, "exp_avg": total, "exp_avg_sq": total}
    assert res[0]["losses"] == res[1]["losses"]


# ------------------------------------------------------------------------------------------
# TP=2 against TP=1 (same weights): losses, trained weights, frozen weights bit-identical


def _tp_body(rank, world_size):
    from tests.helpers.megatron import megatron_cpu_shim

    steps = 3
    with megatron_cpu_shim():
        out = {}
        for tp in (1, 2):
            model = _model(tp=tp, pp=1)
            runner = _runner(model, plan="freeze_deep")
            params = dict(model.named_parameters())
            frozen_before = {
                n: p.detach().clone() for n, p in params.items() if not p.requires_grad
            }
            before = runner.consolidated_state_dict()
            out[f"loss{tp}"] = _train(runner, steps)
            out[f"frozen_same{tp}"] = all(
                torch.equal(params[n], t) for n, t in frozen_before.items()
            )
            out[f"weights{tp}"] = _np(runner.consolidated_state_dict())
            out[f"before{tp}"] = _np(before)
            out[f"trainable{tp}"] = sorted(runner._global_keys()[n] for n in runner.applied.trainable_names())
            runner.close()
    return out


def test_tp2_matches_tp1_and_keeps_frozen_weights_bit_identical():
    res = run_distributed(_tp_body, world_size=2)
    for r in res:
        assert r["frozen_same1"] and r["frozen_same2"]
        for a, b in zip(r["loss1"], r["loss2"], strict=True):
            assert abs(a - b) < 1e-5, (r["loss1"], r["loss2"])
    w1, w2, b1 = _t(res[0]["weights1"]), _t(res[0]["weights2"]), _t(res[0]["before1"])
    assert sorted(w1) == sorted(w2)
    trainable = set(res[0]["trainable1"])
    assert trainable and any(k.startswith("layers.1.") for k in trainable)
    for k in w1:
        if k in trainable:
            assert not torch.equal(w1[k], b1[k]), k  # it trained
            torch.testing.assert_close(w2[k], w1[k], atol=2e-5, rtol=1e-4)
        else:
            assert torch.equal(w1[k], b1[k]) and torch.equal(w2[k], b1[k]), k


# ------------------------------------------------------------------------------------------
# PP=2 through the 1F1B schedule against PP=1; a stage with every layer frozen


def _pp_body(rank, world_size):
    from megatron.core import parallel_state as ps

    from tests.helpers.megatron import megatron_cpu_shim

    steps = 2
    with megatron_cpu_shim():
        full = _reference_weights()
        out = {}
        for pp in (1, 2):
            runner = _runner(_model(tp=1, pp=pp, full=full), plan=BOUNDARY_PLAN)
            out[f"loss{pp}"] = _train(runner, steps)
            out[f"weights{pp}"] = _np(runner.consolidated_state_dict())
            out[f"layers{pp}"] = {
                i: all(p.requires_grad for p in m.parameters()) for i, m in runner.iter_layers()
            }
            runner.close()
        # every layer of stage 1 frozen (freeze_deep): it still joins every collective
        runner = _runner(_model(tp=1, pp=2, full=full), plan="freeze_deep")
        stage = ps.get_pipeline_model_parallel_rank()
        frozen = {n: p.detach().clone() for n, p in runner.model.named_parameters()}
        res = runner.train_step(_window(0), grad_norms=True)
        out["frozen_stage"] = {
            "stage": stage,
            "trainable": len(runner.applied.trainable_names()),
            "loss": res.loss,
            "norms": sorted(res.grad_norms),
            "eval_loss": runner.evaluate_loss(_window(5)[0]),
            "logits": _np(runner.eval_model()(_window(5)[0]["input_ids"])),
            "unchanged": all(
                torch.equal(p, frozen[n]) for n, p in runner.model.named_parameters()
            ) if stage == 1 else None,
        }
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            box = [tmp]
            torch.distributed.broadcast_object_list(box, src=0)
            path = runner.save_checkpoint(box[0], trainable_only=True)
            out["frozen_stage"]["saved"] = path.name
        runner.close()
    return out


def test_pp2_matches_pp1_and_a_frozen_stage_takes_part():
    res = run_distributed(_pp_body, world_size=2)
    for r in res:
        for a, b in zip(r["loss1"], r["loss2"], strict=True):
            assert abs(a - b) < 1e-5, (r["loss1"], r["loss2"])
    # policies land on the right global layers on each stage: 0-2 full, 3 frozen
    assert res[0]["layers1"] == {0: True, 1: True, 2: True, 3: False}
    assert res[0]["layers2"] == {0: True, 1: True}
    assert res[1]["layers2"] == {2: True, 3: False}
    w1, w2 = _t(res[0]["weights1"]), _t(res[0]["weights2"])
    assert sorted(w1) == sorted(w2)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=2e-6, rtol=1e-5)
    f0, f1 = res[0]["frozen_stage"], res[1]["frozen_stage"]
    assert f1["stage"] == 1 and f1["trainable"] == 0 and f1["unchanged"]
    assert f0["trainable"] > 0
    assert f0["loss"] == f1["loss"] and math.isfinite(f0["loss"])
    assert f0["norms"] == f1["norms"] == ["embeddings", "layers.0", "layers.1"]
    assert f0["eval_loss"] == f1["eval_loss"] and math.isfinite(f0["eval_loss"])
    assert f0["logits"].shape == (2, 8, 128) and (f0["logits"] == f1["logits"]).all()
    assert f0["saved"] == f1["saved"] == "step_00000001"
