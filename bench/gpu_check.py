"""The GPU paths CPU cannot exercise, in one short run: bf16 DeepSpeed ZeRO-2/3 over NCCL with a
gated-LoRA + gated-prefix plan, and the prefix policy under SDPA / flash attention.

Part of ``bench/gpu_check.sh`` (which adds the evaluation-speed and plan step-time benchmarks
on CUDA). Writes ``<out-dir>/gpu_check.json`` and ``.md`` with the date and the hardware.

Run on a machine with one CUDA GPU (a single NCCL rank; the script starts its own world of one)::

    python bench/gpu_check.py --out-dir bench/results

``--device cpu`` runs the same code over gloo in fp32 (a smoke test of the script itself; the
figures then say nothing about GPUs).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _tiny_llama(hidden: int, layers: int, attn: str, dtype, device):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64,
        num_hidden_layers=layers, num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 128), vocab_size=8192, max_position_embeddings=2048,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM._from_config(cfg, attn_implementation=attn, dtype=dtype).to(device)


def check_zero(device: str, stage: int, steps: int, hidden: int, layers: int, seq: int) -> dict:
    """hlpt (gated LoRA bottom, gated prefix top) under ZeRO-``stage``: losses, frozen params
    bit-identical, step time."""
    import torch

    from layerfreeze.engines.deepspeed import DeepSpeedRunner

    cuda = device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    model = _tiny_llama(hidden, layers, "sdpa", dtype, device)
    frozen_before = {
        n: p.detach().clone() for n, p in model.named_parameters() if "layers.0." in n
    }
    cfg = {
        "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        "zero_optimization": {"stage": stage}, "gradient_clipping": 1.0,
        "bf16": {"enabled": cuda}, "steps_per_print": 10**9,
    }
    runner = DeepSpeedRunner(model, cfg, plan="hlpt")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 8192, (4, seq), generator=g).to(runner.device)
    batch = {"input_ids": ids, "labels": ids}
    losses, times = [], []
    for _ in range(steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        losses.append(runner.train_step([batch]).loss)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    with runner.gathered_parameters():
        params = dict(runner.model.named_parameters())
        # hlpt trains adapters only: every base weight stays bit-identical
        unchanged = all(torch.equal(params[n].detach(), v) for n, v in frozen_before.items())
    runner.close()
    return {
        "stage": stage, "dtype": str(dtype), "losses": losses,
        "loss_decreased": losses[-1] < losses[0], "base_weights_unchanged": unchanged,
        "median_step_s": sorted(times[1:])[len(times[1:]) // 2] if len(times) > 1 else times[0],
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
    }


def check_prefix_attention(device: str, hidden: int, layers: int, seq: int) -> dict:
    """Gated prefix with randomised adapters: logits under sdpa / flash_attention_2 vs eager."""
    import torch

    from layerfreeze import apply_plan

    cuda = device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    impls = ["eager", "sdpa"]
    try:
        import flash_attn  # noqa: F401

        if cuda:
            impls.append("flash_attention_2")
    except ImportError:
        pass
    ids = torch.randint(0, 8192, (2, seq), generator=torch.Generator().manual_seed(2)).to(device)
    out = {}
    for impl in impls:
        model = _tiny_llama(hidden, layers, impl, dtype, device)
        apply_plan(model, "all:prefix(tokens=8,gated)")
        torch.manual_seed(3)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "prefix_" in n:
                    p.copy_(torch.randn_like(p) * 0.5)
            out[impl] = model(ids).logits.float().cpu()
    ref = out["eager"]
    return {
        "implementations": impls,
        "max_abs_diff_vs_eager": {k: float((v - ref).abs().max()) for k, v in out.items()},
        "logit_scale": float(ref.abs().max()),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out-dir", default=str(REPO / "bench" / "results"))
    args = ap.parse_args()
    import torch

    from layerfreeze.engines.deepspeed import init_distributed
    from layerfreeze.utils.io import atomic_write_json, atomic_write_text

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (use --device cpu for a smoke test)", file=sys.stderr)
        return 2
    os.environ.setdefault("MASTER_PORT", "29531")
    init_distributed("nccl" if args.device.startswith("cuda") else "gloo")
    hw = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor()
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hardware": hw, "torch": torch.__version__, "cuda": torch.version.cuda,
        "settings": vars(args),
        "zero": [check_zero(args.device, s, args.steps, args.hidden, args.layers, args.seq)
                 for s in (2, 3)],
        "prefix_attention": check_prefix_attention(args.device, 256, 2, 128),
    }
    out = Path(args.out_dir)
    atomic_write_json(out / "gpu_check.json", result)
    lines = [
        "# GPU check", "",
        f"Written by `bench/gpu_check.py` on {result['date']}: {hw}, torch {torch.__version__}, "
        f"CUDA {torch.version.cuda}. Llama hidden {args.hidden}, {args.layers} layers, seq "
        f"{args.seq}, micro-batch 4, plan `hlpt`, {args.steps} steps.", "",
        "| ZeRO | dtype | first loss | last loss | base weights unchanged | median step s | peak GiB |",
        "|---|---|---:|---:|---|---:|---:|",
    ]
    for z in result["zero"]:
        peak = "-" if z["peak_mem_gib"] is None else f"{z['peak_mem_gib']:.2f}"
        lines.append(
            f"| {z['stage']} | {z['dtype']} | {z['losses'][0]:.4f} | {z['losses'][-1]:.4f} | "
            f"{z['base_weights_unchanged']} | {z['median_step_s']:.4f} | {peak} |"
        )
    pa = result["prefix_attention"]
    lines += ["", f"Gated prefix (randomised adapters), logits vs eager (max |logit| "
              f"{pa['logit_scale']:.2f}):", "", "| attention | max abs diff |", "|---|---:|"]
    lines += [f"| {k} | {v:.3e} |" for k, v in pa["max_abs_diff_vs_eager"].items()]
    atomic_write_text(out / "gpu_check.md", "\n".join(lines) + "\n")
    print(json.dumps({k: result[k] for k in ("hardware", "date")}))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
