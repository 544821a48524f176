"""``engine: megatron`` with ``megatron.transformer_impl: transformer_engine`` on CUDA (skipped
without a GPU, megatron-core or Transformer Engine; import-safe on CPU).

NEVER EXECUTED when written: the machines this was written on have no GPU and cannot install
Transformer Engine. Written against megatron-core 0.16.1 (installed source) and Transformer
Engine's source (commit d0067d0, 2.20.0.dev0). Expected to run on one H100:

* a tiny Hugging Face Llama loaded into megatron-core's Transformer Engine spec (TP=1) gives the
  Hugging Face model's per-token losses, and the local spec's, at init; its state dict exports
  back to the Hugging Face tensors bit for bit (the name mapping of
  ``hf_weights.to_transformer_impl`` / ``to_local_spec`` on a real TE model);
* ``layerfreeze train engine=megatron megatron.transformer_impl=transformer_engine`` (the real
  CLI under torchrun, one process, NCCL) trains 3 steps with the ``hlpt`` preset and with
  ``freeze_deep``; a resume from the step-2 checkpoint gives the straight run's step-3 loss and
  export exactly; the export loads in transformers with the logits of the trained megatron model
  (the final checkpoint loaded into a runner in this process);
* TP=2 with sequence parallelism: the same run's losses as TP=1 (skipped with fewer than 2 GPUs).

Tolerances: fp32 weights with TF32 off on the torch side. Transformer Engine's GEMMs and its
unfused fp32 attention reduce in another order than Hugging Face's eager attention, so per-token
losses are compared to 2e-3 absolute (losses are ~ln(V) ~ 4.8; TF32 rounding, should TE's GEMMs
use it, stays below that for hidden 64); the resumed-vs-straight comparison is exact (same
device, same kernels, NVTE_ALLOW_NONDETERMINISTIC_ALGO=0, no dropout).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

REPO = Path(__file__).resolve().parents[2]
LOSS_ATOL = 2e-3
TINY_ARCH = {
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}


def _needs_te():
    pytest.importorskip("megatron.core")
    pytest.importorskip("transformer_engine")
    from megatron.core.extensions import transformer_engine as mte

    if not mte.HAVE_TE:
        pytest.skip("megatron-core could not import Transformer Engine (HAVE_TE is False)")


def _token_losses(logits: torch.Tensor, ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """Per-token next-token cross entropy over the real vocabulary (padding rows cut)."""
    logits = logits[..., :vocab].float()
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1), reduction="none"
    )


# ------------------------------------------------------------------ in process, TP=1


def test_te_spec_loads_hf_weights_with_hf_losses_and_exports_them_back(megatron_cuda):
    _needs_te()
    from megatron.core.extensions.transformer_engine import TELayerNormColumnParallelLinear
    from megatron.core.transformer.identity_op import IdentityOp

    from layerfreeze.engines.megatron import convert as C
    from layerfreeze.engines.megatron import hf_weights as W
    from tests.helpers.megatron import position_ids
    from tests.helpers.tiny_models import build_tiny_model

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    vocab = 100
    hf = build_tiny_model("llama", num_layers=2, num_heads=4, num_kv_heads=2, vocab_size=vocab)
    hf = hf.cuda().float().eval()
    ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        ref = _token_losses(hf(ids).logits, ids, vocab)

    def megatron_losses(impl: str):
        model = C.build_gpt_from_hf_config(
            hf.config, backend="layerfreeze", transformer_impl=impl
        ).cuda().eval()
        C.load_hf_weights(model, {k: v.cpu() for k, v in hf.state_dict().items()}, hf.config)
        with torch.no_grad():
            out = model(ids, position_ids(ids).to(ids.device), None)
        return model, _token_losses(out, ids, vocab)

    te_model, te = megatron_losses("transformer_engine")
    layer = te_model.decoder.layers[0]
    assert isinstance(layer.self_attention.linear_qkv, TELayerNormColumnParallelLinear)
    assert isinstance(layer.mlp.linear_fc1, TELayerNormColumnParallelLinear)
    assert isinstance(layer.input_layernorm, IdentityOp)
    assert W.transformer_impl_of(te_model.state_dict()) == "transformer_engine"
    # the TE names the CPU test writes out are the real model's parameters
    params = {n for n, _ in te_model.named_parameters()}
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in params
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in params
    assert not any("input_layernorm" in n or "pre_mlp_layernorm" in n for n in params)

    _, local = megatron_losses("local")
    print("max |TE - HF| per-token loss:", (te - ref).abs().max().item(),
          "max |TE - local|:", (te - local).abs().max().item())
    torch.testing.assert_close(te, ref, rtol=0, atol=LOSS_ATOL)
    torch.testing.assert_close(te, local, rtol=0, atol=LOSS_ATOL)

    back = C.gather_hf_state_dict(te_model, hf.config)
    expected = {k: v.cpu() for k, v in hf.state_dict().items()}
    assert set(back) == set(expected)
    for k, v in expected.items():
        assert torch.equal(back[k].cpu(), v), k


# ------------------------------------------------------------------ the CLI under torchrun


def _env() -> dict:
    env = dict(os.environ)
    env.update({
        "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore",
        "PYTHONPATH": str(REPO), "NVTE_ALLOW_NONDETERMINISTIC_ALGO": "0",
        "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
    })
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "DS_ACCELERATOR"):
        env.pop(k, None)
    return env


def _config(out: Path, cache: Path, plan: str, tp: int = 1, sp: bool = False) -> dict:
    return {
        "model": {"architecture": dict(TINY_ARCH), "attn_implementation": "sdpa"},
        "tokenizer": {"vocab_size": 1000},
        "data": {"paths": ["@bundled"], "seq_len": 32, "cache_dir": str(cache)},
        "plan": {"spec": plan},
        "engine": "megatron",
        "megatron": {"tensor_model_parallel_size": tp, "sequence_parallel": sp,
                     "transformer_impl": "transformer_engine"},
        "optim": {"lr": 3e-3, "warmup_steps": 1, "schedule": "cosine"},
        "train": {"steps": 3, "micro_batch_size": 2, "grad_accum_steps": 2, "seed": 7},
        "logging": {"out_dir": str(out), "wandb_project": None},
        "checkpoint": {"every_steps": 2, "keep_last": 3},
    }


def _write(path: Path, cfg: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def _train(config: Path, nproc: int = 1) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(nproc), "-m", "layerfreeze", "train", "--config", str(config)]
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=400)


def _losses(out: Path) -> dict[int, float]:
    from layerfreeze.metrics import read_jsonl

    return {r["step"]: r["loss"] for r in read_jsonl(out / "metrics.jsonl") if r["type"] == "train"}


def _load_export(path: Path):
    from layerfreeze.export import load_export

    return load_export(path).cuda().float().eval()  # plain HF weights, or HF + sidecar adapters


@pytest.mark.parametrize("plan", ["freeze_deep", "hlpt"])
def test_cli_trains_the_te_spec_resumes_exactly_and_exports(tmp_path, plan, megatron_cuda):
    _needs_te()
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    cfg = _config(straight, tmp_path / "cache", plan)
    proc = _train(_write(tmp_path / "straight.yaml", cfg))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-8000:]
    losses = _losses(straight)
    assert sorted(losses) == [1, 2, 3] and all(v == v for v in losses.values())
    step2 = straight / "checkpoints" / "step_00000002"
    assert step2.is_dir()

    cfg2 = _config(resumed, tmp_path / "cache", plan)
    cfg2["checkpoint"]["resume"] = str(step2)
    proc = _train(_write(tmp_path / "resumed.yaml", cfg2))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-8000:]
    again = _losses(resumed)
    assert sorted(again) == [3]
    assert again[3] == losses[3]  # exact: same device, kernels and data
    a, b = _load_export(straight / "export"), _load_export(resumed / "export")
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)

    # the export's logits are the trained megatron model's: the final checkpoint in a runner
    from layerfreeze.config import load_config
    from layerfreeze.engines.megatron.recipe import runner_from_run_config
    from layerfreeze.train import build_schedule

    run_cfg = load_config(tmp_path / "straight.yaml")
    runner = runner_from_run_config(run_cfg, schedule=build_schedule(run_cfg), vocab_size=1000)
    try:
        runner.load_checkpoint(straight / "checkpoints", verify=False)
        ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(1))
        megatron_logits = runner.eval_model()(ids)[..., :1000]
    finally:
        runner.close(destroy_model_parallel=False)
    with torch.no_grad():
        hf_logits = a(ids.cuda()).logits.float().cpu()
    print("max |export - megatron| logit:", (hf_logits - megatron_logits).abs().max().item())
    torch.testing.assert_close(hf_logits, megatron_logits, rtol=0, atol=1e-3)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="TP=2 + SP needs 2 GPUs")
def test_cli_tp2_sequence_parallel_te_matches_tp1(tmp_path):
    _needs_te()
    one, two = tmp_path / "tp1", tmp_path / "tp2"
    proc = _train(_write(tmp_path / "tp1.yaml", _config(one, tmp_path / "cache", "hlpt")))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-8000:]
    cfg = _config(two, tmp_path / "cache", "hlpt", tp=2, sp=True)
    proc = _train(_write(tmp_path / "tp2.yaml", cfg), nproc=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-8000:]
    l1, l2 = _losses(one), _losses(two)
    assert sorted(l1) == sorted(l2) == [1, 2, 3]
    for step in l1:  # the same data (one data-parallel replica in both); TP reduces in pieces
        assert l2[step] == pytest.approx(l1[step], rel=0, abs=LOSS_ATOL), step
