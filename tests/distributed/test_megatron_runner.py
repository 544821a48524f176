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


def _window(step: int, gas: int = GAS, replica: int = 0) -> list[dict]:
    """Micro-batches of one step (``replica``: the data-parallel rank reading them)."""
    from tests.helpers.megatron import tiny_tokens

    out = []
    for j in range(gas):
        ids = tiny_tokens(batch=2, seq=8, seed=100 * step + j + 10_000 * replica)
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

    from layerfreeze.engines.base import EngineAdapter
    from tests.helpers.megatron import megatron_cpu_shim

    with megatron_cpu_shim():
        model = _model(tp=2, pp=1)
        runner = _runner(model, plan="freeze_deep")
        params = dict(model.named_parameters())
        trainable = {n for n, p in params.items() if p.requires_grad}
        # the plan: layers 0-1 and the embeddings train (freeze_deep, fraction 0.5)
        want = {
            n
            for n in params
            if n.startswith(("decoder.layers.0.", "decoder.layers.1.", "embedding."))
        }
        opt_params = [
            p
            for opt in runner.optimizer.chained_optimizers
            for g in opt.optimizer.param_groups
            for p in g["params"]
        ]
        buf_params = [p for c in runner.ddp_chunks for b in c.buffers for p in b.params]
        frozen_before = {n: p.detach().clone() for n, p in params.items() if not p.requires_grad}
        losses = _train(runner, 2)
        # label conventions against the loss written out from the whole logits
        ids = _window(9)[0]["input_ids"]
        logits = runner.eval_model()(ids)
        written = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
        )
        hf_style = runner.evaluate_loss({"input_ids": ids, "labels": ids})
        runner.shift_labels = False
        next_token = runner.evaluate_loss({"input_ids": ids[:, :-1], "labels": ids[:, 1:]})
        runner.shift_labels = True
        numel = runner.optimizer_state_numel()
        # whole-model trainable elements: TP-split tensors are summed over ranks, replicated once
        local = sum(
            p.numel()
            if getattr(p, "tensor_model_parallel", False)
            or ps.get_tensor_model_parallel_rank() == 0
            else 0
            for n, p in params.items()
            if n in want
        )
        whole = torch.tensor([float(local)])
        torch.distributed.all_reduce(whole)
        replicated = sum(
            p.numel()
            for n, p in params.items()
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
            "label_losses": (float(written), hf_style, next_token),
            "protocol": isinstance(runner, EngineAdapter),
        }
        runner.close()
    return out


def test_optimizer_holds_exactly_the_trainable_elements_tp2():
    res = run_distributed(_exact_body, world_size=2)
    for r in res:
        assert r["protocol"]  # satisfies the EngineAdapter Protocol the recipe talks to
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
    written, hf_style, next_token = res[0]["label_losses"]
    assert hf_style == pytest.approx(written, rel=1e-5)
    assert next_token == pytest.approx(written, rel=1e-5)


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
            out[f"trainable{tp}"] = sorted(
                runner._global_keys()[n] for n in runner.applied.trainable_names()
            )
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

    from tests.helpers.megatron import megatron_cpu_shim, reference_weights

    steps = 2
    with megatron_cpu_shim():
        full = reference_weights()
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
            "unchanged": all(torch.equal(p, frozen[n]) for n, p in runner.model.named_parameters())
            if stage == 1
            else None,
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


# ------------------------------------------------------------------------------------------
# plan-schedule phase switch (optimizer state carried) and exact resume across it (TP=2)

SCHEDULE = [{"plan": "freeze_deep", "until_step": 2}, {"plan": "full", "until_step": None}]


def _sched(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.5 * s))


def _shared_tmp():
    import tempfile

    box = [tempfile.mkdtemp(prefix="lf_megatron_") if torch.distributed.get_rank() == 0 else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _resume_body(rank, world_size):
    from tests.helpers.megatron import megatron_cpu_shim

    with megatron_cpu_shim():
        tmp = _shared_tmp()
        straight = _runner(_model(tp=2, pp=1), schedule=SCHEDULE, lr_scheduler=_sched)
        losses = _train(straight, 4)
        final = _np(straight.consolidated_state_dict())
        straight.close()

        runner = _runner(_model(tp=2, pp=1), schedule=SCHEDULE, lr_scheduler=_sched)
        first = _train(runner, 2)
        params = dict(runner.model.named_parameters())
        stay = list(runner.applied.trainable_names())
        before = {n: runner._full_state(params[n]) for n in stay}
        switched = runner.maybe_switch_phase()
        after = {n: runner._full_state(params[n]) for n in stay}
        new = [n for n in runner.applied.trainable_names() if n not in before]
        carried = all(
            set(before[n]) == set(after[n])
            and all(torch.equal(before[n][k], after[n][k]) for k in before[n])
            for n in stay
        )
        fresh = all(set(runner._full_state(params[n])) == {"master"} for n in new)
        third = _train(runner, 1, start=2)
        steps = {
            "stay": {int(runner._full_state(params[n])["step"]) for n in stay},
            "new": {int(runner._full_state(params[n])["step"]) for n in new},
        }
        runner.save_checkpoint(tmp, client_state={"cursor": torch.tensor([3, rank])})
        runner.close()

        resumed = _runner(_model(tp=2, pp=1), schedule=SCHEDULE, lr_scheduler=_sched)
        client = resumed.load_checkpoint(tmp)
        phase, step, lr = resumed.phase, resumed.global_step, resumed.base_lr
        fourth = _train(resumed, 1, start=3)
        resumed_final = _np(resumed.consolidated_state_dict())
        resumed.close()
    return {
        "losses": losses,
        "resumed_losses": first + third + fourth,
        "switched": switched,
        "carried": carried,
        "fresh": fresh,
        "n_stay": len(stay),
        "n_new": len(new),
        "steps": steps,
        "phase": phase,
        "step": step,
        "lr": lr,
        "client": client["cursor"].tolist(),
        "final": final,
        "resumed_final": resumed_final,
    }


def test_phase_switch_carries_optimizer_state_and_resume_is_exact():
    res = run_distributed(_resume_body, world_size=2)
    for rank, r in enumerate(res):
        assert r["switched"] and r["carried"] and r["fresh"]
        assert r["n_stay"] > 0 and r["n_new"] > 0
        # Adam steps continue for parameters trained since step 0; new ones start at 1
        assert r["steps"] == {"stay": {3}, "new": {1}}
        assert (r["phase"], r["step"]) == (1, 3)
        assert r["lr"] == pytest.approx(LR / (1.0 + 0.5 * 3))
        assert r["client"] == [3, rank]
        assert r["resumed_losses"] == r["losses"]  # exact
    f, g = _t(res[0]["final"]), _t(res[0]["resumed_final"])
    assert sorted(f) == sorted(g) and all(torch.equal(f[k], g[k]) for k in f)


# ------------------------------------------------------------------------------------------
# trainable-only checkpoints move between layouts: TP=2,PP=1 -> TP=1,PP=2 -> TP=2,PP=1


def _layouts_body(rank, world_size):
    import os

    from tests.helpers.megatron import megatron_cpu_shim, reference_weights

    with megatron_cpu_shim():
        tmp = _shared_tmp()
        full = reference_weights()
        out = {}
        runner = _runner(_model(tp=2, pp=1, full=full), plan="freeze_deep")
        _train(runner, 2)
        runner.save_checkpoint(os.path.join(tmp, "a"), trainable_only=True)
        out["a"] = _np(runner.consolidated_state_dict())
        runner.close()

        runner = _runner(_model(tp=1, pp=2, full=full), plan="freeze_deep")
        out["loaded_pp"] = len(runner.load_trainable_weights(os.path.join(tmp, "a")))
        out["a_at_pp2"] = _np(runner.consolidated_state_dict())
        _train(runner, 1, start=2)
        runner.save_checkpoint(os.path.join(tmp, "b"), trainable_only=True)
        out["b"] = _np(runner.consolidated_state_dict())
        runner.close()

        runner = _runner(_model(tp=2, pp=1, full=full), plan="freeze_deep")
        runner.load_trainable_weights(os.path.join(tmp, "b"))
        out["b_at_tp2"] = _np(runner.consolidated_state_dict())
        try:  # full resume needs the same layout, and says what to do instead
            runner.load_checkpoint(os.path.join(tmp, "b"))
            out["resume_error"] = None
        except ValueError as e:
            out["resume_error"] = str(e)
        runner.close()
        out["files"] = sorted(os.listdir(os.path.join(tmp, "a", "step_00000002", "weights")))
    out["base"] = _np(_t_full(full))
    return out


def _t_full(full):
    """Reference weights keyed like the runner's global keys (layers.<i>.base.<path>, ...)."""
    out = {}
    for k, v in full.items():
        parts = k.split(".")
        if parts[:2] == ["decoder", "layers"]:
            out[f"layers.{parts[2]}.base.{'.'.join(parts[3:])}"] = v
        elif k.startswith("embedding."):
            out[f"embeddings.base.{k}"] = v
        elif k.startswith("decoder.final_layernorm"):
            out[f"final_norm.base.{k}"] = v
        else:
            out[f"lm_head.base.{k}"] = v
    return out


def test_trainable_checkpoint_moves_between_tp_and_pp_layouts():
    res = run_distributed(_layouts_body, world_size=2)
    r = res[0]
    a, a2, b, b2, base = (_t(r[k]) for k in ("a", "a_at_pp2", "b", "b_at_tp2", "base"))
    assert sorted(a) == sorted(base) == sorted(a2) == sorted(b) == sorted(b2)
    trained = {k for k in a if not torch.equal(a[k], base[k])}
    assert trained and all(k.startswith(("layers.0.", "layers.1.", "embeddings.")) for k in trained)
    for k in a:
        assert torch.equal(a2[k], a[k]), k  # TP=2,PP=1 -> TP=1,PP=2: bit-exact
        assert torch.equal(b2[k], b[k]), k  # TP=1,PP=2 -> TP=2,PP=1: bit-exact
    assert any(not torch.equal(b[k], a[k]) for k in trained)  # the PP=2 step trained further
    assert r["files"] == ["stage_000.safetensors"]
    # stage 0 (layers 0-1, embeddings) receives the trained tensors; stage 1 holds none of them
    assert r["loaded_pp"] > 0 and res[1]["loaded_pp"] == 0
    assert "load_trainable_weights" in r["resume_error"]


# ------------------------------------------------------------------------------------------
# LoRA + prefix adapters (hlpt_branch: megatron runs the branch form) trained at TP=2 reproduce
# their logits at TP=1, PP=2


def _adapters_body(rank, world_size):
    import os

    from tests.helpers.megatron import megatron_cpu_shim, reference_weights, tiny_tokens

    ids = tiny_tokens(batch=2, seq=8, seed=77)
    with megatron_cpu_shim():
        tmp = _shared_tmp()
        full = reference_weights()
        runner = _runner(_model(tp=2, pp=1, full=full), plan="hlpt_branch", lr=2e-2)
        _train(runner, 2)
        trained = runner.eval_model()(ids)
        runner.save_checkpoint(os.path.join(tmp, "hlpt"), trainable_only=True)
        keys = sorted(runner._global_keys()[n] for n in runner.applied.trainable_names())
        runner.close()

        runner = _runner(_model(tp=1, pp=2, full=full), plan="hlpt_branch", lr=2e-2)
        base = runner.eval_model()(ids)
        loaded = runner.load_trainable_weights(os.path.join(tmp, "hlpt"))
        moved = runner.eval_model()(ids)
        runner.close()
    return {
        "trained": _np(trained),
        "base": _np(base),
        "moved": _np(moved),
        "keys": keys,
        "loaded": len(loaded),
    }


def test_lora_and_prefix_adapters_move_from_tp2_to_pp2():
    res = run_distributed(_adapters_body, world_size=2)
    r = res[0]
    assert any(".lora." in k for k in r["keys"]) and any(".prefix." in k for k in r["keys"])
    assert all(x["loaded"] > 0 for x in res)  # both stages hold adapters
    trained, base, moved = _t(r["trained"]), _t(r["base"]), _t(r["moved"])
    assert (trained - base).abs().max() > 1e-3  # the adapters changed the model
    torch.testing.assert_close(moved, trained, atol=2e-5, rtol=1e-4)
    assert (_t(res[1]["moved"]) == moved).all()  # every rank gets the whole logits


# ------------------------------------------------------------------------------------------
# distributed optimizer at DP=2: NaN guard, all-bad step, phase switch, exact resume


def _guard_body(rank, world_size):
    from megatron.core import parallel_state as ps

    from tests.helpers.megatron import megatron_cpu_shim

    def make():
        runner = _runner(
            _model(tp=1, pp=1),
            schedule=SCHEDULE,
            use_distributed_optimizer=True,
            lr_scheduler=_sched,
        )
        dp = ps.get_data_parallel_rank()
        # (optimizer step, training forward call) whose logits become NaN on this replica:
        # step 1: micro-batch 1 on replica 1 only; step 2 (phase 1): both on replica 0
        poison = {(1, 1)} if dp == 1 else {(2, 0), (2, 1)}
        seen = {"step": -1, "calls": 0}

        def hook(module, inputs, output):
            if not module.training:
                return None
            if seen["step"] != runner.global_step:
                seen.update(step=runner.global_step, calls=0)
            call, seen["calls"] = seen["calls"], seen["calls"] + 1
            if (runner.global_step, call) in poison:
                return (output[0] * float("nan"), *output[1:])
            return None

        runner.model.output_layer.register_forward_hook(hook)
        return runner, dp

    with megatron_cpu_shim():
        tmp = _shared_tmp()
        runner, dp = make()
        steps = [runner.train_step(_window(0, replica=dp))]
        expected = runner.evaluate_loss(_window(1, replica=dp)[0])  # mean over both replicas
        steps.append(runner.train_step(_window(1, replica=dp)))
        runner.save_checkpoint(tmp)
        before = _np(runner.consolidated_state_dict())
        steps.append(runner.train_step(_window(2, replica=dp)))
        after = _np(runner.consolidated_state_dict())
        steps.append(runner.train_step(_window(3, replica=dp)))
        counts = (runner.bad_micro_batches, runner.skipped_steps, runner.phase)
        state = runner.optimizer_state_numel()
        runner.close()

        resumed, _ = make()
        resumed.load_checkpoint(tmp)
        again = [resumed.train_step(_window(s, replica=dp)).loss for s in (2, 3)]
        again = [x if math.isfinite(x) else "nan" for x in again]
        resumed.close()
    return {
        "steps": [
            (o.loss if math.isfinite(o.loss) else "nan", o.bad_micro_batches, o.skipped, o.phase)
            for o in steps
        ],
        "expected": expected,
        "before": before,
        "after": after,
        "counts": counts,
        "again": again,
        "state": state,
    }


def test_distributed_optimizer_nan_guard_phase_switch_and_resume():
    res = run_distributed(_guard_body, world_size=2)
    assert res[0]["steps"] == res[1]["steps"]  # every rank agrees
    (l0, b0, s0, p0), (l1, b1, s1, p1), (l2, b2, s2, p2), (l3, b3, s3, p3) = res[0]["steps"]
    assert (b0, s0, p0) == (0, False, 0) and math.isfinite(l0)
    # micro-batch 1 was bad on one replica: skipped on both; the loss is micro-batch 0's mean
    assert (b1, s1, p1) == (1, False, 0) and l1 == pytest.approx(res[0]["expected"], rel=1e-6)
    # every micro-batch bad on one replica: no parameter moves
    assert (l2, b2, s2, p2) == ("nan", 2, True, 1)
    before, after = _t(res[0]["before"]), _t(res[0]["after"])
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert (b3, s3, p3) == (0, False, 1) and math.isfinite(l3)
    for r in res:
        assert r["counts"] == (3, 1, 1)
        # the distributed optimizer shards state over the 2 replicas: one copy in total
        assert r["state"]["master"] == sum(v.size for v in res[0]["before"].values())
    # resumed from step 2 (before the bad step and the switch): the same losses, exactly
    assert res[0]["again"] == ["nan", l3]


# ------------------------------------------------------------------------------------------
# merged Hugging Face export of a Llama trained with plain LoRA at TP=2

LORA_PLAN = {"rules": [{"layers": "all", "policy": "lora", "r": 4, "target": "mlp"}]}


def _export_body(rank, world_size):
    from transformers import AutoModelForCausalLM

    from layerfreeze.engines.megatron import convert
    from tests.helpers.megatron import init_model_parallel, megatron_cpu_shim, tiny_tokens
    from tests.helpers.tiny_models import build_tiny_model

    hf = build_tiny_model("llama", num_layers=4)
    ids = tiny_tokens(batch=2, seq=8, seed=5, vocab=hf.config.vocab_size)
    with megatron_cpu_shim():
        tmp = _shared_tmp()
        init_model_parallel(tp=2, pp=1)
        model = convert.build_gpt_from_hf_config(
            hf.config, config_overrides={"use_cpu_initialization": True}
        )
        convert.load_hf_weights(model, hf.state_dict(), hf.config)
        runner = _runner(model, plan=LORA_PLAN, lr=2e-2, hf_config=hf.config)
        base = runner.eval_model()(ids)
        _train(runner, 2)
        trained = runner.eval_model()(ids)
        path = runner.export_merged(f"{tmp}/hf", tokenizer=None)
        after = runner.eval_model()(ids)
        runner.close()
    out = {"base": _np(base), "trained": _np(trained), "after": _np(after)}
    if rank == 0:
        with torch.no_grad():
            exported = AutoModelForCausalLM.from_pretrained(str(path)).float().eval()
            out["exported"] = _np(exported(ids).logits)
            out["hf_base"] = _np(hf(ids).logits)
    return out


def test_export_merged_gives_the_trained_logits_in_hugging_face():
    res = run_distributed(_export_body, world_size=2)
    r = res[0]
    base, trained, after = _t(r["base"]), _t(r["trained"]), _t(r["after"])
    torch.testing.assert_close(base, _t(r["hf_base"]), atol=2e-5, rtol=1e-4)  # same start
    assert (trained - base).abs().max() > 1e-3  # LoRA trained
    torch.testing.assert_close(_t(r["exported"]), trained, atol=5e-5, rtol=1e-4)
    torch.testing.assert_close(after, trained, atol=1e-6, rtol=1e-6)  # unmerged again


# ------------------------------------------------------------------------------------------
# plan_model_provider + optimizer_overrides in a hand-built Megatron loop (TP=2), and the
# runner's per-group lr / weight decay

SCALED_PLAN = {
    "rules": [
        {"layers": "0-1", "policy": "full", "lr_scale": 0.5, "weight_decay": 0.05},
        {"layers": "2-3", "policy": "lora", "r": 2, "target": "mlp", "lr_scale": 4.0},
    ],
    "embeddings": "freeze",
    "final_norm": "full",
    "lm_head": "freeze",
}


def _provider_body(rank, world_size):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from layerfreeze.megatron import optimizer_overrides, plan_model_provider
    from tests.helpers.megatron import build_tiny_gpt, init_model_parallel, megatron_cpu_shim

    seen = []

    def old_style(pre_process=True, post_process=True):
        seen.append(("old", pre_process, post_process))
        return build_tiny_gpt(tp=2, seed=3, pre_process=pre_process, post_process=post_process)

    def new_style(pre_process, post_process, vp_stage=None, config=None, pg_collection=None):
        seen.append(("new", pre_process, post_process, vp_stage, config, pg_collection))
        return build_tiny_gpt(tp=2, seed=3, pre_process=pre_process, post_process=post_process)

    out = {}
    with megatron_cpu_shim():
        init_model_parallel(tp=2, pp=1)
        old = plan_model_provider(old_style, SCALED_PLAN)(True, True)
        new = plan_model_provider(new_style, SCALED_PLAN)(
            pre_process=True, post_process=True, vp_stage=None, config="cfg", pg_collection="pg"
        )
        out["seen"] = seen
        out["same_trainable"] = (
            old.layerfreeze_applied.trainable_names() == new.layerfreeze_applied.trainable_names()
        )
        names = {id(p): n for n, p in new.named_parameters()}
        ddp = DistributedDataParallel(
            config=new.config, ddp_config=DistributedDataParallelConfig(), module=new
        )
        cfg = OptimizerConfig(optimizer="adam", lr=1e-3, min_lr=1e-4, weight_decay=0.1)
        opt = get_megatron_optimizer(cfg, [ddp], config_overrides=optimizer_overrides([ddp], cfg))
        sched = OptimizerParamScheduler(
            opt,
            init_lr=0.0,
            max_lr=1e-3,
            min_lr=1e-4,
            lr_warmup_steps=0,
            lr_decay_steps=10,
            lr_decay_style="constant",
            start_wd=0.1,
            end_wd=0.1,
            wd_incr_steps=10,
            wd_incr_style="constant",
        )
        sched.step(1)
        out["megatron_groups"] = sorted(
            (
                round(g["lr"], 9),
                round(g["weight_decay"], 9),
                sorted(names[id(p)] for p in g["params"]),
            )
            for g in opt.param_groups
            if g["params"]
        )
        init_model_parallel(tp=2, pp=1)
        runner = _runner(build_tiny_gpt(tp=2, seed=3), plan=SCALED_PLAN, lr=1e-3, weight_decay=0.1)
        rnames = {id(p): n for n, p in runner.model.named_parameters()}
        out["runner_groups"] = sorted(
            (
                round(g["lr"], 9),
                round(g["weight_decay"], 9),
                sorted(rnames[id(p)] for p in g["params"]),
            )
            for g in runner.param_groups
            if g["params"]
        )
        runner.close()
    return out


def _expected_groups() -> list:
    """The plan's groups written out: layers 0-1 full at lr 0.5x (matrices decay 0.05), the
    LoRA of layers 2-3 at 4x (A/B decay 0.1), the final norm at 1x; norms never decay."""
    groups: dict[tuple, list] = {}

    def add(lr, wd, name):
        groups.setdefault((round(lr, 9), round(wd, 9)), []).append(name)

    for i in (0, 1):
        p = f"decoder.layers.{i}."
        add(5e-4, 0.0, p + "input_layernorm.weight")
        add(5e-4, 0.0, p + "pre_mlp_layernorm.weight")
        for m in (
            "self_attention.linear_qkv",
            "self_attention.linear_proj",
            "mlp.linear_fc1",
            "mlp.linear_fc2",
        ):
            add(5e-4, 0.05, f"{p}{m}.weight")
    add(1e-3, 0.0, "decoder.final_layernorm.weight")
    return groups


def test_plan_model_provider_and_optimizer_overrides():
    res = run_distributed(_provider_body, world_size=2)
    r = res[0]
    assert r["seen"] == [
        ("old", True, True),
        ("new", True, True, None, "cfg", "pg"),
    ]
    assert r["same_trainable"]
    got = {(lr, wd): names for lr, wd, names in r["megatron_groups"]}
    assert {(lr, wd): names for lr, wd, names in r["runner_groups"]} == got
    expected = _expected_groups()
    for key, names in expected.items():
        assert sorted(names) == [n for n in got[key] if n in set(names)], key
        assert set(got[key]) == set(names), key
    lora = [k for k in got if k not in expected]
    assert [k[0] for k in lora] == [4e-3]  # LoRA A/B of layers 2-3 at 4x, decaying
    assert all(".lora" in n or "lora_" in n for n in got[lora[0]])
    assert {n.split(".")[2] for n in got[lora[0]]} == {"2", "3"}


# ------------------------------------------------------------------------------------------
# virtual pipeline (PP=2 x 2 chunks, interleaved 1F1B) against PP=1; its checkpoint at TP=2


def _vp_body(rank, world_size):
    import os

    from tests.helpers.megatron import (
        build_tiny_gpt,
        init_model_parallel,
        load_full_weights,
        megatron_cpu_shim,
        reference_weights,
        tiny_tokens,
    )

    ids = tiny_tokens(batch=2, seq=8, seed=31)
    with megatron_cpu_shim():
        tmp = _shared_tmp()
        full = reference_weights()
        runner = _runner(_model(tp=1, pp=1, full=full), plan=BOUNDARY_PLAN)
        ref = _train(runner, 2)
        ref_logits = runner.eval_model()(ids)
        runner.close()

        init_model_parallel(tp=1, pp=2, virtual_pipeline_model_parallel_size=2)
        chunks = []
        for v in range(2):
            chunk = build_tiny_gpt(pp=2, seed=3, vp_stage=v, virtual_pipeline_model_parallel_size=2)
            load_full_weights(chunk, full)
            chunks.append(chunk)
        runner = _runner(chunks, plan=BOUNDARY_PLAN)
        layers = {i: all(p.requires_grad for p in m.parameters()) for i, m in runner.iter_layers()}
        got = _train(runner, 2)
        logits = runner.eval_model()(ids)
        runner.save_checkpoint(os.path.join(tmp, "vp"), trainable_only=True)
        weights = _np(runner.consolidated_state_dict())
        runner.close()

        runner = _runner(_model(tp=2, pp=1, full=full), plan=BOUNDARY_PLAN)
        runner.load_trainable_weights(os.path.join(tmp, "vp"))
        at_tp2 = _np(runner.consolidated_state_dict())
        runner.close()
    return {
        "ref": ref,
        "got": got,
        "layers": layers,
        "ref_logits": _np(ref_logits),
        "logits": _np(logits),
        "weights": weights,
        "at_tp2": at_tp2,
    }


def test_virtual_pipeline_matches_pp1_and_its_checkpoint_loads_at_tp2():
    res = run_distributed(_vp_body, world_size=2)
    assert res[0]["layers"] == {0: True, 2: True}  # chunk 0: layer 0, chunk 1: layer 2
    assert res[1]["layers"] == {1: True, 3: False}
    for r in res:
        for a, b in zip(r["ref"], r["got"], strict=True):
            assert abs(a - b) < 1e-5, (r["ref"], r["got"])
        torch.testing.assert_close(_t(r["logits"]), _t(r["ref_logits"]), atol=1e-5, rtol=1e-5)
    w, w2 = _t(res[0]["weights"]), _t(res[0]["at_tp2"])
    assert sorted(w) == sorted(w2) and all(torch.equal(w[k], w2[k]) for k in w)


# ------------------------------------------------------------------------------------------
# bf16 weights (Megatron's Float16 optimizer, fp32 master copies) at TP=2: phase switch keeps
# the fp32 masters, resume is exact


def _bf16_body(rank, world_size):
    from tests.helpers.megatron import build_tiny_gpt, init_model_parallel, megatron_cpu_shim

    schedule = [{"plan": "freeze_deep", "until_step": 1}, {"plan": "full", "until_step": None}]

    def make():
        init_model_parallel(tp=2, pp=1)
        model = build_tiny_gpt(
            tp=2, seed=3, params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16, bf16=True
        )
        return _runner(model, schedule=schedule)

    with megatron_cpu_shim():
        tmp = _shared_tmp()
        runner = make()
        losses = _train(runner, 1)
        params = dict(runner.model.named_parameters())
        name = runner.applied.trainable_names()[0]
        before = runner._full_state(params[name])
        runner.maybe_switch_phase()
        after = runner._full_state(params[name])
        carried = all(torch.equal(before[k], after[k]) for k in before) and set(before) == set(
            after
        )
        finer = not torch.equal(after["master"], params[name].detach().float())
        losses += _train(runner, 1, start=1)
        runner.save_checkpoint(tmp)
        losses += _train(runner, 1, start=2)
        kinds = sorted({type(o).__name__ for o in runner.optimizer.chained_optimizers})
        runner.close()
        resumed = make()
        resumed.load_checkpoint(tmp)
        again = _train(resumed, 1, start=2)
        resumed.close()
    return {"losses": losses, "again": again, "kinds": kinds, "carried": carried, "finer": finer}


def test_bf16_phase_switch_keeps_fp32_masters_and_resume_is_exact():
    for r in run_distributed(_bf16_body, world_size=2):
        assert r["kinds"] == ["Float16OptimizerWithFloat16Params"]
        assert r["carried"] and r["finer"]  # the fp32 master, not the bf16 weight, was carried
        assert all(math.isfinite(x) for x in r["losses"])
        assert r["again"] == r["losses"][2:]


# ------------------------------------------------------------------------------------------
# tied embeddings: PP=2 (the last stage holds a synchronised copy) against PP=1, and back


def _tied_body(rank, world_size):
    import os

    from tests.helpers.megatron import (
        build_tiny_gpt,
        full_state_dict,
        init_model_parallel,
        load_full_weights,
        megatron_cpu_shim,
    )

    with megatron_cpu_shim():
        tmp = _shared_tmp()
        init_model_parallel(tp=1, pp=1)
        full = full_state_dict(build_tiny_gpt(seed=3, tied=True))
        runner = _runner(build_tiny_gpt(seed=3, tied=True), plan="full")
        ref = _train(runner, 2)
        w1 = _np(runner.consolidated_state_dict())
        runner.close()

        init_model_parallel(tp=1, pp=2)
        model = build_tiny_gpt(pp=2, seed=3, tied=True)
        load_full_weights(model, full, strict=False)
        with torch.no_grad():  # the last stage's copy of the shared weight
            for n, p in model.named_parameters():
                if n == "output_layer.weight":
                    p.copy_(full["embedding.word_embeddings.weight"])
        runner = _runner(model, plan="full")
        got = _train(runner, 2)
        runner.save_checkpoint(os.path.join(tmp, "tied"), trainable_only=True)
        w2 = _np(runner.consolidated_state_dict())
        runner.close()

        init_model_parallel(tp=1, pp=1)
        runner = _runner(build_tiny_gpt(seed=3, tied=True), plan="full")
        runner.load_trainable_weights(os.path.join(tmp, "tied"))
        w3 = _np(runner.consolidated_state_dict())
        runner.close()
    return {"ref": ref, "got": got, "w1": w1, "w2": w2, "w3": w3}


def test_tied_embeddings_across_pipeline_stages():
    res = run_distributed(_tied_body, world_size=2)
    for r in res:
        for a, b in zip(r["ref"], r["got"], strict=True):
            assert abs(a - b) < 1e-5
    w1, w2, w3 = (_t(res[0][k]) for k in ("w1", "w2", "w3"))
    assert sorted(w1) == sorted(w2) == sorted(w3)  # the copy is not a tensor of its own
    assert "embeddings.base.embedding.word_embeddings.weight" in w1
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=1e-6, rtol=1e-5)
        assert torch.equal(w3[k], w2[k])
