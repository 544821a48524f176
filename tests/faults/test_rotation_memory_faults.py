"""Hostile input to the rotation memory planner: ``layerfreeze plan --plan <rotation> --memory``
exits 2 with one line naming the bad key or flag."""

from __future__ import annotations

import json
import logging

import pytest

from layerfreeze.cli import main

CONFIG = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 160, "vocab_size": 500,
          "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2}


@pytest.fixture(scope="module")
def config_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama") / "config.json"
    path.write_text(json.dumps(CONFIG))
    return path


@pytest.mark.parametrize(
    ("extra", "plan_text", "needle"),
    [
        (["--steps", "10"], None, "--steps: only valid with a rotation schedule"),
        (["--steps", "0"], "{rotate: lisa, layers: 2, interval: 10}", "--steps: must be"),
        ([], "{rotate: lisa, layers: 9, interval: 10}", "--plan.layers: 9 is more than"),
        ([], "{rotate: lisa, layer: 2, interval: 10}", "--plan.layer: unknown key"),
        ([], "{rotate: badam, block: 7, interval: 5}", "--plan.block: 7 is more than"),
        ([], "{rotate: lisaa, layers: 2, interval: 10}", "--plan.rotate: unknown rotation"),
    ],
)
def test_cli_plan_rotation_errors_exit_2(config_path, tmp_path, extra, plan_text, needle):
    if plan_text is None:
        args = ["--preset", "full"]
    else:
        (tmp_path / "p.yaml").write_text(plan_text + "\n")
        args = ["--plan", str(tmp_path / "p.yaml")]
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("layerfreeze.plan").addHandler(handler)
    try:
        assert main(["plan", "--model", str(config_path), *args, *extra]) == 2
    finally:
        logging.getLogger("layerfreeze.plan").removeHandler(handler)
    assert [r.getMessage() for r in records if needle in r.getMessage()], records
