"""The memory planner on rotating-layer (LISA / BAdam) schedules:
:func:`layerfreeze.memory.estimate_rotation_memory` and ``layerfreeze plan --plan lisa.yaml``.

Expected values come from parameter counts of a Llama config (written out below), not from runs;
what DeepSpeed actually holds is checked in ``tests/distributed/test_rotation_memory.py``.
"""

from __future__ import annotations

import json

import pytest

from layerfreeze.cli import main
from layerfreeze.memory import TrainSetup, estimate_memory, estimate_rotation_memory
from layerfreeze.rotation import RotationConfig, interval_layers

H, F, V, L, HEADS, KV = 64, 160, 500, 6, 4, 2
CONFIG = {"model_type": "llama", "hidden_size": H, "intermediate_size": F, "vocab_size": V,
          "num_hidden_layers": L, "num_attention_heads": HEADS, "num_key_value_heads": KV,
          "tie_word_embeddings": False}
KVW = KV * H // HEADS
LAYER = H * H * 2 + 2 * H * KVW + 3 * H * F + 2 * H  # q, o, k, v, gate/up/down, two norms
EMBED = HEAD = V * H
TOTAL = EMBED + HEAD + L * LAYER + H
SETUP = TrainSetup(world_size=4, zero_stage=2, dtype="bf16", seq_len=32)


@pytest.fixture(scope="module")
def config_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama") / "config.json"
    path.write_text(json.dumps(CONFIG))
    return path


@pytest.fixture(scope="module")
def build(config_path):
    from layerfreeze.commands.plan import build_meta_model

    return lambda: build_meta_model(config_path)


def _lisa(**kw) -> RotationConfig:
    return RotationConfig.parse({"rotate": "lisa", "layers": 2, "interval": 10, "seed": 0, **kw})


@pytest.mark.parametrize("state", ["carry", "reset"])
def test_lisa_phases_hold_their_own_layers_only(build, state):
    cfg = _lisa(optimizer_state=state)
    phases = estimate_rotation_memory(build, cfg, SETUP, total_steps=60)
    samples = [interval_layers(cfg, i, L) for i in range(6)]
    merged = [s for i, s in enumerate(samples) if i == 0 or s != samples[i - 1]]
    assert [layers for layers, _ in phases] == merged
    t = EMBED + HEAD + 2 * LAYER  # embeddings + lm_head always, k = 2 layers
    previous = None
    for layers, est in phases:
        assert est.total_params == TOTAL
        assert est.trainable_params == t  # not the union of the layers sampled so far
        assert est.parts["optimizer"].device == 12 * t / 4
        assert est.parts["gradients"].device == (2 + 4) * t / 4
        overlap = len(set(layers) & set(previous or ())) * LAYER
        carried = 0 if previous is None or state == "reset" else EMBED + HEAD + overlap
        assert est.carried_params == carried
        assert est.phase_switch.cpu == 12 * carried / 4
        previous = layers


def test_lisa_peak_below_full_and_carry_differs_only_at_the_switch(build):
    from layerfreeze.apply import apply_plan

    carry = estimate_rotation_memory(build, _lisa(), SETUP, 60)
    reset = estimate_rotation_memory(build, _lisa(optimizer_state="reset"), SETUP, 60)
    full = estimate_memory(apply_plan(build(), "full"), SETUP)
    for (_, c), (_, r) in zip(carry, reset, strict=True):
        assert c.steady == r.steady
        assert r.phase_switch.cpu == 0
    assert max(e.model_states.device for _, e in carry) < full.model_states.device
    # model states drop by 18 bytes per element no longer trainable ((2 + 4) gradients + 12
    # optimizer, over 4 ranks)
    drop = full.model_states.device - carry[0][1].model_states.device
    assert drop == 18 * (TOTAL - (EMBED + HEAD + 2 * LAYER)) / 4
    assert max(e.phase_switch.cpu for _, e in carry) >= 12 * (EMBED + HEAD) / 4


def test_badam_blocks_cycle(build):
    cfg = RotationConfig.parse({"rotate": "badam", "block": 4, "interval": 5})
    phases = estimate_rotation_memory(build, cfg, SETUP, 20)
    assert [layers for layers, _ in phases] == [(0, 1, 2, 3), (4, 5), (0, 1, 2, 3), (4, 5)]
    assert [e.trainable_params for _, e in phases] == [4 * LAYER, 2 * LAYER] * 2
    assert all(e.carried_params == 0 for _, e in phases)  # disjoint blocks, nothing always


def test_cli_plan_rotation_memory(config_path, tmp_path, capsys):
    plan = tmp_path / "lisa.yaml"
    plan.write_text("{rotate: lisa, layers: 2, interval: 10, seed: 0}\n")
    argv = ["plan", "--model", str(config_path), "--plan", str(plan), "--memory",
            "--world-size", "4", "--zero-stage", "2", "--seq-len", "32", "--steps", "30"]
    assert main(argv + ["--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    want = estimate_rotation_memory(lambda: None or _meta(config_path), _lisa(), SETUP, 30)
    assert [p["trainable_params"] for p in data["phases"]] == [
        e.trainable_params for _, e in want]
    assert [p["memory"]["peak"] for p in data["phases"]] == [e.peak.to_dict() for _, e in want]
    assert data["peak"]["device"] == max(e.peak.to_dict()["device"] for _, e in want)
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert text.count("phase steps") == len(want)
    assert "peak over" in text


def _meta(path):
    from layerfreeze.commands.plan import build_meta_model

    return build_meta_model(path)
