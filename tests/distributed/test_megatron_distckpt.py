"""Adapters in megatron-core distributed checkpoints (``dist_checkpointing.save/load``), 2 gloo ranks.

A Megatron-LM pipeline saves ``model.sharded_state_dict()`` and loads it back into a fresh
provider's model. Each plan below is applied to a tiny GPT at TP=2 (or PP=2), its adapters
randomised, per-token losses taken, the checkpoint saved; then a fresh model built from a
*different* seed (so every tensor must come from the checkpoint) gets the same plan, loads the
checkpoint at the same layout and at TP=1 / PP=1 (resharded), and its per-token losses must equal
the saved model's. The expected values are the saved model's own losses (an independent forward
of the same weights), never a copied number.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers.dist import run_distributed

pytestmark = pytest.mark.slow

#: adapter kind -> plan on the 4-layer test model (the mixed one covers some layers only, with
#: ungated LoRA on one layer, gated LoRA on another, a gated prefix on a third).
PLANS = {
    "lora": "0-3:lora(r=4,target=all)",
    "lora_gated": "0-3:lora(r=4,target=all,gated)",
    "prefix": "0-3:prefix(tokens=2)",
    "prefix_gated": "0-3:prefix(tokens=3,gated)",
    "mixed": "0:freeze,1:lora(r=4,target=mlp),2:lora(r=4,target=attn,gated),3:prefix(tokens=2,gated)",
}
#: at PP=2 every plan leaves layer 0 without adapters (a plan's adapters on some layers of a stage)
PP_PLANS = {k: v.replace("0-3:", "0:freeze,1-3:") for k, v in PLANS.items()}
SAVE_SEED, FRESH_SEED = 3, 5


def _randomise_adapters(model, seed: int = 11) -> None:
    """Non-zero values for every adapter parameter from fixed generators: replicated tensors get
    the same draws on every TP rank (they must stay identical), TP-split ones other draws on
    each rank (the shards of one tensor differ, so a checkpoint that mixes them up shows)."""
    from megatron.core import parallel_state

    from layerfreeze.apply import adapter_param_names

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    replicated = torch.Generator().manual_seed(seed)
    split = torch.Generator().manual_seed(seed + 1000 * (tp_rank + 1))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in sorted(adapter_param_names(model)):
            p = params[name]
            g = split if getattr(p, "tensor_model_parallel", False) else replicated
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _token_losses(model, tokens):
    """Per-token losses ``[b, s]`` through megatron's own schedule (last stage; None elsewhere)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from tests.helpers.megatron import position_ids

    def loss_func(out):
        return out.float().mean(), {"tok": out.detach().float().clone()}

    def forward_step(it, m):
        t = next(it)
        return m(t, position_ids(t), None, labels=t.roll(-1, 1)), loss_func

    b, s = tokens.shape
    with torch.no_grad():
        res = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter([tokens]),
            model=[model],
            num_microbatches=1,
            seq_length=s,
            micro_batch_size=b,
            forward_only=True,
        )
    if not parallel_state.is_pipeline_last_stage():
        return None
    return res[0]["tok"].numpy().copy()


def _build(tp: int, pp: int, seed: int, plan: str):
    from layerfreeze import apply_plan
    from layerfreeze.engines.megatron import megatron_layout
    from tests.helpers.megatron import build_tiny_gpt, init_model_parallel

    init_model_parallel(tp=tp, pp=pp)
    model = build_tiny_gpt(tp=tp, pp=pp, seed=seed)
    applied = apply_plan(model, plan, layout=megatron_layout(model))
    return model, applied


def _roundtrip_body(rank, world_size, tmp, save_layout, load_layouts, plans):
    """For each plan: save at ``save_layout``, load at each of ``load_layouts``; per-token losses."""
    import os
    import sys

    from megatron.core import dist_checkpointing

    from tests.helpers.megatron import destroy_model_parallel, megatron_cpu_shim, tiny_tokens

    tokens = tiny_tokens(batch=2, seq=8)
    out: dict = {}
    with megatron_cpu_shim():
        for name, plan in plans.items():
            res: dict = {"loads": {}}
            out[name] = res
            ckpt = os.path.join(tmp, name)
            try:
                model, _ = _build(*save_layout, SAVE_SEED, plan)
                _randomise_adapters(model)
                res["saved"] = _token_losses(model, tokens)
                os.makedirs(ckpt, exist_ok=True)
                dist_checkpointing.save(model.sharded_state_dict(), ckpt)
                destroy_model_parallel()
                for layout in load_layouts:
                    fresh, _ = _build(*layout, FRESH_SEED, plan)
                    before = _token_losses(fresh, tokens)
                    state = dist_checkpointing.load(fresh.sharded_state_dict(), ckpt)
                    fresh.load_state_dict(state)
                    res["loads"][layout] = (before, _token_losses(fresh, tokens))
                    destroy_model_parallel()
            except BaseException as e:  # noqa: BLE001 - reported to the test, which fails on it
                # (torch's distributed CheckpointException is a BaseException; both ranks raise
                # it, as they do the AttributeError / CheckpointingException of a bad state dict)
                if isinstance(e, KeyboardInterrupt):
                    raise
                res["error"] = f"{type(e).__name__}: {e}"[:600]
                print(f"rank {rank}, plan {name}: {res['error']}", file=sys.stderr, flush=True)
                destroy_model_parallel()
                break  # the other rank may be inside a collective: stop, do not desync
    return out


def _merge_ranks(results):
    """Per plan: the saved losses and each load's losses from whichever rank holds them."""
    merged: dict = {}
    for r in results:
        for name, res in r.items():
            m = merged.setdefault(name, {"loads": {}})
            if "error" in res:
                m.setdefault("error", res["error"])
            if res.get("saved") is not None:
                m["saved"] = res["saved"]
            for layout, (before, after) in res["loads"].items():
                if after is not None:
                    m["loads"][layout] = (before, after)
    return merged


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("tp"))
    res = run_distributed(
        _roundtrip_body,
        world_size=2,
        args=(tmp, (2, 1), [(2, 1), (1, 1)], PLANS),
        timeout=300,
    )
    return _merge_ranks(res)


@pytest.fixture(scope="module")
def pp_results(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("pp"))
    res = run_distributed(
        _roundtrip_body,
        world_size=2,
        args=(tmp, (1, 2), [(1, 2), (1, 1)], PP_PLANS),
        timeout=300,
    )
    return _merge_ranks(res)


def _check(results, kind, layout, exact: bool):
    res = results.get(kind, {"error": f"{kind}: not run (an earlier plan failed)"})
    assert "error" not in res, res["error"]
    saved = torch.from_numpy(res["saved"])
    before, after = (torch.from_numpy(x) for x in res["loads"][layout])
    # the fresh model (other seed) really differs before the load
    assert (before - saved).abs().max() > 1e-2
    if exact:
        torch.testing.assert_close(after, saved, rtol=0, atol=1e-6)
    else:
        torch.testing.assert_close(after, saved, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", list(PLANS))
def test_tp2_roundtrip_same_layout(tp_results, kind):
    _check(tp_results, kind, (2, 1), exact=True)


@pytest.mark.parametrize("kind", list(PLANS))
def test_tp2_checkpoint_loads_at_tp1(tp_results, kind):
    _check(tp_results, kind, (1, 1), exact=False)


@pytest.mark.parametrize("kind", list(PLANS))
def test_pp2_roundtrip_same_layout(pp_results, kind):
    _check(pp_results, kind, (1, 2), exact=True)


@pytest.mark.parametrize("kind", list(PLANS))
def test_pp2_checkpoint_loads_at_pp1(pp_results, kind):
    _check(pp_results, kind, (1, 1), exact=False)


# ---------------------------------------------------------------------------------------------
# Adapter-only checkpoint: what the plan trains, onto a fresh model whose base weights come from
# a separate (pretrained, plan-free) checkpoint.

#: a fully trained layer among frozen ones, plus every adapter kind.
TRAINED_PLAN = "0:full,1:lora(r=4,target=mlp),2:lora(r=4,target=all,gated),3:prefix(tokens=2,gated)"


def _dir_bytes(path: str) -> int:
    import os

    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def _trained_body(rank, world_size, tmp):
    import os

    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from layerfreeze import apply_plan
    from layerfreeze.engines.megatron import megatron_layout
    from layerfreeze.engines.megatron.sharded import (
        base_sharded_state_dict,
        load_sharded_into,
        load_trained,
        save_trained,
        trained_sharded_state_dict,
    )
    from tests.helpers.megatron import (
        build_tiny_gpt,
        destroy_model_parallel,
        init_model_parallel,
        megatron_cpu_shim,
        tiny_tokens,
    )

    dirs = {k: os.path.join(tmp, k) for k in ("base", "trained", "full")}
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)
    tokens = tiny_tokens(batch=2, seq=8)
    out: dict = {"loads": {}}
    with megatron_cpu_shim():
        init_model_parallel(tp=2)
        model = build_tiny_gpt(tp=2, seed=SAVE_SEED)
        dist_checkpointing.save(model.sharded_state_dict(), dirs["base"])  # "pretrained", no plan
        applied = apply_plan(model, TRAINED_PLAN, layout=megatron_layout(model))
        _randomise_adapters(model)
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():  # "training" of the fully trained layer
            for n, p in model.named_parameters():
                if n.startswith("decoder.layers.0."):
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)
        out["saved"] = _token_losses(model, tokens)
        sharded = trained_sharded_state_dict(model)
        out["trained_keys"] = sorted(sharded)
        out["trainable"] = sorted(applied.trainable_names())
        save_trained(model, dirs["trained"])
        dist_checkpointing.save(model.sharded_state_dict(), dirs["full"])
        destroy_model_parallel()
        dist.barrier()
        if rank == 0:
            out["bytes"] = {k: _dir_bytes(d) for k, d in dirs.items()}
        for tp in (2, 1):
            init_model_parallel(tp=tp)
            fresh = build_tiny_gpt(tp=tp, seed=FRESH_SEED)
            apply_plan(fresh, TRAINED_PLAN, layout=megatron_layout(fresh))
            base_keys = load_sharded_into(fresh, base_sharded_state_dict(fresh), dirs["base"])
            base_only = _token_losses(fresh, tokens)
            trained_keys = load_trained(fresh, dirs["trained"])
            out["loads"][tp] = (base_only, _token_losses(fresh, tokens))
            out.setdefault("base_keys", sorted(base_keys))
            out.setdefault("loaded_trained_keys", sorted(trained_keys))
            destroy_model_parallel()
    return out


def test_adapter_only_checkpoint_roundtrip_and_size(tmp_path):
    r0, r1 = run_distributed(_trained_body, world_size=2, args=(str(tmp_path),), timeout=600)
    # exactly what the plan trains: the full layer 0 and the adapters, nothing else
    assert r0["trained_keys"] == r0["trainable"] == r0["loaded_trained_keys"]
    assert any(
        k.startswith("decoder.layers.0.self_attention.linear_qkv.weight")
        for k in r0["trained_keys"]
    )
    assert not any(
        k.startswith("decoder.layers.3.") and "prefix_" not in k for k in r0["trained_keys"]
    )
    assert not any("adapter" in k or "lora_gate" in k for k in r0["base_keys"])
    saved = torch.from_numpy(r0["saved"])
    for tp in (2, 1):
        base_only, loaded = (torch.from_numpy(x) for x in r0["loads"][tp])
        assert (base_only - saved).abs().max() > 1e-2, tp  # the adapters and layer 0 matter
        torch.testing.assert_close(loaded, saved, rtol=1e-5, atol=1e-5 if tp == 1 else 1e-6)
    sizes = r0["bytes"]
    ratio = sizes["trained"] / sizes["full"]
    print(f"adapter-only checkpoint: {sizes['trained']} B vs full {sizes['full']} B ({ratio:.3f})")
    assert ratio < 0.6


# ---------------------------------------------------------------------------------------------
# A Megatron-LM-style loop: plan_model_provider, megatron-core's DDP and optimizer with the
# plan's overrides, model + optimizer state saved with dist_checkpointing and resumed.

RESUME_PLAN = (
    "0:freeze,1:lora(r=4,target=mlp),2:lora(r=4,target=all,gated),3:prefix(tokens=2,gated)"
)


def _megatron_lm_setup(tp: int, seed: int):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from layerfreeze.megatron import optimizer_overrides, plan_model_provider
    from tests.helpers.megatron import build_tiny_gpt, init_model_parallel

    init_model_parallel(tp=tp)
    provider = plan_model_provider(
        lambda pre_process=True, post_process=True: build_tiny_gpt(tp=tp, seed=seed),
        RESUME_PLAN,
    )
    model = provider(pre_process=True, post_process=True)
    _randomise_adapters(model)
    config = model.config
    ddp = DistributedDataParallel(
        config=config,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True),
        module=model,
    )
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp.no_sync
    opt_config = OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.1, clip_grad=1.0)
    optimizer = get_megatron_optimizer(
        opt_config, [ddp], config_overrides=optimizer_overrides([ddp], opt_config)
    )
    return model, ddp, optimizer


def _train_step(ddp, optimizer, tokens) -> list[float]:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from tests.helpers.megatron import position_ids

    def loss_func(out):
        loss = out.float().mean()
        return loss, {"tok": out.detach().float().clone()}

    def forward_step(it, m):
        t = next(it)
        return m(t, position_ids(t), None, labels=t.roll(-1, 1)), loss_func

    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    res = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([tokens]),
        model=ddp,
        num_microbatches=1,
        seq_length=tokens.shape[1],
        micro_batch_size=tokens.shape[0],
        forward_only=False,
    )
    optimizer.step()
    return res[0]["tok"].flatten().tolist()


def _resume_body(rank, world_size, tmp):
    from megatron.core import dist_checkpointing

    from tests.helpers.megatron import destroy_model_parallel, megatron_cpu_shim, tiny_tokens

    batches = [tiny_tokens(batch=2, seq=8, seed=s) for s in (1, 2, 3)]
    out: dict = {}
    with megatron_cpu_shim():
        model, ddp, optimizer = _megatron_lm_setup(tp=2, seed=SAVE_SEED)
        _train_step(ddp, optimizer, batches[0])
        _train_step(ddp, optimizer, batches[1])  # Adam moments are not zero
        model_sd = model.sharded_state_dict()
        dist_checkpointing.save(
            {"model": model_sd, "optimizer": optimizer.sharded_state_dict(model_sd)}, tmp
        )
        # step 3's losses check the weights; step 4's also the update of step 3 (Adam moments)
        out["continued"] = _train_step(ddp, optimizer, batches[2]) + _train_step(
            ddp, optimizer, batches[0]
        )
        destroy_model_parallel()

        model, ddp, optimizer = _megatron_lm_setup(tp=2, seed=FRESH_SEED)
        model_sd = model.sharded_state_dict()
        state = dist_checkpointing.load(
            {
                "model": model_sd,
                "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=True),
            },
            tmp,
        )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        out["resumed"] = _train_step(ddp, optimizer, batches[2]) + _train_step(
            ddp, optimizer, batches[0]
        )
        destroy_model_parallel()
    return out


def test_megatron_lm_loop_resumes_model_and_optimizer(tmp_path):
    for r in run_distributed(_resume_body, world_size=2, args=(str(tmp_path),), timeout=300):
        # the two steps after the resume: the uninterrupted run's per-token losses
        torch.testing.assert_close(
            torch.tensor(r["resumed"]), torch.tensor(r["continued"]), rtol=0, atol=1e-6
        )
