"""Hostile input to ``layerfreeze trace``'s per-layer stability and score options: one clear
line, exit 2, nothing written; and ``layer_stability`` leaves no hook or change behind."""

from __future__ import annotations

import pytest
import torch

from layerfreeze.cli import main as cli_main
from layerfreeze.diagnostics.isolated import block_reference_inputs, layer_stability
from layerfreeze.models import discover_layout
from tests.helpers.tiny_models import build_tiny_model
from tests.unit.test_diagnostics_measures import _probe
from tests.unit.test_diagnostics_trace_cli import saved  # noqa: F401 - the saved tiny model


@pytest.mark.parametrize(
    ("extra", "expect"),
    [
        (["--layer-stability-scale", "nan"], "--layer-stability-scale: must be finite and >= 0"),
        (["--layer-stability-scale", "-0.1"], "--layer-stability-scale: must be finite and >= 0"),
        (
            ["--recommend", "--budget", "0.5", "--score-weights", "lense=1"],
            "--score-weights: unknown component 'lense'. Valid: lens, sensitivity, stability",
        ),
        (
            ["--recommend", "--budget", "0.5", "--score-weights", "lens=-1"],
            "--score-weights: lens must be a finite number >= 0, got '-1'",
        ),
        (
            ["--recommend", "--budget", "0.5", "--score-weights", "lens=0,stability=0"],
            "--score-weights: every weight is 0",
        ),
        (["--score-weights", "lens=1"], "--score-weights: only used with --recommend"),
        (
            ["--zero3", "--measures", "angular,layer_stability"],
            "--measures: layer_stability need whole parameters",
        ),
    ],
    ids=[
        "scale_nan",
        "scale_negative",
        "weights_unknown",
        "weights_negative",
        "weights_zero",
        "weights_alone",
        "zero3_layer_stability",
    ],
)
def test_bad_stability_and_score_options_exit_2(saved, tmp_path, capsys, extra, expect):  # noqa: F811
    out = tmp_path / "out"
    args = [
        "trace",
        "--model",
        str(saved / "model"),
        "--probe",
        str(saved / "probe.txt"),
        "--max-tokens",
        "64",
        "--out",
        str(out),
        *extra,
    ]
    assert cli_main(args) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and expect in errors[0], errors
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_layer_stability_leaves_no_hook_after_an_error_and_refuses_bad_modes():
    model = build_tiny_model("llama", num_layers=2, hidden=32)
    layout = discover_layout(model)
    probe = _probe(model.config.vocab_size)
    with pytest.raises(ValueError, match="--layer-stability: unknown mode 'grad'"):
        layer_stability(model, layout, probe, mode="grad")
    with pytest.raises(ValueError, match="--stability-steps: must be >= 1, got 0"):
        layer_stability(model, layout, probe, mode="steps", steps=0)
    # a forward that never reaches the layer: a clear error, and the hook is gone
    stray = torch.nn.Linear(4, 4)
    with pytest.raises(RuntimeError, match="never called the layer"):
        block_reference_inputs(model, stray, probe.batches[0])
    assert not stray._forward_pre_hooks
    # an exception inside the layer's forward propagates; no hook is left on any module
    block = layout.layers[1].module

    def boom(*_a, **_k):
        raise RuntimeError("boom")

    handle = block.mlp.register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            layer_stability(model, layout, probe)
    finally:
        handle.remove()
    assert all(not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize(
    ("extra", "expect"),
    [
        (["--measures", "snr,skip"], "--probe: required by the measures skip"),
        (["--measures", "snr", "--probe", "x.txt"], "--probe: not used by --measures snr alone"),
        (["--measures", "snrr"], "--measures: unknown measure 'snrr'. Did you mean 'snr'"),
        (["--measures", "snr", "--snr-top-percent", "0"], "--snr-top-percent: must be in (0, 100]"),
        (
            ["--measures", "snr", "--recommend", "--budget", "0.5", "--score-weights", "snr=-1"],
            "--score-weights: snr must be a finite number >= 0",
        ),
        (["--measures", "snr", "--budget", "0.5"], "--budget: only used with --recommend"),
        ([], "--probe: required by the measures angular"),
    ],
    ids=[
        "snr_and_skip_no_probe",
        "snr_with_probe",
        "typo",
        "top_percent",
        "weights",
        "budget",
        "default_no_probe",
    ],
)
def test_bad_snr_options_exit_2(saved, tmp_path, capsys, extra, expect):  # noqa: F811
    out = tmp_path / "out"
    args = ["trace", "--model", str(saved / "model"), "--out", str(out), *extra]
    assert cli_main(args) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and expect in errors[0], errors
    assert not out.exists()


def test_snr_without_a_weights_file_exits_2(saved, tmp_path, capsys):  # noqa: F811
    """A checkpoint with no safetensors file (config only, or pytorch_model.bin): one line."""
    import shutil

    model = tmp_path / "model"
    model.mkdir()
    shutil.copy(saved / "model" / "config.json", model / "config.json")
    out = tmp_path / "out"
    args = ["trace", "--model", str(model), "--measures", "snr", "--out", str(out)]
    assert cli_main(args) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "no *.safetensors weight file" in errors[0], errors
    assert not out.exists()
