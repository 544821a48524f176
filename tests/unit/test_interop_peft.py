"""PEFT interop: plain-LoRA plans export in PEFT's format (checked against peft itself), vLLM's
constraints, and PEFT-trained adapters loading into a plan (CPU, tiny models)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from layerfreeze import apply_plan
from layerfreeze.cli import main as cli_main
from layerfreeze.export import export_merged, save_trainable
from layerfreeze.interop.peft import (
    export_peft,
    load_peft_adapter,
    peft_export_problems,
    peft_plan,
    vllm_compatibility,
)
from tests.helpers.tiny_models import build_tiny_model, tiny_batch

torch.set_num_threads(1)


def randomize_lora(model, seed: int = 3, scale: float = 0.2) -> None:
    """Trained-looking LoRA: non-zero B (A is already random)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_b"):
                p.copy_(scale * torch.randn(p.shape, generator=g))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def peft_lora_modules(peft_model) -> dict[str, int]:
    """Module name (relative to the base model) -> rank, as PEFT built them."""
    out = {}
    for name, mod in peft_model.base_model.model.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            out[name] = mod.lora_A["default"].weight.shape[0]
    return out


# ------------------------------------------------------------------------------------------------
# Export -> PeftModel.from_pretrained


EXPORT_CASES = [
    # ranks differ per layer: rank_pattern; targets differ per layer: full module names
    ("llama", "0-1:lora(r=4,alpha=8,target=mlp),2-3:lora(r=2,alpha=8,target=[q_proj,v_proj])"),
    # one target set on some layers: short names + layers_to_transform
    ("qwen2", "1-2:lora(r=4,alpha=16,target=attn)"),
    # Conv1D: fan_in_fan_out; attn.c_proj and mlp.c_proj share a short name
    ("gpt2", "1-2:lora(r=4,target=all)"),
    ("gpt2", "0:lora(r=4,target=[attn.c_proj]),3:lora(r=8,alpha=4,target=[c_fc])"),
]


@pytest.mark.parametrize("family, plan", EXPORT_CASES)
def test_export_loads_in_peft_with_equal_logits(tmp_path, family, plan):
    model = build_tiny_model(family, num_layers=4)
    ids = tiny_batch(model)
    base_logits = logits(model, ids)
    applied = apply_plan(model, plan)
    randomize_lora(model)
    ours = logits(model, ids)
    assert (ours - base_logits).abs().max() > 1e-3  # the adapters really change the model
    assert peft_export_problems(applied) == []
    out = export_peft(applied, tmp_path / "adapter", base_model_name_or_path="tiny/base")
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["base_model_name_or_path"] == "tiny/base"
    assert cfg["fan_in_fan_out"] is (family == "gpt2")

    # Expected keys, written independently from the model's own adapters.
    expected = {}
    for name, mod in model.named_modules():
        ad = mod._modules.get("lora_adapter")
        if ad is not None:
            expected[f"base_model.model.{name}.lora_A.weight"] = ad.lora_a
            expected[f"base_model.model.{name}.lora_B.weight"] = ad.lora_b
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert tensors.keys() == expected.keys()
    for k, t in tensors.items():
        assert torch.equal(t, expected[k].detach())

    peft_model = PeftModel.from_pretrained(build_tiny_model(family, num_layers=4), str(out))
    built = peft_lora_modules(peft_model)
    ours_modules = {
        n: mod.lora_adapter.r for n, mod in model.named_modules() if "lora_adapter" in mod._modules
    }
    assert built == ours_modules  # exactly our modules, with our ranks (rank_pattern)
    torch.testing.assert_close(logits(peft_model, ids), ours, rtol=1e-5, atol=1e-5)


def test_export_uses_layers_to_transform_when_exact(tmp_path):
    model = build_tiny_model("qwen2", num_layers=4)
    applied = apply_plan(model, "1-2:lora(r=4,alpha=16,target=attn)")
    cfg = json.loads((export_peft(applied, tmp_path / "a") / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert cfg["layers_to_transform"] == [1, 2] and cfg["layers_pattern"] == "layers"
    assert (cfg["r"], cfg["lora_alpha"], cfg["rank_pattern"], cfg["alpha_pattern"]) == (
        4,
        16,
        {},
        {},
    )


def test_export_rank_and_alpha_patterns(tmp_path):
    model = build_tiny_model("llama", num_layers=4)
    applied = apply_plan(
        model, "0-2:lora(r=4,alpha=8,target=[down_proj]),3:lora(r=2,alpha=3,target=[down_proj])"
    )
    cfg = json.loads((export_peft(applied, tmp_path / "a") / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"]) == (4, 8)
    assert cfg["rank_pattern"] == {"model.layers.3.mlp.down_proj": 2}
    assert cfg["alpha_pattern"] == {"model.layers.3.mlp.down_proj": 3}
    assert cfg["target_modules"] == ["down_proj"] and cfg["layers_to_transform"] is None


# ------------------------------------------------------------------------------------------------
# Plans PEFT cannot represent


@pytest.mark.parametrize(
    "plan, needles",
    [
        (
            "0-1:lora(r=4,target=mlp,gated),2-3:prefix(tokens=4,gated)",
            [
                "layers 0-1: lora(r=4,target=mlp,gated) is HLPT-gated",
                "layers 2-3: prefix(tokens=4,gated) adds",
            ],
        ),
        ("0:full,1-3:lora(r=4)", ["layers 0: full trains the base weights"]),
        (
            {"embeddings": "full", "rules": [{"layers": "0", "policy": "lora"}]},
            ["embeddings: full trains base weights"],
        ),
        ("0-3:freeze", ["installs no LoRA adapter"]),
    ],
)
def test_unrepresentable_plans_are_refused_and_merged_export_works(tmp_path, plan, needles):
    model = build_tiny_model("llama", num_layers=4)
    applied = apply_plan(model, plan)
    with pytest.raises(ValueError) as e:
        export_peft(applied, tmp_path / "peft")
    msg = str(e.value)
    assert msg.startswith("export_peft: this plan cannot be exported for PEFT:")
    for needle in needles:
        assert needle in msg
    assert "export_merged" in msg
    assert not (tmp_path / "peft").exists()
    merged = export_merged(applied, tmp_path / "merged")
    assert (merged / "config.json").is_file()


def test_merged_adapters_are_refused(tmp_path):
    applied = apply_plan(build_tiny_model("llama", num_layers=2), "all:lora(r=4)")
    applied.merge()
    assert any("call applied.unmerge()" in p for p in peft_export_problems(applied))
    applied.unmerge()
    assert peft_export_problems(applied) == []


# ------------------------------------------------------------------------------------------------
# vLLM


def test_vllm_compatibility():
    llama = lambda plan: apply_plan(build_tiny_model("llama", num_layers=4), plan)  # noqa: E731
    assert (
        vllm_compatibility(llama("0-1:lora(r=8,alpha=16),2-3:lora(r=4,alpha=8,target=mlp)")) == []
    )
    assert vllm_compatibility(llama("all:lora(r=16)"), max_lora_rank=16) == []
    (p,) = vllm_compatibility(llama("all:lora(r=16)"), max_lora_rank=8)
    assert p.startswith("rank 16 exceeds vLLM's max_lora_rank 8")
    (p,) = vllm_compatibility(llama("all:lora(r=600,target=[q_proj])"))
    assert "rank 600 exceeds vLLM's max_lora_rank 512 (the largest vLLM accepts)" in p
    (p,) = vllm_compatibility(llama("0-1:lora(r=8,alpha=16),2-3:lora(r=4,alpha=16)"))
    assert p.startswith("alpha / r differs between modules (2 on 14 modules, 4 on 14 modules)")
    with pytest.raises(ValueError, match=r"max_lora_rank: vLLM accepts one of \[1, 8, 16"):
        vllm_compatibility(llama("all:lora"), max_lora_rank=10)
    gated = vllm_compatibility(llama("all:lora(gated)"))
    assert any("HLPT-gated" in p for p in gated)
    gpt2 = apply_plan(build_tiny_model("gpt2", num_layers=2), "all:lora(r=8)")
    (p,) = vllm_compatibility(gpt2)
    assert p.startswith("model_type 'gpt2': layerfreeze does not know which modules vLLM")


def test_vllm_flag_refuses_with_reasons(tmp_path):
    applied = apply_plan(build_tiny_model("llama", num_layers=2), "all:lora(r=16)")
    with pytest.raises(ValueError) as e:
        export_peft(applied, tmp_path / "v", vllm=True, max_lora_rank=8)
    assert "cannot be exported for vLLM" in str(e.value) and "rank 16 exceeds" in str(e.value)
    assert not (tmp_path / "v").exists()
    export_peft(applied, tmp_path / "v", vllm=True, max_lora_rank=16)
    assert (tmp_path / "v" / "adapter_model.safetensors").is_file()


# ------------------------------------------------------------------------------------------------
# PEFT -> layerfreeze


def peft_trained(family, config, tmp_path, steps=2):
    """A PEFT LoRA model trained for a few AdamW steps, saved; returns (peft_model, dir)."""
    base = build_tiny_model(family, num_layers=4)
    pm = get_peft_model(base, config)
    ids = tiny_batch(base)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    pm.train()
    for _ in range(steps):
        opt.zero_grad()
        pm(ids, labels=ids).loss.backward()
        opt.step()
    pm.eval()
    out = tmp_path / "peft"
    pm.save_pretrained(str(out))
    return pm, out


@pytest.mark.parametrize(
    "family, config",
    [
        (
            "llama",
            LoraConfig(
                r=4,
                lora_alpha=8,
                target_modules=["q_proj", "v_proj", "down_proj"],
                layers_to_transform=[1, 2],
                task_type="CAUSAL_LM",
            ),
        ),
        (
            "qwen2",
            LoraConfig(
                r=4,
                lora_alpha=6,
                target_modules=["gate_proj", "up_proj"],
                use_rslora=True,
                rank_pattern={"layers.3.mlp.up_proj": 2, "layers.3.mlp.gate_proj": 2},
                alpha_pattern={"layers.3.mlp.up_proj": 5, "layers.3.mlp.gate_proj": 5},
                task_type="CAUSAL_LM",
            ),
        ),
        (
            "gpt2",
            LoraConfig(
                r=4,
                lora_alpha=16,
                target_modules=["c_attn", "c_fc"],
                fan_in_fan_out=True,
                task_type="CAUSAL_LM",
            ),
        ),
    ],
)
def test_peft_adapter_loads_and_trains_under_a_plan(tmp_path, family, config):
    pm, adapter_dir = peft_trained(family, config, tmp_path)
    ids = tiny_batch(pm.base_model.model)
    expected = logits(pm, ids)

    model = build_tiny_model(family, num_layers=4)
    base_logits = logits(model, ids)
    assert (expected - base_logits).abs().max() > 1e-4  # PEFT training changed the model
    plan = peft_plan(model, adapter_dir)
    applied = apply_plan(model, plan)
    loaded = load_peft_adapter(applied, adapter_dir)
    assert set(loaded) == set(peft_lora_modules(pm))
    torch.testing.assert_close(logits(model, ids), expected, rtol=1e-5, atol=1e-5)

    # Training continues under the plan: only the LoRA weights move, the loss goes down.
    names = applied.trainable_names()
    assert names and all(".lora_adapter.lora_" in n for n in names)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n not in names}
    start = {n: p.detach().clone() for n, p in model.named_parameters() if n in names}
    opt = torch.optim.AdamW(applied.param_groups(lr=1e-2, weight_decay=0.0))
    model.train()
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    params = dict(model.named_parameters())
    assert all(not torch.equal(params[n], start[n]) for n in names)
    assert all(torch.equal(params[n], t) for n, t in frozen.items())


def test_peft_plan_describes_the_adapter(tmp_path):
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "down_proj"],
        layers_to_transform=[1, 2],
        task_type="CAUSAL_LM",
    )
    _pm, adapter_dir = peft_trained("llama", config, tmp_path, steps=0)
    plan = peft_plan(build_tiny_model("llama", num_layers=4), adapter_dir)
    assert str(plan) == "1-2:lora(r=4,alpha=8.0,target=[mlp.down_proj,self_attn.q_proj])"


def test_round_trip_export_then_load(tmp_path):
    model = build_tiny_model("llama", num_layers=4)
    applied = apply_plan(model, "0-1:lora(r=4,alpha=8,target=mlp),3:lora(r=2,target=[k_proj])")
    randomize_lora(model)
    ids = tiny_batch(model)
    export_peft(applied, tmp_path / "a")
    fresh = build_tiny_model("llama", num_layers=4)
    load_peft_adapter(apply_plan(fresh, peft_plan(fresh, tmp_path / "a")), tmp_path / "a")
    torch.testing.assert_close(logits(fresh, ids), logits(model, ids), rtol=0, atol=0)


def test_mismatches_are_named(tmp_path):
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "down_proj"],
        layers_to_transform=[1],
        task_type="CAUSAL_LM",
    )
    _pm, d = peft_trained("llama", config, tmp_path, steps=0)

    def err(plan, **kw):
        with pytest.raises(ValueError) as e:
            load_peft_adapter(apply_plan(build_tiny_model("llama", num_layers=4), plan), d, **kw)
        return str(e.value)

    msg = err("1:lora(r=4,alpha=8,target=[q_proj])")
    assert "model.layers.1.mlp.down_proj: the plan has no LoRA adapter on this module" in msg
    msg = err("1:lora(r=8,alpha=16,target=[q_proj,down_proj])")
    # The rank mismatch names the matching rule (PEFT's r=4, lora_alpha=8 above), as
    # docs/interop.md says; once it did not, and repeated each module as an A/B shape mismatch.
    assert ("model.layers.1.self_attn.q_proj: rank 4 in the PEFT adapter, r=8 in the plan; "
            "use lora(r=4, alpha=8)") in msg
    assert "do not fit" not in msg
    msg = err("1:lora(r=4,alpha=4,target=[q_proj,down_proj])")
    assert "PEFT scales the update by 2, the plan by alpha/r = 1; use lora(r=4, alpha=8)" in msg
    msg = err("1:lora(r=4,alpha=8,target=[q_proj,down_proj],gated)")
    assert "the plan's adapter is HLPT-gated" in msg
    msg = err("1-2:lora(r=4,alpha=8,target=[q_proj,down_proj])")
    assert "has no weights for plan LoRA modules model.layers.2.mlp.down_proj" in msg
    ok = apply_plan(
        build_tiny_model("llama", num_layers=4), "1-2:lora(r=4,alpha=8,target=[q_proj,down_proj])"
    )
    assert len(load_peft_adapter(ok, d, strict=False)) == 2


@pytest.mark.parametrize("kind", ["dora", "ia3"])
def test_other_peft_types_are_refused(tmp_path, kind):
    if kind == "dora":
        config = LoraConfig(r=4, target_modules=["q_proj"], use_dora=True, task_type="CAUSAL_LM")
        needle = "use_dora=True: DoRA"
    else:
        config = IA3Config(
            target_modules=["k_proj", "down_proj"],
            feedforward_modules=["down_proj"],
            task_type="CAUSAL_LM",
        )
        needle = "peft_type is 'IA3'; only LORA adapters load"
    _pm, d = peft_trained("llama", config, tmp_path, steps=0)
    model = build_tiny_model("llama", num_layers=4)
    with pytest.raises(ValueError, match="cannot load into a layerfreeze LoRA plan") as e:
        peft_plan(model, d)
    assert needle in str(e.value)
    with pytest.raises(ValueError, match=needle.split(":")[0].replace("(", r"\(")):
        load_peft_adapter(apply_plan(model, "all:lora(r=4)"), d)


def test_missing_directory_is_named(tmp_path):
    applied = apply_plan(build_tiny_model("llama", num_layers=2), "all:lora")
    with pytest.raises(FileNotFoundError, match="adapter_config.json: not found"):
        load_peft_adapter(applied, tmp_path)


# ------------------------------------------------------------------------------------------------
# CLI


def test_cli_export_peft_and_merged(tmp_path, capsys):
    base_dir = tmp_path / "base"
    build_tiny_model("llama", num_layers=4).save_pretrained(base_dir)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    applied = apply_plan(model, "2-3:lora(r=4,alpha=8,target=mlp)")
    randomize_lora(model)
    ids = tiny_batch(model)
    want = logits(model.eval(), ids)
    save_trainable(applied, tmp_path / "trained")

    args = ["export", "--model", str(base_dir), "--adapter-dir", str(tmp_path / "trained")]
    assert cli_main([*args, "--format", "peft", "--out", str(tmp_path / "peft")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(base_dir)
    pm = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir), str(tmp_path / "peft")
    )
    torch.testing.assert_close(logits(pm.eval(), ids), want, rtol=1e-5, atol=1e-5)

    assert cli_main([*args, "--format", "merged", "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(merged, ids), want, rtol=1e-5, atol=1e-5)


def test_cli_export_user_errors_exit_2(tmp_path, capsys):
    base_dir = tmp_path / "base"
    build_tiny_model("llama", num_layers=2).save_pretrained(base_dir)
    from transformers import AutoModelForCausalLM

    applied = apply_plan(AutoModelForCausalLM.from_pretrained(base_dir), "all:lora(gated)")
    save_trainable(applied, tmp_path / "trained")
    args = ["export", "--model", str(base_dir), "--adapter-dir", str(tmp_path / "trained")]
    assert cli_main([*args, "--format", "peft", "--out", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "HLPT-gated" in captured.err
    assert not (tmp_path / "out").exists()
    assert (
        cli_main(
            [
                "export",
                "--model",
                str(tmp_path),
                "--adapter-dir",
                str(tmp_path / "trained"),
                "--format",
                "peft",
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 2
    )
    assert "no config.json" in capsys.readouterr().err
    assert (
        cli_main(
            [
                *args,
                "--format",
                "peft",
                "--vllm",
                "--max-lora-rank",
                "8",
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 2
    )
    assert not (tmp_path / "out").exists()
    assert (
        cli_main(
            [
                "export",
                "--model",
                str(base_dir),
                "--adapter-dir",
                str(tmp_path / "nope"),
                "--format",
                "merged",
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert f"--adapter-dir {tmp_path / 'nope'}: no such directory" in err


def test_docs_example_runs(repo_root):
    import re

    blocks = re.findall(
        r"```python\n(.*?)```", (repo_root / "docs" / "interop.md").read_text(), re.S
    )
    assert len(blocks) == 1
    exec(compile(blocks[0], "docs/interop.md", "exec"), {})


def test_zero3_partitioned_weights_are_refused(tmp_path):
    """A ZeRO-3 shard (empty local tensor, full shape in ds_shape) is named, not exported."""
    model = build_tiny_model("llama", num_layers=2)
    applied = apply_plan(model, "all:lora(r=4,target=[q_proj])")
    a = model.model.layers[0].self_attn.q_proj.lora_adapter.lora_a
    a.ds_shape = a.shape
    a.data = torch.empty(0)
    with pytest.raises(
        ValueError,
        match=r"export_peft: model.layers.0.self_attn.q_proj is "
        r"partitioned by ZeRO-3 .*GatheredParameters",
    ):
        export_peft(applied, tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_cli_export_rejects_vllm_options_for_merged(tmp_path, capsys):
    args = [
        "export",
        "--model",
        str(tmp_path),
        "--adapter-dir",
        str(tmp_path),
        "--format",
        "merged",
        "--vllm",
        "--out",
        str(tmp_path / "o"),
    ]
    assert cli_main(args) == 2
    assert "apply to --format peft only" in capsys.readouterr().err
