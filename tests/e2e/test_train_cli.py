"""The real ``layerfreeze train`` CLI end to end on a tiny model (subprocesses, CPU, gloo).

* 2 DeepSpeed ranks (torchrun, ZeRO-2, gradient accumulation 2, a two-phase plan schedule
  switching after step 4): train -> checkpoints -> C-Eval/CMMLU evaluation at the checkpoint and
  the end -> offline wandb -> merged HF export that ``AutoModelForCausalLM`` loads, with frozen
  layers bit-identical to the seeded initial model; then a resume from the step-3 checkpoint
  (phase 0) crosses the boundary and reproduces the straight run's losses.
* NaN/Inf stop: a real non-finite loss (negative RMSNorm epsilon makes the norm's rsqrt NaN) is
  skipped and counted; after ``train.nan_tolerance`` bad steps in a row the run exits 3 and
  names the last good checkpoint.
* Bad input: each a clear error (exit 2) naming the problem, and no output directory left.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers.dist import find_free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
FAKE_SECRET = "lf-test-secret-0123456789abcdef"  # must never appear in any output file

TINY_ARCH = {
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}


def _config(out_dir: Path, cache_dir: Path, **sections) -> dict:
    cfg = {
        "model": {"architecture": dict(TINY_ARCH), "attn_implementation": "eager"},
        "tokenizer": {"vocab_size": 1000},
        "data": {"paths": ["@bundled"], "seq_len": 32, "cache_dir": str(cache_dir)},
        "plan": {"spec": "freeze_deep"},
        "deepspeed": {
            "zero_optimization": {"stage": 2},
            "optimizer": {"type": "AdamW", "params": {"torch_adam": True}},
            "steps_per_print": 1000000,
        },
        "optim": {"lr": 3e-3, "warmup_steps": 1, "schedule": "cosine"},
        "train": {"steps": 6, "micro_batch_size": 2, "grad_accum_steps": 2, "seed": 7,
                  "num_threads": 1},
        "logging": {"out_dir": str(out_dir), "log_every": 1, "per_layer_every": 3,
                    "progress": "none", "wandb_project": "lf-e2e", "wandb_mode": "offline"},
        "checkpoint": {"every_steps": 3, "keep_last": 2},
        "eval": {"every_steps": 0, "at_end": False},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def _write(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def _env() -> dict:
    env = dict(os.environ)
    env.update({
        "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore",
        "WANDB_API_KEY": FAKE_SECRET, "PYTHONPATH": str(REPO),
    })
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _train_cmd(config: Path, *overrides: str, nproc: int = 1) -> tuple[list[str], dict]:
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(nproc), "-m", "layerfreeze"]
        env = _env()
    else:
        cmd = [sys.executable, "-m", "layerfreeze"]
        # a world of one still opens a rendezvous port: a free one, so parallel runs don't clash
        env = {**_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(find_free_port())}
    return cmd + ["train", "--config", str(config), *overrides], env


def _train(config: Path, *overrides: str, nproc: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd, env = _train_cmd(config, *overrides, nproc=nproc)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _losses(out_dir: Path) -> dict[int, float]:
    from layerfreeze.metrics import read_jsonl

    return {r["step"]: r["loss"] for r in read_jsonl(out_dir / "metrics.jsonl") if r["type"] == "train"}


def _assert_no_secret(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file() and path.stat().st_size < 50_000_000:
            assert FAKE_SECRET.encode() not in path.read_bytes(), f"secret leaked into {path}"


# ---------------------------------------------------------------------------------------------
# train -> checkpoint -> eval -> export (2 ranks), then resume == straight
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, eval_data_dir):
    tmp = tmp_path_factory.mktemp("e2e_straight")
    out = tmp / "run"
    # Two phases: freeze_deep (layer 0 + embeddings train) for steps 1-4, then only layer 0
    # (embeddings frozen): the engine is rebuilt at the boundary, Adam state carried over.
    cfg = _config(
        out, tmp / "cache",
        plan={"spec": None, "schedule": [{"plan": "freeze_deep", "until_step": 4},
                                         {"plan": "0:full", "until_step": None}]},
        eval={"benchmarks": ["ceval", "cmmlu"], "data_dir": str(eval_data_dir),
              "subjects": {"ceval": ["computer_network"], "cmmlu": ["world_history"]},
              "shots": 0, "max_questions": 4, "batch_size": 8, "at_end": True},
    )
    config = _write(tmp / "run.yaml", cfg)
    proc = _train(config, nproc=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return tmp, out, config, proc


def test_straight_run_writes_everything(straight_run):
    tmp, out, config, proc = straight_run
    losses = _losses(out)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert all(isinstance(v, float) for v in losses.values())
    assert losses[6] < losses[1], losses  # it learns
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    plans = [r for r in records if r["type"] == "plan"]
    assert [p["phase"] for p in plans] == [0, 1]  # at the start and at the switch
    for plan in plans:
        rows = {r["name"]: r for r in plan["rows"]}
        assert rows["layers.0"]["trainable_params"] == rows["layers.0"]["total_params"] > 0
        assert rows["layers.1"]["trainable_params"] == 0
    emb = [{r["name"]: r for r in p["rows"]}["embeddings"]["trainable_params"] for p in plans]
    assert emb[0] > 0 and emb[1] == 0
    phases = {r["step"]: r["phase"] for r in records if r["type"] == "train"}
    assert phases == {1: 0, 2: 0, 3: 0, 4: 0, 5: 1, 6: 1}
    step3 = next(r for r in records if r["type"] == "train" and r["step"] == 3)
    assert step3["grad_norm/layers.0"] > 0 and step3["grad_norm/embeddings"] > 0
    assert "grad_norm/layers.1" not in step3
    step6 = next(r for r in records if r["type"] == "train" and r["step"] == 6)
    assert step6["grad_norm/layers.0"] > 0 and "grad_norm/embeddings" not in step6
    evals = [r for r in records if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [3, 6]  # at the checkpoint and at the end
    assert evals[0]["eval/ceval/num_questions"] == 4 and evals[0]["eval/cmmlu/num_questions"] == 4

    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert ckpts == ["step_00000003", "step_00000006"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    for name in ("step_00000003.json", "step_00000006.json", "summary.json", "accuracy.png"):
        assert (out / "eval" / name).is_file(), name
    assert list((out / "wandb").glob("offline-run-*")), "no offline wandb run"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps_done"] == 6 and summary["export_dir"] == str(out / "export")
    # freeze_deep trains layers whole: no adapter by default (checkpoint.export_adapter: null)
    assert summary["adapter_dir"] is None and not (out / "adapter").exists()
    assert "run summary:" in proc.stderr and str(out / "metrics.jsonl") in proc.stderr
    _assert_no_secret(out)


def test_export_loads_and_frozen_layers_are_untouched(straight_run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from layerfreeze.config import load_config
    from layerfreeze.train import build_model

    tmp, out, config, _ = straight_run
    exported = AutoModelForCausalLM.from_pretrained(str(out / "export"))
    tok = AutoTokenizer.from_pretrained(str(out / "export"))
    ids = torch.tensor([tok("你好 hello world")["input_ids"]])
    assert torch.isfinite(exported(input_ids=ids).logits).all()

    cfg = load_config(config)
    initial = build_model(cfg.model, len(tok), cfg.train.seed)  # same seed -> the run's init
    got, init = exported.state_dict(), initial.state_dict()
    frozen = [k for k in init if k.startswith("model.layers.1.") or k.startswith("lm_head")
              or k == "model.norm.weight"]
    # layer 0 trained in both phases, the embeddings in the first one only
    trained = [k for k in init if k.startswith("model.layers.0.") and k.endswith(".weight")]
    trained.append("model.embed_tokens.weight")
    assert frozen and trained
    for k in frozen:
        assert torch.equal(got[k], init[k]), f"frozen {k} changed"
    for k in trained:
        assert not torch.equal(got[k], init[k]), f"trained {k} did not change"


def test_resume_reproduces_straight_losses_across_the_phase_boundary(straight_run):
    tmp, out, config, _ = straight_run
    out_b = tmp / "resumed"
    ckpt = out / "checkpoints" / "step_00000003"
    proc = _train(config, f"logging.out_dir={out_b}", f"checkpoint.resume={ckpt}",
                  "eval.at_end=false", "checkpoint.export_final=false", nproc=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    straight, resumed = _losses(out), _losses(out_b)
    assert sorted(resumed) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-6, abs=1e-7), (step, straight, resumed)


# ---------------------------------------------------------------------------------------------
# a resume follows the run config's learning-rate schedule (and says what differs)
# ---------------------------------------------------------------------------------------------


def _lrs(out_dir: Path) -> dict[int, float]:
    from layerfreeze.metrics import read_jsonl

    return {r["step"]: r["lr"] for r in read_jsonl(out_dir / "metrics.jsonl") if r["type"] == "train"}


def test_resume_follows_the_run_configs_lr_schedule(tmp_path):
    from layerfreeze.config import OptimConfig
    from layerfreeze.optim import lr_factor

    # NaN recovery: "resume from it with a lower optim.lr" must really lower it.
    out = tmp_path / "nan_recovery"
    config = _write(tmp_path / "a.yaml", _config(
        out, tmp_path / "cache", optim={"lr": 1e-3, "warmup_steps": 0, "schedule": "constant"},
        train={"steps": 2}, checkpoint={"every_steps": 0}, logging={"wandb_project": None},
    ))
    first = _train(config, "checkpoint.export_final=false")
    assert first.returncode == 0, first.stderr[-6000:]
    assert _lrs(out) == {1: pytest.approx(1e-3), 2: pytest.approx(1e-3)}
    proc = _train(config, "optim.lr=1e-5", "train.steps=4", "checkpoint.export_final=false")
    assert proc.returncode == 0, proc.stderr[-6000:]
    lrs = _lrs(out)
    assert lrs[3] == pytest.approx(1e-5) and lrs[4] == pytest.approx(1e-5), lrs
    assert "resume: optim.lr is 1e-05 in this run config and 0.001 in the checkpoint" in proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert any("optim.lr" in n for n in summary["notes"])

    # Extending a cosine run from 4 to 8 steps: steps 5-8 follow the 8-step cosine.
    out = tmp_path / "extend"
    optim = {"lr": 1e-3, "warmup_steps": 0, "schedule": "cosine", "min_lr_ratio": 0.1}
    config = _write(tmp_path / "b.yaml", _config(
        out, tmp_path / "cache", optim=optim, train={"steps": 4},
        checkpoint={"every_steps": 0}, logging={"wandb_project": None},
    ))
    assert _train(config, "checkpoint.export_final=false").returncode == 0
    proc = _train(config, "train.steps=8", "checkpoint.export_final=false")
    assert proc.returncode == 0, proc.stderr[-6000:]
    lrs = _lrs(out)
    o = OptimConfig(**optim)
    for step in range(5, 9):  # metrics step s used the lr of 0-based step s - 1
        assert lrs[step] == pytest.approx(1e-3 * lr_factor(o, 8, step - 1), rel=1e-9), (step, lrs)
    assert lrs[8] > 1e-3 * o.min_lr_ratio * 1.01  # not stuck at the floor of the 4-step schedule
    assert "resume: train.steps is 8 in this run config and 4 in the checkpoint" in proc.stderr


# ---------------------------------------------------------------------------------------------
# sensitivity hooks during training (diagnostics section), 2 ranks, ZeRO-3
# ---------------------------------------------------------------------------------------------


def test_diagnostics_hooks_log_per_layer_series_under_zero3(tmp_path):
    from layerfreeze.metrics import read_jsonl

    out = tmp_path / "run"
    cfg = _config(out, tmp_path / "cache", train={"steps": 4, "grad_accum_steps": 1},
                  checkpoint={"every_steps": 0, "export_final": False},
                  logging={"wandb_project": None},
                  diagnostics={"enabled": True, "every_steps": 2, "probe_sequences": 2})
    cfg["deepspeed"]["zero_optimization"] = {"stage": 3}
    proc = _train(_write(tmp_path / "run.yaml", cfg), nproc=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    diag = [r for r in read_jsonl(out / "metrics.jsonl") if r["type"] == "diag"]
    assert [r["step"] for r in diag] == [0, 2, 4]  # the reference before any step, then every 2
    layers = (0, 1)  # freeze_deep on 2 layers: layer 0 trains, layer 1 is frozen
    for r in diag:
        for measure in ("drift", "angular"):
            assert all(f"diag/{measure}/layers.{i}" in r for i in layers), r
        assert "diag/grad_norm/layers.0" not in r  # ZeRO-3: the engine's grad norms stand in
        assert 0.0 < r["diag/angular/layers.0"] < 1.0
    assert all(diag[0][f"diag/drift/layers.{i}"] == 0.0 for i in layers)
    assert diag[2]["diag/drift/layers.0"] > 0.0  # the trained layer's output moved
    assert diag[1]["diag/update_ratio/layers.0"] > 0.0
    assert diag[1]["diag/update_ratio/layers.1"] == 0.0  # frozen: bit-identical weights
    assert (out / "diagnostics.png").read_bytes()[:4] == b"\x89PNG"
    assert "grad_norm needs whole parameters" in proc.stderr


# ---------------------------------------------------------------------------------------------
# NaN / Inf: skip, count, stop after K in a row, name the last good checkpoint
# ---------------------------------------------------------------------------------------------


def test_nan_losses_stop_the_run_and_name_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    config = _write(tmp_path / "run.yaml", _config(out, tmp_path / "cache",
                                                   train={"steps": 2, "nan_tolerance": 2},
                                                   checkpoint={"every_steps": 0},
                                                   logging={"wandb_project": None}))
    first = _train(config, "checkpoint.export_final=false")
    assert first.returncode == 0, first.stderr[-6000:]
    good = out / "checkpoints" / "step_00000002"
    assert good.is_dir()
    # Continue the same run for 4 more steps with a model whose RMSNorm epsilon is negative:
    # mean(x^2) + eps < 0, so rsqrt is NaN and so is every loss from step 3 on.
    # (a change a resume refuses unless named in checkpoint.allow_model_change)
    refused = _train(config, "train.steps=6", "model.architecture.rms_norm_eps=-1.0")
    assert refused.returncode == 2, refused.stderr[-6000:]
    assert "model architecture.rms_norm_eps: 1e-06 in the checkpoint, -1.0 in this run" in (
        refused.stderr
    )
    proc = _train(
        config, "train.steps=6", "model.architecture.rms_norm_eps=-1.0",
        "checkpoint.allow_model_change=[rms_norm_eps]",
    )
    assert proc.returncode == 3, proc.stderr[-6000:]
    err = proc.stderr
    assert "changed model config (checkpoint.allow_model_change): model.rms_norm_eps" in err
    assert "training stopped at step 4" in err, err[-3000:]
    assert "NaN/Inf for 2 consecutive steps (train.nan_tolerance=2" in err
    assert f"The last good checkpoint is {good} (step 2)" in err
    assert f"checkpoint.resume={good}" in err
    from layerfreeze.checkpoint import list_checkpoints
    from layerfreeze.metrics import read_jsonl

    assert [c.step for c in list_checkpoints(out / "checkpoints")] == [2]  # none saved while bad
    bad = [r for r in read_jsonl(out / "metrics.jsonl") if r.get("skipped")]
    assert [r["step"] for r in bad] == [3, 4] and bad[-1]["skipped_steps"] == 2
    assert all(r["loss"] == "nan" for r in bad)


# ---------------------------------------------------------------------------------------------
# bad input: clear error, exit 2, nothing left behind
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from layerfreeze.data import default_corpus_files, train_tokenizer

    out = tmp_path_factory.mktemp("e2e_tok") / "tok"
    train_tokenizer(default_corpus_files(), out, vocab_size=1000)
    return out


def test_bad_inputs_fail_cleanly(tmp_path, tokenizer_dir):
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    short = tmp_path / "short.txt"
    short.write_text("Hello world. 你好。\n", encoding="utf-8")
    garbage_ckpt = tmp_path / "ckpt" / "step_00000003"
    garbage_ckpt.mkdir(parents=True)
    (garbage_ckpt / "manifest.json").write_text("{not json", encoding="utf-8")

    cases = {
        "missing corpus": ([f"data.paths=[{tmp_path / 'nope.txt'}]"], ["data.paths[0]", "nope.txt"]),
        "empty corpus": ([f"data.paths=[{empty}]"], ["empty.txt"]),
        "short corpus": ([f"data.paths=[{short}]"], ["fewer than one sequence", "data.seq_len"]),
        "unknown key": (["train.stpes=3"], ["unknown key 'stpes'", "Did you mean 'steps'?"]),
        "plan vs model": (["plan.spec=0-5:full"], ["2-layer model"]),
        "unreadable checkpoint": ([f"checkpoint.resume={garbage_ckpt}"],
                                  ["checkpoint.resume:", str(garbage_ckpt)]),
    }
    # The cases are independent processes: run them side by side (most of each is imports).
    procs = {}
    for name, (overrides, _needles) in cases.items():
        out = tmp_path / name.replace(" ", "_")
        config = _write(tmp_path / f"{out.name}.yaml",
                        _config(out, tmp_path / "cache", tokenizer={"path": str(tokenizer_dir)},
                                logging={"wandb_project": None}))
        cmd, env = _train_cmd(config, *overrides)
        procs[name] = (out, subprocess.Popen(cmd, cwd=REPO, env=env, text=True,
                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    failures = []
    for name, (out, proc) in procs.items():
        _stdout, stderr = proc.communicate(timeout=300)
        needles = cases[name][1]
        if proc.returncode != 2:
            failures.append(f"{name}: exit {proc.returncode}\n{stderr[-3000:]}")
            continue
        missing = [n for n in needles if n not in stderr]
        if missing:
            failures.append(f"{name}: message lacks {missing}:\n{stderr[-2000:]}")
        if "Traceback" in stderr:
            failures.append(f"{name}: traceback instead of a clear message:\n{stderr[-2000:]}")
        if out.exists():
            failures.append(f"{name}: left {sorted(p.name for p in out.rglob('*'))} in {out}")
    assert not failures, "\n\n".join(failures)
