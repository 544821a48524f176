"""The benchmark's FLOP model (bench/flops.py) against hand computations on a toy Llama block.

Toy shapes: hidden 4, intermediate 6, 2 heads of dim 2, 1 KV head, vocab 10, seq 3 (causal:
(3+1)/2 = 2 keys per query on average). Per-layer matmul weights (MACs per token):
q 16, k 8, v 8, o 16, gate 24, up 24, down 24 -> 120; attention scores n = 2·2·4 = 16;
LM head n = 40. A weight matmul costs 2n forward, 2n input-gradient, 2n weight-gradient;
the scores cost 2n forward and 4n backward.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "bench" / "flops.py"
_spec = importlib.util.spec_from_file_location("layerfreeze_bench_flops", _PATH)
flops = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = flops
_spec.loader.exec_module(flops)

DIMS = flops.LlamaDims(
    hidden=4, intermediate=6, num_heads=2, num_kv_heads=1, head_dim=2, vocab=10, seq_len=3
)
FULL = flops.LayerCost.full()
FROZEN = flops.LayerCost.frozen()
MLP = ("gate_proj", "up_proj", "down_proj")


def net(layers, emb=False, head=False, tied=False):
    return flops.llama_network(
        DIMS, layers, embeddings_trainable=emb, lm_head_trainable=head, tied_embeddings=tied
    )


def test_block_matmul_sizes_match_hand_count():
    block = flops.llama_block(DIMS, FULL)
    sizes = {op.name.split(".")[-1]: op.n for op in block.ops}
    assert sizes == {
        "q_proj": 16,
        "k_proj": 8,
        "v_proj": 8,
        "o_proj": 16,
        "gate_proj": 24,
        "up_proj": 24,
        "down_proj": 24,
        "scores": 16,
    }


def test_full_training():
    f = flops.step_flops(net([FULL, FULL], emb=True, head=True))
    # forward: 2 layers x 2·(120+16) + head 2·40
    assert f.forward == 2 * 2 * (120 + 16) + 2 * 40 == 624
    # input grad everywhere (embeddings train): 2 x (2·120 + 4·16) + 2·40
    assert f.input_grad == 2 * (2 * 120 + 4 * 16) + 2 * 40 == 688
    # weight grad: all linears + head
    assert f.weight_grad == 2 * 2 * 120 + 2 * 40 == 560
    assert f.total == 1872


def test_frozen_embeddings_spare_only_the_first_qkv_input_grad():
    f = flops.step_flops(net([FULL, FULL], emb=False, head=True))
    # layer 0's q,k,v (32 MACs) have no trainable parameter upstream
    assert f.input_grad == 688 - 2 * 32
    assert f.weight_grad == 560


def test_freeze_deep_bottom_half_trains():
    f = flops.step_flops(net([FULL, FROZEN], emb=True, head=False))
    assert (f.forward, f.input_grad, f.weight_grad) == (624, 688, 240)
    full = net([FULL, FULL], emb=True, head=True)
    assert flops.time_ratio(net([FULL, FROZEN], emb=True), full) == pytest.approx(1552 / 1872)


def test_freeze_shallow_top_half_trains():
    f = flops.step_flops(net([FROZEN, FULL], emb=False, head=True))
    # layer 0: nothing; layer 1: qkv no input grad, scores 4·16, o 2·16, gate+up 2·48, down 2·24
    assert f.input_grad == (64 + 32 + 96 + 48) + 80 == 320
    assert f.weight_grad == 240 + 80
    assert f.total == 624 + 320 + 320


def test_nothing_trainable_is_forward_only():
    f = flops.step_flops(net([FROZEN, FROZEN]))
    assert (f.forward, f.input_grad, f.weight_grad) == (624, 0, 0)


def test_lora_on_mlp_of_bottom_layer():
    lora = flops.LayerCost(lora=flops.LoraCost(rank=1, targets=MLP))
    f = flops.step_flops(net([lora, FROZEN]))
    # A/B: gate 4/6, up 4/6, down 6/4 -> 30 MACs
    assert f.forward == 624 + 2 * 30
    # layer 0: gate/up B's 2·12, down + its A 2·(24+6), down's B 2·4; layer 1 all 304; head 80
    assert f.input_grad == 24 + 60 + 8 + 304 + 80 == 476
    assert f.weight_grad == 2 * 30


def test_gated_lora_adds_one_gate_per_sub_block():
    lora = flops.LayerCost(lora=flops.LoraCost(rank=1, targets=MLP, gated=True))
    f = flops.step_flops(net([lora, FROZEN]))
    # one MLP gate w·h (hidden 4) in the gate/up stage: nothing trainable upstream of it
    assert f.forward == 684 + 2 * 4
    assert f.input_grad == 476
    assert f.weight_grad == 60 + 2 * 4
    assert f.total == 1236


def test_gated_lora_on_attention_and_mlp_has_two_gates():
    lora = flops.LayerCost(lora=flops.LoraCost(rank=1, targets=("o_proj", "down_proj"), gated=True))
    f = flops.step_flops(net([lora, FROZEN]))
    # A/B: o 4/4, down 6/4 -> 18; gates (hidden 4 each) beside o (stage 2) and down (stage 4)
    assert f.forward == 624 + 2 * (18 + 8)
    # layer 0: nothing before o trains, so o, its A and the gate pass no gradient; then o's B
    # 2·4, gate/up 2·48, down 2·24 + its A 2·6 + the MLP gate 2·4, down's B 2·4; layer 1 304,
    # head 80
    assert f.input_grad == 8 + 96 + 48 + 12 + 8 + 8 + 304 + 80
    assert f.weight_grad == 2 * (18 + 8)


def test_prefix_on_top_layer():
    prefix = flops.LayerCost(prefix=flops.PrefixCost(tokens=2))
    f = flops.step_flops(net([FROZEN, prefix]))
    # prefix attention 2·P·d_attn = 2·2·4 = 16
    assert f.forward == 624 + 2 * 16
    # the prefix trains in the scores' stage: input grads start at o_proj of layer 1
    assert f.input_grad == 32 + 96 + 48 + 80
    assert f.weight_grad == 2 * 16


def test_gated_prefix_gate_is_not_upstream_of_the_scores():
    prefix = flops.LayerCost(prefix=flops.PrefixCost(tokens=2, gated=True))
    f = flops.step_flops(net([FROZEN, prefix]))
    assert f.forward == 624 + 2 * (16 + 4)
    # the gate only scales the prefix branch: the scores still need no gradient
    assert f.input_grad == 32 + 96 + 48 + 80
    assert f.weight_grad == 2 * (16 + 4)


def test_prefix_reparam_mlp_is_amortised_over_the_step():
    dims = flops.LlamaDims(4, 6, 2, 1, 2, 10, 3, batch=2)
    plain = flops.step_flops(
        flops.llama_network(
            dims,
            [flops.LayerCost(prefix=flops.PrefixCost(tokens=2))],
            embeddings_trainable=False,
            lm_head_trainable=False,
        )
    )
    mlp = flops.step_flops(
        flops.llama_network(
            dims,
            [flops.LayerCost(prefix=flops.PrefixCost(tokens=2, reparam=5))],
            embeddings_trainable=False,
            lm_head_trainable=False,
        )
    )
    # P·(hidden·m + m·2·d_kv) = 2·(4·5 + 5·2·2) = 80 MACs per step, over 2·3 tokens
    assert mlp.forward - plain.forward == pytest.approx(2 * 80 / 6)
    assert mlp.weight_grad - plain.weight_grad == pytest.approx(2 * 80 / 6)


def test_tied_head_follows_embeddings():
    tied = flops.step_flops(net([FROZEN, FROZEN], emb=True, head=False, tied=True))
    assert tied.weight_grad == 80  # the head matmul's weight gradient
    untied = flops.step_flops(net([FROZEN, FROZEN], emb=True, head=False))
    assert untied.weight_grad == 0


def test_non_causal_attends_to_all_keys():
    dims = flops.LlamaDims(4, 6, 2, 1, 2, 10, 3, causal=False)
    scores = [op for op in flops.llama_block(dims, FULL).ops if op.activation]
    assert [op.n for op in scores] == [2 * 3 * 4]


def test_scaled_and_per_block_breakdown():
    f = flops.step_flops(net([FULL, FROZEN], emb=True))
    assert sum(f.per_block.values()) == pytest.approx(f.total)
    assert f.scaled(5).total == pytest.approx(5 * f.total)
    assert f.to_dict()["total"] == f.total


def test_unknown_linear_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown linear.*c_attn"):
        flops.llama_block(DIMS, flops.LayerCost(trainable_linears=("c_attn",)), "layers.0")
