"""Memory planner (:mod:`layerfreeze.memory`) and ``layerfreeze plan --memory``.

* Model states for ``full`` against DeepSpeed's own estimators (the pure functions that take
  parameter counts), on a Llama-2-70B config built on the meta device.
* Activations against what autograd really saves: every tensor packed by
  ``torch.autograd.graph.saved_tensors_hooks`` during a forward pass of a tiny Llama, attributed
  to the block running, deduplicated by storage, parameters left out.
* Phase switches carry each rank's partition of the still-trainable parameters' fp32 state.

The measured model states of real ZeRO-2/3 runs are in ``tests/distributed/test_memory_measured.py``.
"""

from __future__ import annotations

import json
import logging
import time

import pytest
import torch

from layerfreeze.apply import apply_plan, enable_gradient_checkpointing
from layerfreeze.cli import main
from layerfreeze.errors import ConfigError
from layerfreeze.memory import (
    ModelDims,
    TrainSetup,
    activation_bytes_per_token,
    activation_profile,
    estimate_memory,
    estimate_schedule_memory,
    head_bytes_per_token,
)

LLAMA2_70B = dict(
    model_type="llama",
    hidden_size=8192,
    num_hidden_layers=80,
    num_attention_heads=64,
    num_key_value_heads=8,
    intermediate_size=28672,
    vocab_size=32000,
)


@pytest.fixture(scope="module")
def config_70b(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama2_70b") / "config.json"
    path.write_text(json.dumps(LLAMA2_70B))
    return path


@pytest.fixture(scope="module")
def full_70b(config_70b):
    from layerfreeze.commands.plan import build_meta_model

    return apply_plan(build_meta_model(config_70b), "full")


# ---------------------------------------------------------------------------------------------
# model states vs DeepSpeed's estimators


def _states(est) -> tuple[float, float]:
    s = est.model_states
    return s.device, s.cpu


@pytest.mark.parametrize("gpus,nodes", [(4, 1), (8, 1), (8, 2), (8, 8)])
def test_full_matches_deepspeed_estimators(full_70b, gpus, nodes):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    w = gpus * nodes
    n = full_70b.num_total_params()
    assert n == 68_976_648_192  # Llama-2-70B
    largest = 32000 * 8192  # the embedding (and the LM head) is the largest module
    est = estimate_memory(full_70b, TrainSetup(world_size=w, zero_stage=2, dtype="bf16"))
    assert est.largest_module_params == largest

    # ZeRO-2: 2N on the device plus 18N/W partitioned (DeepSpeed's own breakdown of the 18).
    cpu, gpu = estimate_zero2_model_states_mem_needs(
        n, gpus, nodes, cpu_offload=False, additional_buffer_factor=1.0
    )
    assert _states(est)[0] == pytest.approx(gpu, abs=2)
    # ZeRO-2 + offload: only the bf16 weights stay on the device. DeepSpeed's host figure
    # max(4W, 16) N counts every rank's init-time fp32 copy once W > 4; at W <= 4 it is 16N.
    est = estimate_memory(full_70b, TrainSetup(world_size=w, zero_stage=2, offload=True))
    cpu, gpu = estimate_zero2_model_states_mem_needs(
        n, gpus, nodes, cpu_offload=True, additional_buffer_factor=1.0
    )
    assert _states(est)[0] == pytest.approx(gpu, abs=2)
    if w <= 4:
        assert _states(est)[1] * gpus == pytest.approx(cpu, rel=1e-9)

    # ZeRO-3: DeepSpeed counts 4 bytes per parameter of the largest layer plus 18N/W; we count
    # 20N/W: the bf16 parameter partition (2) that DeepSpeed's 18 leaves out, bf16 gradient
    # partition (2), its fp32 copy (4), fp32 master (4), Adam moments (8).
    est = estimate_memory(full_70b, TrainSetup(world_size=w, zero_stage=3))
    cpu, gpu, layer_mem = estimate_zero3_model_states_mem_needs(
        n, largest, gpus, nodes, cpu_offload=False, additional_buffer_factor=1.0
    )
    assert est.parts["zero3_gather"].device == layer_mem
    assert _states(est)[0] == pytest.approx(gpu + 2 * n / w, abs=2)
    # ZeRO-3 + offload of optimizer and parameters: the gathered layer on the device, 18N per
    # node in host memory (zero_init, as layerfreeze builds under ZeRO-3).
    est = estimate_memory(full_70b, TrainSetup(world_size=w, zero_stage=3, offload=True))
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
        n,
        largest,
        gpus,
        nodes,
        cpu_offload=True,
        cpu_offload_params=True,
        zero_init=True,
        additional_buffer_factor=1.0,
    )
    assert _states(est)[0] == pytest.approx(gpu, abs=2)
    assert _states(est)[1] * gpus == pytest.approx(cpu, rel=1e-9)


def test_frozen_parameters_add_weights_only(full_70b, config_70b):
    from layerfreeze.commands.plan import build_meta_model

    deep = apply_plan(build_meta_model(config_70b), "freeze_deep")
    setup = TrainSetup(world_size=16, zero_stage=2)
    a, b = estimate_memory(full_70b, setup), estimate_memory(deep, setup)
    assert a.parts["weights"] == b.parts["weights"]
    t = deep.num_trainable_params()
    assert b.parts["gradients"].device == pytest.approx(6 * t / 16)
    assert b.parts["optimizer"].device == pytest.approx(12 * t / 16)


# ---------------------------------------------------------------------------------------------
# activations vs what autograd saves


H, LAYERS, HEADS, KV, FFN, VOCAB, BATCH, SEQ = 64, 4, 4, 2, 172, 1000, 2, 32


def _tiny(dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=H,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV,
        intermediate_size=FFN,
        vocab_size=VOCAB,
        max_position_embeddings=128,
        attn_implementation="sdpa",
    )
    return AutoModelForCausalLM.from_config(cfg).to(dtype)


def _saved_per_token(model) -> dict[str, float]:
    """Bytes autograd keeps per token, by block (``L<i>``), before the first block (``emb``)
    and from the final norm on (``head``)."""
    params = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    where, per, seen = ["emb"], {}, set()
    hooks = [
        layer.register_forward_pre_hook(lambda *_a, i=i: where.__setitem__(0, f"L{i}"))
        for i, layer in enumerate(model.model.layers)
    ]
    hooks.append(
        model.model.norm.register_forward_pre_hook(lambda *_a: where.__setitem__(0, "head"))
    )

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params and st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            per[where[0]] = per.get(where[0], 0) + st.nbytes()
        return t

    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    for h in hooks:
        h.remove()
    return {k: v / (BATCH * SEQ) for k, v in per.items()}


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
# hlpt_branch: the estimate models the prefix's branch form (hlpt's paper form is not modelled).
@pytest.mark.parametrize("plan", ["full", "freeze_deep", "freeze_shallow", "hlpt_branch", "lora_all"])
def test_activation_estimate_matches_saved_tensors(plan, dtype):
    tdtype = torch.float32 if dtype == "fp32" else torch.bfloat16
    model = _tiny(tdtype)
    applied = apply_plan(model, plan)
    setup = TrainSetup(dtype=dtype, micro_batch=BATCH, seq_len=SEQ)
    dims = ModelDims.from_config(model.config)
    layers, parts = activation_profile(applied)
    measured = _saved_per_token(model)
    lowest = next(p.index for p in layers if p.trainable)
    for p in layers:
        est = activation_bytes_per_token(p, dims, setup)
        got = measured.get(f"L{p.index}", 0)
        if not p.in_path:  # below every trainable layer: nothing kept, nothing estimated
            assert got == 0 and est == 0, (p.index, got, est)
        elif p.index != lowest or parts["embeddings"]:
            # in the gradient path: the estimate's terms match within 5% (rope cos/sin, a few
            # gate scalars are left out)
            assert est == pytest.approx(got, rel=0.05), (p.index, got, est)
        else:  # the lowest trainable block keeps less: nothing below it needs a gradient
            assert got <= est
    head = head_bytes_per_token(layers, parts, dims, setup)
    assert head == pytest.approx(measured["head"], rel=0.02)
    est_total = estimate_memory(applied, setup, dims).parts["activations"].device
    got_total = sum(measured.values()) * BATCH * SEQ
    assert est_total == pytest.approx(got_total, rel=0.15)


@pytest.mark.parametrize("plan", ["full", "freeze_shallow"])
def test_gradient_checkpointing_keeps_block_inputs(plan):
    model = _tiny(torch.float32)
    applied = apply_plan(model, plan)
    enable_gradient_checkpointing(model)
    measured = _saved_per_token(model)
    blocks = [measured.get(f"L{i}", 0) for i in range(LAYERS)]
    est = estimate_memory(
        applied,
        TrainSetup(dtype="fp32", micro_batch=BATCH, seq_len=SEQ, gradient_checkpointing=True),
    )
    per_token = est.activation_per_token
    assert per_token["checkpointed_inputs"] == 4 * H * LAYERS
    if plan == "full":  # each checkpointed block keeps its input, h fp32 values per token
        assert blocks == [4 * H] * LAYERS
        assert per_token["head"] == pytest.approx(measured["head"], rel=0.02)
    # Frozen bottom blocks keep their inputs too. One storage (the last block's output, the
    # final norm's input) is shared and counted once, under the block or the head.
    kept = per_token["checkpointed_inputs"] + per_token["head"]
    assert kept - 4 * H <= sum(blocks) + measured["head"] <= kept + 1  # + the loss scalar
    assert per_token["recomputed_block"] > 4 * H  # one block's full set during its backward


# ---------------------------------------------------------------------------------------------
# schedules, CLI, errors


def test_phase_switch_carries_each_ranks_partition(config_70b):
    from layerfreeze.commands.plan import build_meta_model

    plans = ["full", "freeze_deep", "freeze_shallow"]
    for stage, w in ((2, 8), (3, 64), (0, 8)):
        est = estimate_schedule_memory(
            lambda: build_meta_model(config_70b), plans, TrainSetup(world_size=w, zero_stage=stage)
        )
        assert est[0].carried_params == 0 and est[0].phase_switch.cpu == 0
        # full -> freeze_deep carries everything freeze_deep trains
        assert est[1].carried_params == est[1].trainable_params
        per_rank = 12 * est[1].carried_params / (1 if stage == 0 else w)
        assert est[1].phase_switch.cpu == pytest.approx(per_rank)
        assert est[1].switch_peak.cpu >= per_rank
        # freeze_deep (bottom half + embeddings) -> freeze_shallow (top half + head): disjoint
        assert est[2].carried_params == 0


def test_cli_memory_70b_on_meta_in_seconds(config_70b, capsys):
    t0 = time.perf_counter()
    assert (
        main(
            [
                "plan",
                "--model",
                str(config_70b),
                "--preset",
                "freeze_deep",
                "--memory",
                "--world-size",
                "64",
                "--zero-stage",
                "3",
                "--micro-batch",
                "1",
                "--seq-len",
                "4096",
                "--dtype",
                "bf16",
                "--gradient-checkpointing",
                "--json",
            ]
        )
        == 0
    )
    elapsed = time.perf_counter() - t0
    assert elapsed < 60, elapsed  # seconds on a shared 2-core CPU; no weights are allocated
    data = json.loads(capsys.readouterr().out)
    mem = data["memory"]
    assert mem["setup"]["zero_stage"] == 3 and mem["setup"]["gradient_checkpointing"] is True
    n, t = data["total_params"], data["trainable_params"]
    assert mem["weights"]["device"] == pytest.approx(2 * n / 64, abs=1)
    assert mem["optimizer"]["device"] == pytest.approx(12 * t / 64, abs=1)
    tokens = 4096
    per_token = mem["activation_bytes_per_token"]
    assert mem["activations"]["device"] == tokens * (
        per_token["checkpointed_inputs"] + per_token["recomputed_block"] + per_token["head"]
    )
    assert per_token["checkpointed_inputs"] == 80 * 2 * 8192
    assert mem["peak"]["device"] >= mem["step_total"]["device"]


def test_cli_memory_table_and_schedule(config_70b, tmp_path, capsys):
    assert (
        main(
            [
                "plan",
                "--model",
                str(config_70b),
                "--preset",
                "hlpt",
                "--memory",
                "--world-size",
                "8",
                "--zero-stage",
                "2",
                "--offload",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "memory per rank: 8 rank(s), ZeRO-2, bf16" in out and "offload" in out
    assert "optimizer (fp32 master + Adam)" in out and "peak" in out
    sched = tmp_path / "s.yaml"
    sched.write_text("- {plan: full, until_step: 100}\n- {plan: freeze_deep, until_step: null}\n")
    assert (
        main(
            [
                "plan",
                "--model",
                str(config_70b),
                "--plan",
                str(sched),
                "--memory",
                "--world-size",
                "16",
                "--zero-stage",
                "3",
                "--json",
            ]
        )
        == 0
    )
    phases = json.loads(capsys.readouterr().out)["phases"]
    assert phases[0]["memory"]["carried_params"] == 0
    carried = phases[1]["memory"]["carried_params"]
    assert carried == phases[1]["trainable_params"]
    assert phases[1]["memory"]["phase_switch"]["cpu"] == pytest.approx(12 * carried / 16, abs=1)


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--world-size", "8"], "--world-size: only valid with --memory"),
        (["--memory", "--zero-stage", "0", "--offload"], "--offload: DeepSpeed offloads only"),
        (["--memory", "--zero-stage", "4"], "--zero-stage: must be 0, 1, 2 or 3, got 4"),
        (["--memory", "--dtype", "fp8"], "--dtype: must be one of fp32, bf16, fp16, got 'fp8'"),
        (["--memory", "--world-size", "0"], "--world-size: must be an integer >= 1, got 0"),
    ],
)
def test_cli_memory_errors_exit_2(config_70b, argv, needle):
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("layerfreeze.plan").addHandler(handler)
    try:
        assert main(["plan", "--model", str(config_70b), "--preset", "full", *argv]) == 2
    finally:
        logging.getLogger("layerfreeze.plan").removeHandler(handler)
    assert any(needle in r.getMessage() for r in records), [r.getMessage() for r in records]


def test_setup_checks_collect_every_problem():
    with pytest.raises(ConfigError) as e:
        TrainSetup(world_size=0, zero_stage=7, dtype="int8")
    assert len(e.value.problems) == 3
    assert TrainSetup(dtype="bfloat16").dtype == "bf16"
