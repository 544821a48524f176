"""Hostile configurations for LoRA / the HLPT gate on Transformer Engine linears (CPU).

The refusals are decided from megatron-core's ``TransformerConfig`` alone (TE is not installed
on CPU machines; the TE modules themselves are exercised by tests/gpu). Each is one line naming
the field, its value and the fix.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers.megatron import tiny_config


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (dict(fp8="hybrid"), ("TransformerConfig.fp8='hybrid'", "set fp8=None")),
        (dict(fp8="e4m3", fp8_param=True), ("TransformerConfig.fp8='e4m3'", "set fp8=None")),
        (dict(fp4="e2m1"), ("TransformerConfig.fp4='e2m1'", "set fp4=None")),
    ],
)
def test_fp8_and_fp4_are_refused_in_one_line(overrides, expected):
    from layerfreeze.engines.megatron.te import fp8_problem

    problem = fp8_problem(tiny_config(num_layers=2, **overrides))
    assert problem is not None and "\n" not in problem
    for part in expected:
        assert part in problem


def test_userbuffers_are_refused_in_one_line():
    from layerfreeze.engines.megatron.te import fp8_problem, userbuffers_problem

    config = tiny_config(num_layers=2, tp_comm_overlap=True)
    assert fp8_problem(config) is None
    problem = userbuffers_problem(config)
    assert problem is not None and "\n" not in problem
    assert "TransformerConfig.tp_comm_overlap=True" in problem
    assert "set tp_comm_overlap=False" in problem


def test_fp8_param_alone_is_refused():
    """fp8_param is refused even where a config object carries it without fp8 (megatron's own
    post-init rejects that combination; the check does not rely on it)."""
    from layerfreeze.engines.megatron.te import fp8_problem

    config = tiny_config(num_layers=2)
    config.fp8_param = True
    problem = fp8_problem(config)
    assert problem is not None and "fp8_param=True" in problem


def test_use_norm_output_for_gate_ignores_sub_blocks_without_te_linears():
    """A sub-block without linear_qkv / linear_fc1, or with plain torch linears there, is left
    as it is (no hook, gate unmarked)."""
    from layerfreeze.engines.megatron.te import reads_norm_output, use_norm_output_for_gate
    from layerfreeze.policies.gate import TokenGate

    gate = TokenGate(8)
    empty = torch.nn.Module()
    use_norm_output_for_gate(empty, gate)
    plain = torch.nn.Module()
    plain.linear_fc1 = torch.nn.Linear(8, 8)
    use_norm_output_for_gate(plain, gate)
    assert not reads_norm_output(gate)
    assert not plain.linear_fc1._forward_hooks
    assert not hasattr(plain.linear_fc1, "return_layernorm_output")
