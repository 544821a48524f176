"""``layerfreeze train`` with a plain-LoRA plan under ZeRO-3 on 2 ranks writes ``<out>/adapter``
(``checkpoint.export_adapter`` null: adapters only), and ``layerfreeze export --format peft``
turns it into a PEFT adapter whose logits on the base model equal the merged export's."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.e2e.test_train_cli import REPO, TINY_ARCH, _config, _env, _train, _write

pytestmark = pytest.mark.slow


def test_lora_run_exports_an_adapter_that_peft_loads(tmp_path):
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_dir = tmp_path / "base"
    torch.manual_seed(3)
    base = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(**dict(TINY_ARCH, vocab_size=1000))
    )
    base.save_pretrained(hf_dir)
    out = tmp_path / "run"
    cfg = _config(out, tmp_path / "cache", plan={"spec": "lora_all"})
    cfg["model"] = {"path": str(hf_dir)}
    cfg["deepspeed"]["zero_optimization"] = {"stage": 3, "stage3_param_persistence_threshold": 0}
    cfg["train"]["steps"] = 3
    cfg["checkpoint"] = {"every_steps": 0}
    cfg["logging"].pop("wandb_project")
    proc = _train(_write(tmp_path / "run.yaml", cfg), nproc=2)
    assert proc.returncode == 0, proc.stderr[-6000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["adapter_dir"] == str(out / "adapter")
    assert (out / "adapter" / "plan.json").is_file()
    assert "adapter (trained tensors + plan)" in proc.stderr

    peft_dir = tmp_path / "peft"
    exp = subprocess.run(
        [
            sys.executable,
            "-m",
            "layerfreeze",
            "export",
            "--model",
            str(hf_dir),
            "--adapter-dir",
            str(out / "adapter"),
            "--format",
            "peft",
            "--out",
            str(peft_dir),
        ],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert exp.returncode == 0, exp.stderr[-3000:]
    assert (peft_dir / "adapter_config.json").is_file()

    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    merged = AutoModelForCausalLM.from_pretrained(str(out / "export")).eval()
    peft = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(hf_dir)), str(peft_dir)
    ).eval()
    with torch.no_grad():
        want, got = merged(input_ids=ids).logits, peft(input_ids=ids).logits
        untouched = AutoModelForCausalLM.from_pretrained(str(hf_dir))(input_ids=ids).logits
    assert not torch.allclose(want, untouched, atol=1e-4)  # the LoRA run changed the model
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_export_adapter_true_is_refused_on_megatron(tmp_path):
    from layerfreeze.config import load_config
    from layerfreeze.engines.megatron.recipe import check_run_config
    from layerfreeze.errors import ConfigError

    cfg = _config(tmp_path / "run", tmp_path / "cache")
    cfg.pop("deepspeed")
    cfg["engine"] = "megatron"
    cfg["checkpoint"]["export_adapter"] = True
    run = load_config(_write(tmp_path / "m.yaml", cfg))
    with pytest.raises(ConfigError, match="checkpoint.export_adapter: not available with engine"):
        check_run_config(run, world_size=1)
