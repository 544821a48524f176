"""Policies on real megatron-core (CPU, gloo, 2 ranks): tensor-parallel LoRA / prefix and PP stages.

The reference is the same plan on a TP=1, PP=1 model built from the same seed. Its weights,
adapters included, are moved into the TP=2 / PP=2 models by global name with megatron's own TP
split (``tests/helpers/megatron.py::load_full_weights``), so every comparison is against an
independent run of the unsplit maths.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers.dist import run_distributed

pytestmark = pytest.mark.slow

#: gated and plain LoRA on all linears / the MLP, gated and plain prefix (4 layers).
TP_PLAN = (
    "0:lora(r=4,target=all,gated),1:lora(r=4,target=mlp),"
    "2:prefix(tokens=3,gated),3:prefix(tokens=2)"
)
STEPS = 3


def _randomise_adapters(model, seed: int = 11) -> None:
    """Non-zero values for every adapter parameter (B, gates, factors), from a fixed generator."""
    from layerfreeze.apply import adapter_param_names

    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in sorted(adapter_param_names(model)):
            p = params[name]
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _train(model, applied, tokens, steps: int) -> list[float]:
    from tests.helpers.megatron import position_ids

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model(tokens, position_ids(tokens), None, labels=tokens.roll(-1, 1)).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _tp_body(rank, world_size):
    from layerfreeze import apply_plan
    from layerfreeze.engines.megatron import megatron_layout
    from tests.helpers.megatron import (
        _global_key,
        _shard,
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
    out: dict = {}
    with megatron_cpu_shim():
        # ---- reference: TP=1 (every rank runs it alone)
        init_model_parallel(tp=1)
        ref = build_tiny_gpt(seed=2)
        base_logits = forward_logits(ref, tokens)
        applied = apply_plan(ref, TP_PLAN, layout=megatron_layout(ref))
        ref_init = full_state_dict(ref)
        out["ref_identity"] = torch.equal(forward_logits(ref, tokens), base_logits)
        _randomise_adapters(ref)
        ref_full = full_state_dict(ref)
        ref_logits = forward_logits(ref, tokens)
        ref_losses = _train(ref, applied, tokens, STEPS)
        ref_trained = full_state_dict(ref)
        destroy_model_parallel()

        # ---- TP=2, same seed and plan
        init_model_parallel(tp=2)
        try:
            model = build_tiny_gpt(tp=2, seed=2)
            layout = megatron_layout(model)
            applied = apply_plan(model, TP_PLAN, layout=layout)
            trainable = set(applied.trainable_names())
            named = dict(model.named_parameters())

            def shard_of(full, name):
                return _shard(named[name], full[_global_key(model, name)])

            out["tp_identity_err"] = (
                (gather_tp_logits(forward_logits(model, tokens)) - base_logits).abs().max().item()
            )
            # adapters start as the TP=1 adapters' shards (full-size draws, then sliced)
            out["init_mismatch"] = [
                n for n in trainable if not torch.equal(named[n], shard_of(ref_init, n))
            ]
            load_full_weights(model, ref_full)
            logits = gather_tp_logits(forward_logits(model, tokens))
            out["random_err"] = (logits - ref_logits).abs().max().item()
            out["random_scale"] = (ref_logits - base_logits).abs().max().item()

            frozen = {n: p.detach().clone() for n, p in named.items() if n not in trainable}
            out["losses"], out["ref_losses"] = _train(model, applied, tokens, STEPS), ref_losses
            out["frozen_changed"] = [n for n, v in frozen.items() if not torch.equal(named[n], v)]
            out["adapter_err"] = {
                n: (named[n] - shard_of(ref_trained, n)).abs().max().item() for n in trainable
            }
            out["adapter_moved"] = min(
                (named[n] - shard_of(ref_full, n)).abs().max().item() for n in trainable
            )
            # replicated adapter parameters: identical on both TP ranks after training
            replicated = sorted(
                n for n in trainable if not getattr(named[n], "tensor_model_parallel", False)
            )
            # numpy, not tensors: results cross the process boundary by value (a tensor is
            # passed by shared-memory handle, which dies with the exiting rank)
            out["replicated"] = {n: named[n].detach().numpy().copy() for n in replicated}
            out["split"] = sorted(
                n for n in trainable if getattr(named[n], "tensor_model_parallel", False)
            )
            # merging the ungated LoRA into this rank's weight shards keeps the outputs
            before = gather_tp_logits(forward_logits(model, tokens))
            out["merged"] = sorted(applied.merge())
            out["merge_err"] = (
                (gather_tp_logits(forward_logits(model, tokens)) - before).abs().max().item()
            )
            applied.unmerge()
            out["unmerge_err"] = (
                (gather_tp_logits(forward_logits(model, tokens)) - before).abs().max().item()
            )
        finally:
            destroy_model_parallel()
    return out


def test_tp2_lora_and_prefix_match_tp1():
    r0, r1 = run_distributed(_tp_body, world_size=2)
    for r in (r0, r1):
        assert r["ref_identity"]  # TP=1: identity at init, bit-exact
        assert r["tp_identity_err"] < 1e-5  # TP=2 with fresh adapters == base model
        assert r["init_mismatch"] == []
        assert r["random_scale"] > 1e-2  # the randomised adapters really change the logits
        assert r["random_err"] < 1e-5
        torch.testing.assert_close(
            torch.tensor(r["losses"]), torch.tensor(r["ref_losses"]), rtol=1e-5, atol=1e-6
        )
        assert r["frozen_changed"] == []
        assert r["adapter_moved"] > 1e-4  # training changed every adapter parameter
        worst = max(r["adapter_err"].items(), key=lambda kv: kv[1])
        assert worst[1] < 1e-4, worst
    # what is split and what is replicated
    split = set(r0["split"])
    assert "decoder.layers.0.mlp.linear_fc1.lora_adapter.lora_b" in split
    assert "decoder.layers.0.mlp.linear_fc2.lora_adapter.lora_a" in split
    assert "decoder.layers.2.self_attention.prefix_adapter.prefix_key" in split
    assert "decoder.layers.0.mlp.linear_fc1.lora_adapter.lora_a" in r0["replicated"]
    assert "decoder.layers.0.mlp.lora_gate.weight" in r0["replicated"]
    assert "decoder.layers.2.self_attention.prefix_adapter.prefix_gate.bias" in r0["replicated"]
    for r in (r0, r1):
        assert r["merged"] == [
            "decoder.layers.1.mlp.linear_fc1",
            "decoder.layers.1.mlp.linear_fc2",
        ]  # gated adapters (layer 0) stay unmerged
        assert r["merge_err"] < 1e-4 and r["unmerge_err"] < 1e-4
    for n, v in r0["replicated"].items():
        assert (v == r1["replicated"][n]).all(), n


PP_PLAN = "0-2:lora(r=4,target=mlp,gated),3:freeze"


def _pp_body(rank, world_size, pp, full):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from layerfreeze import apply_plan
    from layerfreeze.engines.megatron import megatron_layout
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

    out: dict = {}
    with megatron_cpu_shim():
        init_model_parallel(tp=1, pp=pp)
        try:
            model = build_tiny_gpt(pp=pp, seed=4)
            layout = megatron_layout(model)
            applied = apply_plan(model, PP_PLAN, layout=layout)
            if full is None:
                _randomise_adapters(model)
            else:
                load_full_weights(model, {k: torch.from_numpy(v) for k, v in full.items()})
            out["adapted"] = sorted(
                x.index for x in layout.layers if "lora_adapter" in x.mlp.linear_fc1._modules
            )
            out["layers"] = [x.index for x in layout.layers]
            keys = list(full_state_dict(model))  # global names, in parameter order
            named = list(model.named_parameters())
            out["trainable"] = sorted(
                k for k, (n, _) in zip(keys, named, strict=True) if n in applied.trainable_names()
            )
            res = get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=iter(micro),
                model=[model],
                num_microbatches=4,
                seq_length=8,
                micro_batch_size=2,
            )
            out["losses"] = [o["loss"].item() for o in res]
            out["grads"] = {
                k: p.grad.numpy().copy()
                for k, (_, p) in zip(keys, named, strict=True)
                if p.requires_grad and p.grad is not None
            }
            out["frozen_grads"] = [
                k
                for k, (_, p) in zip(keys, named, strict=True)
                if not p.requires_grad and p.grad is not None
            ]
            if full is None:
                out["full"] = {k: v.numpy() for k, v in full_state_dict(model).items()}

            # freeze_deep on a fresh model: stage 0 (layers 0-1 + embeddings) trains, stage 1 not
            fresh = build_tiny_gpt(pp=pp, seed=4)
            fd = apply_plan(fresh, "freeze_deep", layout=megatron_layout(fresh))
            out["freeze_deep"] = len(fd.trainable_names()) == sum(1 for _ in fresh.parameters())
            out["freeze_deep_any"] = bool(fd.trainable_names())
            out["full_plan"] = len(
                apply_plan(fresh, "full", layout=megatron_layout(fresh)).trainable_names()
            ) == sum(1 for _ in fresh.parameters())
            # tied embeddings: the last stage's copy of the shared weight follows `embeddings`
            tied = build_tiny_gpt(pp=pp, seed=4, tied=True)
            tied_layout = megatron_layout(tied)
            out["tied_embeddings"] = tied_layout.embeddings
            out["tied_trainable"] = [
                n
                for n in apply_plan(tied, "freeze_deep", layout=tied_layout).trainable_names()
                if not n.startswith("decoder.")
            ]
        finally:
            destroy_model_parallel()
    return out


def test_pp2_plan_boundary_inside_a_stage():
    (ref,) = run_distributed(_pp_body, world_size=1, args=(1, None))
    first, last = run_distributed(_pp_body, world_size=2, args=(2, ref["full"]))
    assert ref["adapted"] == [0, 1, 2]
    assert (first["layers"], first["adapted"]) == ([0, 1], [0, 1])
    assert (last["layers"], last["adapted"]) == ([2, 3], [2])  # boundary inside stage 1
    assert not any(k.startswith("decoder.layers.3.") for k in last["trainable"])
    assert sorted(first["trainable"] + last["trainable"]) == ref["trainable"]
    assert all(".lora_" in k for k in ref["trainable"])
    # the real 1F1B schedule gives PP=1's losses and adapter gradients
    assert first["losses"] == [] and len(last["losses"]) == 4
    torch.testing.assert_close(
        torch.tensor(last["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=1e-6
    )
    grads = {**first["grads"], **last["grads"]}
    assert set(grads) == set(ref["grads"]) == set(ref["trainable"])
    for k, g in ref["grads"].items():
        assert abs(g).max() > 0, k
        torch.testing.assert_close(
            torch.from_numpy(grads[k]), torch.from_numpy(g), rtol=1e-4, atol=1e-6, msg=k
        )
    assert first["frozen_grads"] == last["frozen_grads"] == []
    # freeze_deep: the first stage trains everything it holds, the last stage nothing
    assert first["freeze_deep"] and not last["freeze_deep_any"]
    assert first["full_plan"] and last["full_plan"]
    assert ref["tied_embeddings"] == first["tied_embeddings"] == ["embedding.word_embeddings"]
    assert last["tied_embeddings"] == ["output_layer"]  # holds a copy of the shared weight
    assert ref["tied_trainable"] == first["tied_trainable"] == ["embedding.word_embeddings.weight"]
    assert last["tied_trainable"] == ["output_layer.weight"]  # freeze_deep trains embeddings


def _bad_body(rank, world_size):
    from layerfreeze import apply_plan
    from layerfreeze.engines.megatron import megatron_layout
    from layerfreeze.errors import ConfigError
    from tests.helpers.megatron import (
        build_tiny_gpt,
        destroy_model_parallel,
        init_model_parallel,
        megatron_cpu_shim,
    )

    errors: dict[str, str] = {}

    def attempt(key, model, plan):
        try:
            apply_plan(model, plan, layout=megatron_layout(model))
        except (ConfigError, ValueError) as e:
            errors[key] = str(e)

    with megatron_cpu_shim():
        init_model_parallel(tp=2)
        try:
            # megatron builds 1 query group under TP=2 by replicating it; prefix cannot split it
            model = build_tiny_gpt(num_layers=2, tp=2, heads=4, query_groups=1)
            attempt("groups", model, "1:prefix(tokens=2)")
            model = build_tiny_gpt(num_layers=2, tp=2)
            attempt("reparam", model, "0:prefix(tokens=2,reparam=8)")
            attempt("range", model, "0-5:lora(r=4,target=mlp)")
            errors["untouched"] = str(
                [n for n, _ in model.named_parameters() if ".lora_" in n or ".prefix_" in n]
            )
        finally:
            destroy_model_parallel()
    return errors


def test_bad_input_fails_with_clear_errors():
    errors, _ = run_distributed(_bad_body, world_size=2)
    assert "layer 1 (decoder.layers.1.self_attention)" in errors["groups"]
    assert "2 tensor-parallel ranks, but 2 does not divide 1 query groups" in errors["groups"]
    assert "reparam=8 is not supported with tensor parallelism (TP=2)" in errors["reparam"]
    assert "layer 5" in errors["range"] or "0-5" in errors["range"]
    assert errors["untouched"] == "[]"  # nothing was installed by the failed plans
