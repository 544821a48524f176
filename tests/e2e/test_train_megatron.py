"""``layerfreeze train engine=megatron`` end to end on 2 CPU ranks (real megatron-core, gloo).

The real CLI runs under torchrun through ``tests/helpers/megatron_train_entry.py`` (the CPU shim
megatron-core needs lives in the tests, never in the library):

* TP=2 with the ``hlpt_branch`` plan (tensor-parallel gated LoRA on the FFN, gated prefix on
  the attention in the branch form, the one megatron supports): trains, checkpoints, scores C-Eval and CMMLU at the checkpoint (logits gathered
  across the tensor-parallel ranks), exports a merged Hugging Face checkpoint that
  ``AutoModelForCausalLM`` loads;
* PP=2 with ``freeze_deep`` from a Hugging Face checkpoint (``model.path``): the stage holding
  the deep layer is frozen, the run completes with evaluation, and the frozen deep layer comes
  back out of the export bit-identical;
* the seeded start is the same on both engines: step-1 loss equals the DeepSpeed engine's;
* bad input (a TP size that does not divide the heads, an architecture without a mapping, a plan
  naming layers the model does not have) fails with one clear line and exit 2.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.e2e.test_train_cli import TINY_ARCH, _config, _env, _losses, _train, _write
from tests.helpers.dist import find_free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
ENTRY = "tests.helpers.megatron_train_entry"


def _mtrain(config: Path, *overrides: str, nproc: int = 2, timeout: int = 600):
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(nproc), "-m", ENTRY]
        env = _env()
    else:  # a plain process: what a user error looks like without torchrun's wrapper
        cmd = [sys.executable, "-m", ENTRY]
        env = {**_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(find_free_port())}
    cmd += ["train", "--config", str(config), *overrides]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _mconfig(out: Path, cache: Path, tp: int, pp: int, eval_data_dir: Path, **sections) -> dict:
    cfg = _config(out, cache)
    cfg.pop("deepspeed")
    cfg["engine"] = "megatron"
    cfg["megatron"] = {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp}
    cfg["model"]["attn_implementation"] = "sdpa"
    cfg["eval"] = {"benchmarks": ["ceval", "cmmlu"], "data_dir": str(eval_data_dir),
                   "subjects": {"ceval": ["computer_network"], "cmmlu": ["world_history"]},
                   "shots": 0, "max_questions": 4, "batch_size": 8, "every_steps": 2,
                   "at_end": False}
    cfg["checkpoint"] = {"every_steps": 2, "keep_last": 2}
    cfg["train"]["steps"] = 4
    cfg["logging"]["wandb_project"] = None
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def _eval_files(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "eval").glob("step_*.json"))]


def test_tp2_hlpt_trains_evaluates_and_exports(tmp_path, eval_data_dir):
    out = tmp_path / "run"
    cfg = _mconfig(out, tmp_path / "cache", 2, 1, eval_data_dir, plan={"spec": "hlpt_branch"})
    proc = _mtrain(_write(tmp_path / "run.yaml", cfg))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-8000:]
    losses = _losses(out)
    assert sorted(losses) == [1, 2, 3, 4] and all(v == v for v in losses.values())
    assert (out / "checkpoints" / "step_00000002").is_dir()
    evals = _eval_files(out)
    assert [e["step"] for e in evals] == [2, 4]  # at the checkpoint and at the end
    for bench in ("ceval", "cmmlu"):
        assert evals[0]["results"][bench]["num_questions"] == 4
    from transformers import AutoModelForCausalLM

    from layerfreeze.export import load_export

    # hlpt_branch's gated LoRA and prefix stay in the sidecar: the export is guarded (a plain load
    # refuses it, tests/faults/test_sidecar_loading.py); layerfreeze loads it with them.
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        AutoModelForCausalLM.from_pretrained(out / "export")
    model = load_export(out / "export")
    ids = torch.tensor([[1, 5, 9, 3]])
    assert torch.isfinite(model(ids).logits).all()


def test_pp2_freeze_deep_from_hf_checkpoint(tmp_path, eval_data_dir):
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_dir = tmp_path / "hf"
    arch = dict(TINY_ARCH, vocab_size=1000)
    torch.manual_seed(3)
    base = AutoModelForCausalLM.from_config(AutoConfig.for_model(**arch))
    base.save_pretrained(hf_dir)
    out = tmp_path / "run"
    cfg = _mconfig(out, tmp_path / "cache", 1, 2, eval_data_dir, plan={"spec": "freeze_deep"})
    cfg["model"] = {"path": str(hf_dir)}
    proc = _mtrain(_write(tmp_path / "run.yaml", cfg))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-8000:]
    assert sorted(_losses(out)) == [1, 2, 3, 4]
    assert [e["step"] for e in _eval_files(out)] == [2, 4]
    exported = AutoModelForCausalLM.from_pretrained(out / "export")
    before, after = base.state_dict(), exported.state_dict()
    deep = [k for k in before if k.startswith("model.layers.1.")]
    assert deep and all(torch.equal(before[k], after[k]) for k in deep)  # frozen stage untouched
    shallow = [k for k in before if k.startswith("model.layers.0.") and k.endswith("weight")]
    assert any(not torch.equal(before[k], after[k]) for k in shallow)  # trained stage moved


def test_seeded_start_matches_the_deepspeed_engine(tmp_path, eval_data_dir):
    out_m, out_d = tmp_path / "m", tmp_path / "d"
    cfg = _mconfig(out_m, tmp_path / "cache", 1, 1, eval_data_dir, plan={"spec": "full"},
                   train={"steps": 1, "grad_accum_steps": 1},
                   checkpoint={"every_steps": 0, "export_final": False})
    proc = _mtrain(_write(tmp_path / "m.yaml", cfg), nproc=1)
    assert proc.returncode == 0, proc.stderr[-8000:]
    dcfg = _config(out_d, tmp_path / "cache", plan={"spec": "full"},
                   train={"steps": 1, "grad_accum_steps": 1},
                   checkpoint={"every_steps": 0, "export_final": False},
                   logging={"wandb_project": None})
    dcfg["model"]["attn_implementation"] = "sdpa"
    assert _train(_write(tmp_path / "d.yaml", dcfg)).returncode == 0
    assert _losses(out_m)[1] == pytest.approx(_losses(out_d)[1], rel=1e-5)


def test_pp2_diagnostics_hooks_log_per_layer_series(tmp_path, eval_data_dir):
    from layerfreeze.metrics import read_jsonl

    out = tmp_path / "run"
    cfg = _mconfig(out, tmp_path / "cache", 1, 2, eval_data_dir, plan={"spec": "freeze_deep"},
                   eval={"every_steps": 0, "at_end": False},
                   checkpoint={"every_steps": 0, "export_final": False},
                   train={"grad_accum_steps": 1})
    proc = _mtrain(_write(tmp_path / "run.yaml", cfg), "diagnostics.enabled=true",
                   "diagnostics.every_steps=2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-8000:]
    records = read_jsonl(out / "metrics.jsonl")
    diag = [r for r in records if r["type"] == "diag"]
    assert [r["step"] for r in diag] == [0, 2, 4]  # the reference before any step, then every 2
    # freeze_deep on 2 layers at PP=2: layer 0 (stage 0) trains, layer 1 (stage 1) is frozen;
    # every record holds both stages' layers
    for r in diag:
        for measure in ("drift", "angular"):
            assert all(f"diag/{measure}/layers.{i}" in r for i in (0, 1)), r
        assert "diag/grad_norm/layers.0" not in r  # the engine's grad norms stand in
        assert all(0.0 < r[f"diag/angular/layers.{i}"] < 1.0 for i in (0, 1))
        assert r["diag/probe_loss"] > 0.0
    assert all(diag[0][f"diag/drift/layers.{i}"] == 0.0 for i in (0, 1))
    assert diag[2]["diag/drift/layers.0"] > 0.0  # the trained layer's output moved
    assert diag[1]["diag/update_ratio/layers.0"] > 0.0
    assert diag[1]["diag/update_ratio/layers.1"] == 0.0  # frozen: bit-identical weights
    step3 = [r for r in records if r["type"] == "train" and r["step"] == 3]
    assert step3 and "grad_norm/layers.0" in step3[0]  # logging.per_layer_every=3
    assert (out / "diagnostics.png").read_bytes()[:4] == b"\x89PNG"
    assert "grad_norm is not computed with engine: megatron" in proc.stderr


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["megatron.tensor_model_parallel_size=3"],
         "megatron.tensor_model_parallel_size: 3 must divide the model's 4 attention heads"),
        (["model.architecture.model_type=gpt2", "model.architecture.num_key_value_heads=null"],
         "supported model types: llama, mistral, qwen2"),
        (["plan.spec=0-7:full"], "out of range"),
    ],
)
def test_bad_input_one_clear_line(tmp_path, eval_data_dir, overrides, message):
    out = tmp_path / "run"
    cfg = _mconfig(out, tmp_path / "cache", 1, 1, eval_data_dir, plan={"spec": "freeze_deep"})
    proc = _mtrain(_write(tmp_path / "run.yaml", cfg), *overrides, nproc=1)
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert message in proc.stderr, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    assert not out.exists()
