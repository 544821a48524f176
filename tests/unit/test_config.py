"""RunConfig / load_config: strict schema, overrides, checks, docs; the recipe's pure helpers."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import yaml

from layerfreeze.config import (
    CheckpointConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    PlanConfig,
    RunConfig,
    TrainConfig,
    load_config,
)
from layerfreeze.errors import ConfigError
from layerfreeze.utils.schema import field_docs, to_dict

TINY_ARCH = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 4,
             "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128}


def _write(tmp_path, data: dict, name: str = "run.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def _minimal(**extra) -> dict:
    data = {"model": {"architecture": dict(TINY_ARCH)}, "plan": {"spec": "freeze_deep"}}
    data.update(extra)
    return data


def test_load_minimal_config_fills_defaults_and_round_trips(tmp_path):
    cfg = load_config(_write(tmp_path, _minimal()))
    assert isinstance(cfg, RunConfig)
    assert cfg.model.architecture["num_hidden_layers"] == 4
    assert cfg.train == TrainConfig() and cfg.optim == OptimConfig()
    assert str(cfg.checkpoint_dir) == "runs/default/checkpoints"
    assert str(cfg.export_dir) == "runs/default/export"
    # to_dict -> YAML -> load gives the same config (what `validate` prints is loadable)
    again = load_config(_write(tmp_path, to_dict(cfg), "again.yaml"))
    assert again == cfg


def test_overrides_apply_with_yaml_types(tmp_path):
    cfg = load_config(
        _write(tmp_path, _minimal()),
        ["train.steps=7", "optim.lr=1e-4", "optim.betas=[0.8, 0.9]", "checkpoint.resume=none",
         "deepspeed.zero_optimization.stage=2", "logging.wandb_project=proj"],
    )
    assert cfg.train.steps == 7
    assert cfg.optim.lr == pytest.approx(1e-4)
    assert cfg.optim.betas == [0.8, 0.9]
    assert cfg.checkpoint.resume == "none"
    assert cfg.deepspeed == {"zero_optimization": {"stage": 2}}  # opaque mapping below 'deepspeed'
    assert cfg.logging.wandb_project == "proj"


def test_unknown_keys_get_did_you_mean_in_file_and_override(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, _minimal(train={"stpes": 3})))
    assert "train.stpes: unknown key. Did you mean 'steps'?" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, _minimal()), ["optim.lrr=1"])
    assert "unknown key 'lrr' in 'optim'. Did you mean 'lr'?" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, _minimal(trian={})))
    assert "Did you mean 'train'?" in str(e.value)


def test_every_problem_is_reported_at_once(tmp_path):
    data = _minimal(train={"steps": 0, "micro_batch_size": -1, "stpes": 1},
                    optim={"lr": -1.0, "eps": 0.0, "betas": [0.9, 1.5]})
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, data))
    msg = str(e.value)
    # unknown keys everywhere, and every check of a section, in one error
    assert "train.stpes: unknown key" in msg, msg
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, _minimal(optim={"lr": -1.0, "eps": 0.0, "betas": [0.9, 1.5]})))
    msg = str(e.value)
    for part in ("optim.lr: must be a finite number > 0, got -1.0", "optim.eps: must be > 0, got 0.0",
                 "optim.betas: must be two numbers in [0, 1), got [0.9, 1.5]"):
        assert part in msg, msg
    assert len(e.value.problems) == 3


@pytest.mark.parametrize(
    "model, needle",
    [
        ({}, "set exactly one of model.path"),
        ({"path": "x", "architecture": TINY_ARCH}, "set exactly one of model.path"),
        ({"architecture": {"hidden_size": 8}}, "model.architecture.model_type: required"),
        ({"architecture": TINY_ARCH, "dtype": "float8"}, "model.dtype: must be one of"),
    ],
)
def test_model_section_checks(tmp_path, model, needle):
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, {"model": model, "plan": {"spec": "full"}}))
    assert needle in str(e.value)


def test_plan_section_needs_exactly_one_form_and_valid_syntax(tmp_path):
    with pytest.raises(ConfigError, match="set exactly one of plan.spec"):
        load_config(_write(tmp_path, {"model": {"architecture": TINY_ARCH}}))
    with pytest.raises(ConfigError, match="plan.spec"):
        load_config(_write(tmp_path, _minimal(plan={"spec": "freeze_depp"})))
    sched = [{"plan": "full", "until_step": 2}, {"plan": "freeze_deep", "until_step": None}]
    cfg = load_config(_write(tmp_path, _minimal(plan={"schedule": sched})))
    assert cfg.plan.schedule == sched and cfg.plan.spec is None
    with pytest.raises(ConfigError, match="plan.schedule"):
        load_config(_write(tmp_path, _minimal(plan={"schedule": [{"plan": "full", "until_step": 5},
                                                                 {"plan": "full", "until_step": 3}]})))


def test_non_finite_and_out_of_range_values_rejected():
    with pytest.raises(ConfigError, match="optim.lr"):
        OptimConfig(lr=math.inf)
    with pytest.raises(ConfigError, match="optim.betas"):
        OptimConfig(betas=[0.9])
    with pytest.raises(ConfigError, match="optim.min_lr_ratio"):
        OptimConfig(min_lr_ratio=1.5)
    with pytest.raises(ConfigError, match="checkpoint.keep_last"):
        CheckpointConfig(keep_last=0)
    with pytest.raises(ConfigError, match="logging.jsonl"):
        LoggingConfig(jsonl="/abs/metrics.jsonl")
    with pytest.raises(ConfigError, match="train.nan_tolerance"):
        TrainConfig(nan_tolerance=0)


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_config(listy)


def test_deepspeed_json_path_and_owned_keys(tmp_path):
    from layerfreeze.engines.deepspeed_config import build_deepspeed_config

    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 4}))
    cfg = load_config(_write(tmp_path, _minimal(deepspeed=str(ds))),
                      ["train.micro_batch_size=4", "train.grad_accum_steps=3", "optim.lr=0.01"])
    out, replaced = build_deepspeed_config(cfg, world_size=2)
    assert replaced == []  # the file agrees with the run config
    assert out["zero_optimization"] == {"stage": 2}
    assert out["train_batch_size"] == 4 * 3 * 2
    assert out["gradient_accumulation_steps"] == 3
    assert out["optimizer"] == {"type": "AdamW", "params": {
        "torch_adam": True, "lr": 0.01, "betas": cfg.optim.betas, "eps": cfg.optim.eps,
        "weight_decay": cfg.optim.weight_decay}}
    assert out["gradient_clipping"] == cfg.optim.max_grad_norm
    with pytest.raises(ConfigError, match="deepspeed: file not found"):
        build_deepspeed_config(load_config(_write(tmp_path, _minimal(deepspeed=str(tmp_path / "no.json")))), 1)
    with pytest.raises(ConfigError, match="path to a .json file"):
        load_config(_write(tmp_path, _minimal(deepspeed="zero2")))


def test_shared_deepspeed_file_values_are_replaced_and_reported(tmp_path):
    from layerfreeze.engines.deepspeed_config import build_deepspeed_config

    shared = {
        "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "weight_decay": 0.1, "torch_adam": True}},
        "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_num_steps": 10}},
        "zero_optimization": {"stage": 2},
    }
    cfg = load_config(_write(tmp_path, _minimal(deepspeed=shared)),
                      ["train.micro_batch_size=2", "optim.lr=0.01", "optim.weight_decay=0.1"])
    out, replaced = build_deepspeed_config(cfg, world_size=1)
    assert "scheduler" not in out
    assert out["train_micro_batch_size_per_gpu"] == 2 and out["optimizer"]["params"]["lr"] == 0.01
    assert out["zero_optimization"] == {"stage": 2} and out["optimizer"]["params"]["torch_adam"]
    assert len(replaced) == 3, replaced  # micro batch, lr, scheduler (weight decay agrees)
    assert "deepspeed.train_micro_batch_size_per_gpu: 4 replaced by train.micro_batch_size = 2" in replaced
    assert "deepspeed.optimizer.params.lr: 0.0003 replaced by optim.lr = 0.01" in replaced
    assert any(r.startswith("deepspeed.scheduler:") and "dropped" in r for r in replaced)


@pytest.mark.parametrize(
    "cls", [RunConfig, ModelConfig, PlanConfig, OptimConfig, TrainConfig, LoggingConfig, CheckpointConfig]
)
def test_every_field_has_a_docstring(cls):
    docs = field_docs(cls)
    missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
    assert not missing, f"{cls.__name__} fields without a docstring: {missing}"


def test_schema_description_lists_every_section_with_docs():
    from layerfreeze.train import describe_schema

    text = describe_schema(RunConfig)
    for section in ("model", "tokenizer", "data", "plan", "optim", "train", "logging", "checkpoint", "eval"):
        assert f"[{section}]" in text
    assert "  train.nan_tolerance: int = 5" in text
    assert "consecutive bad steps" in text


def test_lr_factor_matches_closed_forms():
    from layerfreeze.train import lr_factor

    o = OptimConfig(warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    total = 24
    assert [lr_factor(o, total, s) for s in range(4)] == [0.0, 0.25, 0.5, 0.75]
    assert lr_factor(o, total, 4) == pytest.approx(1.0)
    # halfway through the decay span (20 steps) cosine is at the midpoint of [0.1, 1]
    assert lr_factor(o, total, 14) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(o, total, 24) == pytest.approx(0.1)
    lin = OptimConfig(warmup_steps=0, schedule="linear", min_lr_ratio=0.0)
    assert lr_factor(lin, 10, 5) == pytest.approx(0.5)
    assert lr_factor(OptimConfig(schedule="constant"), 10, 9) == 1.0


def test_plan_resolved_against_model_layer_count(tmp_path):
    from layerfreeze.train import model_num_layers, resolve_run_plans

    cfg = load_config(_write(tmp_path, _minimal()))
    assert model_num_layers(cfg.model) == 4
    tables = resolve_run_plans(cfg)
    assert tables and "4-layer model" in tables[0]
    cfg = load_config(_write(tmp_path, _minimal(plan={"spec": "0-5:full"})))
    with pytest.raises(ConfigError, match="out of range for a 4-layer model|4-layer"):
        resolve_run_plans(cfg)


def test_model_path_without_checkpoint_is_a_clear_error(tmp_path):
    from layerfreeze.train import model_num_layers

    with pytest.raises(ConfigError, match="model.path: no Hugging Face checkpoint"):
        model_num_layers(ModelConfig(path=str(tmp_path / "nothing")))


def test_redact_secrets_hides_keys_and_tokens():
    from layerfreeze.metrics import redact_secrets

    cfg = {"logging": {"wandb_project": "p"}, "deepspeed": {"wandb": {"api_key": "SECRET1"}},
           "x": [{"hf_token": "SECRET2"}], "password": "SECRET3"}
    out = json.dumps(redact_secrets(cfg))
    assert "SECRET" not in out and out.count("<redacted>") == 3 and '"p"' in out


def test_validate_command_prints_config_plan_and_schema(tmp_path, capsys):
    from layerfreeze.cli import main

    config = _write(tmp_path, _minimal())
    assert main(["validate", "--config", str(config), "train.steps=9"]) == 0
    out = capsys.readouterr().out
    printed = yaml.safe_load(out.split("phase 0")[0])
    assert printed["train"]["steps"] == 9 and printed["plan"]["spec"] == "freeze_deep"
    assert "phase 0 (" in out and "4-layer model" in out and "freeze" in out
    assert out.rstrip().endswith(f"OK: {config} is valid.")

    assert main(["validate", "--schema"]) == 0
    schema = capsys.readouterr().out
    assert "  model.dtype: 'float32' | 'bfloat16' | 'float16' = 'float32'" in schema
    assert "[eval]" in schema


def test_validate_command_fails_with_exit_2_and_the_problem(tmp_path):
    import logging

    from layerfreeze.cli import main

    messages: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    lf_logger = logging.getLogger("layerfreeze")
    handler = _Collect(level=logging.ERROR)
    lf_logger.addHandler(handler)
    try:
        config = _write(tmp_path, _minimal(plan={"spec": "0-9:full"}))
        assert main(["validate", "--config", str(config)]) == 2
        assert main(["validate", "--config", str(config), "optim.lrr=1"]) == 2
    finally:
        lf_logger.removeHandler(handler)
    text = "\n".join(messages)
    assert "4-layer model" in text and "Did you mean 'lr'?" in text


def test_override_into_a_deepspeed_json_file_changes_only_that_key(tmp_path):
    """`deepspeed.bf16.enabled=true` on a config whose deepspeed is a JSON path once replaced
    the whole DeepSpeed config with {bf16: {enabled: true}} (ZeRO stage and clipping gone)."""
    ds = {"zero_optimization": {"stage": 2, "overlap_comm": False}, "gradient_clipping": 0.5}
    (tmp_path / "ds.json").write_text(json.dumps(ds), encoding="utf-8")
    path = _write(tmp_path, _minimal(deepspeed=str(tmp_path / "ds.json")))
    cfg = load_config(path, ["deepspeed.bf16.enabled=true", "deepspeed.zero_optimization.stage=3"])
    assert cfg.deepspeed == {"zero_optimization": {"stage": 3, "overlap_comm": False},
                             "gradient_clipping": 0.5, "bf16": {"enabled": True}}
    assert load_config(path).deepspeed == str(tmp_path / "ds.json")  # no override: the path


def test_override_below_a_non_mapping_value_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"override plan\.spec\.r: plan\.spec is 'freeze_deep', "
                       r"not a mapping, so it has no key 'r'\. Set plan\.spec as a whole"):
        load_config(_write(tmp_path, _minimal()), ["plan.spec.r=3"])
