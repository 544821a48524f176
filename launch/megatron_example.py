"""Train a tiny GPT under a layer plan with megatron-core's own training pieces.

What a ``pretrain_gpt.py``-style script does, reduced to megatron-core parts: a model provider
(wrapped by ``layerfreeze.megatron.plan_model_provider``), Megatron's
``DistributedDataParallel``, ``get_megatron_optimizer`` (distributed optimizer, per-policy
``config_overrides`` from ``layerfreeze.megatron.optimizer_overrides``), Megatron's
``OptimizerParamScheduler``, ``get_forward_backward_func()`` (the 1F1B schedule when
pipeline-parallel) and ``dist_checkpointing`` (Megatron-LM's ``torch_dist`` checkpoints: model,
optimizer and scheduler, loadable at another TP/PP layout). layerfreeze only touches the model
provider and the optimizer overrides.

Run (2 processes; tensor-parallel 2, or pipeline-parallel 2 with ``--pp 2 --tp 1``)::

    torchrun --nproc_per_node 2 launch/megatron_example.py --tp 2 --plan freeze_deep --steps 5
    torchrun --nproc_per_node 2 launch/megatron_example.py --tp 1 --pp 2 --plan hlpt_branch --cpu-shim

Save and resume (here: saved at TP=2, resumed at TP=1 on one process; the adapters' tensors are
declared with their global shapes, so the checkpoint reshards)::

    torchrun --nproc_per_node 2 launch/megatron_example.py --tp 2 --steps 4 --save ckpt --save-every 2
    torchrun --nproc_per_node 1 launch/megatron_example.py --tp 1 --steps 6 --load ckpt

``--save DIR`` writes ``DIR/iter_<step>/`` with ``dist_checkpointing.save`` and the step number
to ``DIR/latest_checkpointed_iteration.txt`` (Megatron-LM's layout); ``--load DIR`` continues
from that step with the same data (each step's batches are seeded by the step number).

On GPUs (NCCL) it runs as is. megatron-core 0.16 allocates a few buffers on the current CUDA
device even for CPU models, so a CPU-only run (gloo) needs ``--cpu-shim``: it imports the test
shim ``tests/helpers/megatron.py`` from this source checkout, which redirects exactly those spots
to the CPU for the run. The library itself never patches megatron-core, and the shim is not
part of the installed package; that is why it sits behind an explicit flag.

The vocabulary is padded the way Megatron-LM pads it (to a multiple of 128 x TP);
``plan_model_provider(..., vocab_size=)`` keeps the padded rows out of the softmax.

Output: one JSON line per step on stdout (``step``, ``loss``, ``lr``, ``grad_norm``); the plan
table and progress on stderr. The ``if __name__ == "__main__":`` guard at the end is required:
``dist_checkpointing.save`` starts a ``multiprocessing`` manager with the spawn method, which
re-imports this module.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tp", type=int, default=2, help="tensor-model-parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline-model-parallel size")
    p.add_argument("--plan", default="freeze_deep", help="plan preset or JSON plan spec")
    p.add_argument("--steps", type=int, default=5, help="optimizer steps")
    p.add_argument("--micro-batches", type=int, default=4, help="micro-batches per step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--vocab", type=int, default=250, help="tokenizer vocabulary (unpadded)")
    p.add_argument("--save", help="checkpoint directory (dist_checkpointing, torch_dist)")
    p.add_argument("--save-every", type=int, default=0, help="steps between saves (0: at the end)")
    p.add_argument("--load", help="resume from the latest checkpoint in this directory")
    p.add_argument("--ckpt-step", type=int, help="with --load: this step instead of the latest")
    p.add_argument("--no-distributed-optimizer", action="store_true")
    p.add_argument(
        "--cpu-shim",
        action="store_true",
        help="CPU/gloo run: import the megatron-core CUDA shim from tests/helpers (source checkout)",
    )
    return p.parse_args(argv)


def _shim(enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.helpers.megatron import megatron_cpu_shim

    return megatron_cpu_shim()


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.transformer_config import TransformerConfig

    from layerfreeze.megatron import optimizer_overrides, plan_model_provider

    cuda = torch.cuda.is_available() and not args.cpu_shim
    if not cuda and not args.cpu_shim:
        print("no CUDA device: pass --cpu-shim for a CPU (gloo) run", file=sys.stderr)
        return 2
    dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    plan = json.loads(args.plan) if args.plan.lstrip().startswith("{") else args.plan
    with _shim(args.cpu_shim):
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp
        )
        torch.manual_seed(0)
        if cuda:
            from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

            model_parallel_cuda_manual_seed(0)
        config = TransformerConfig(
            num_layers=args.layers,
            hidden_size=args.hidden,
            num_attention_heads=4,
            num_query_groups=2,
            ffn_hidden_size=2 * args.hidden,
            tensor_model_parallel_size=args.tp,
            pipeline_model_parallel_size=args.pp,
            pipeline_dtype=torch.float32,
            use_cpu_initialization=not cuda,
            normalization="RMSNorm",
            add_bias_linear=False,
            gated_linear_unit=True,
            activation_func=F.silu,
            bias_activation_fusion=False,
            masked_softmax_fusion=False,
            persist_layer_norm=False,
            gradient_accumulation_fusion=False,
            apply_rope_fusion=False,
            bias_dropout_fusion=False,
            hidden_dropout=0.0,
            attention_dropout=0.0,
        )

        # The script's own provider (old or new Megatron-LM signature both work) ...
        multiple = 128 * args.tp  # Megatron-LM's make_vocab_size_divisible_by x TP
        padded_vocab = -(-args.vocab // multiple) * multiple

        def model_provider(pre_process=True, post_process=True, vp_stage=None):
            return GPTModel(
                config=config,
                transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                vocab_size=padded_vocab,
                max_sequence_length=args.seq,
                pre_process=pre_process,
                post_process=post_process,
                position_embedding_type="rope",
                vp_stage=vp_stage,
            )

        # ... wrapped: change 1 of 2. The plan is applied before DDP and the optimizer; the
        # padded vocabulary rows are masked out of the loss.
        model_provider = plan_model_provider(model_provider, plan, vocab_size=args.vocab)
        model = model_provider(
            pre_process=parallel_state.is_pipeline_first_stage(),
            post_process=parallel_state.is_pipeline_last_stage(),
        )
        if cuda:
            model.cuda()
        if dist.get_rank() == 0:
            print(model.layerfreeze_applied.summary().table(), file=sys.stderr)
        use_do = not args.no_distributed_optimizer
        ddp = DistributedDataParallel(
            config=config,
            ddp_config=DistributedDataParallelConfig(
                grad_reduce_in_fp32=True, use_distributed_optimizer=use_do
            ),
            module=model,
        )
        config.finalize_model_grads_func = finalize_model_grads
        config.no_sync_func = ddp.no_sync
        opt_config = OptimizerConfig(
            optimizer="adam",
            lr=args.lr,
            min_lr=args.lr * 0.1,
            weight_decay=0.1,
            clip_grad=1.0,
            use_distributed_optimizer=use_do,
        )
        # change 2 of 2: the plan's per-policy lr scale and weight decay.
        optimizer = get_megatron_optimizer(
            opt_config, [ddp], config_overrides=optimizer_overrides([ddp], opt_config)
        )
        scheduler = OptimizerParamScheduler(
            optimizer,
            init_lr=0.0,
            max_lr=args.lr,
            min_lr=args.lr * 0.1,
            lr_warmup_steps=1,
            lr_decay_steps=max(2, args.steps),
            lr_decay_style="cosine",
            start_wd=0.1,
            end_wd=0.1,
            wd_incr_steps=max(2, args.steps),
            wd_incr_style="constant",
        )

        # Checkpoints: the model's and the optimizer's sharded state dicts (the adapters'
        # tensors included), plus the scheduler's state as common (non-sharded) state.
        # * per-layer keys ("non_homogeneous_layers"): megatron stacks a stage's layers under one
        #   key by default, and a plan that trains some layers' weights and freezes others gives
        #   the optimizer state of only some layers of that stack, which megatron-core refuses
        #   ("Invalid access pattern");
        # * the distributed optimizer's "fully_reshardable" format (Megatron-LM's choice when the
        #   layout changes) loads at another TP/PP/DP layout.
        def checkpoint_state(is_loading: bool = False) -> dict:
            model_sd = model.sharded_state_dict(metadata={"non_homogeneous_layers": True})
            fmt = {"distrib_optim_sharding_type": "fully_reshardable"}
            return {
                "model": model_sd,
                "optimizer": optimizer.sharded_state_dict(
                    model_sd, is_loading=is_loading, metadata=fmt
                ),
                "scheduler": scheduler.state_dict(),
            }

        def save_checkpoint(step: int) -> None:
            path = os.path.join(args.save, f"iter_{step:07d}")
            os.makedirs(path, exist_ok=True)
            dist_checkpointing.save(checkpoint_state(), path)
            dist.barrier()
            if dist.get_rank() == 0:  # the tracker names a complete checkpoint only
                Path(args.save, "latest_checkpointed_iteration.txt").write_text(str(step))
            dist.barrier()

        start = 0
        if args.load:
            tracker = Path(args.load, "latest_checkpointed_iteration.txt")
            start = args.ckpt_step if args.ckpt_step is not None else int(tracker.read_text())
            state = dist_checkpointing.load(
                checkpoint_state(is_loading=True), os.path.join(args.load, f"iter_{start:07d}")
            )
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            print(f"resumed from {args.load} at step {start}", file=sys.stderr)

        device = torch.device("cuda") if cuda else torch.device("cpu")
        mb, seq = 2, args.seq

        def batches(first_step: int):
            for step in range(first_step, args.steps):  # each step's batches seeded by its number
                gen = torch.Generator().manual_seed(1234 + step)
                for _ in range(args.micro_batches):
                    ids = torch.randint(0, args.vocab, (mb, seq + 1), generator=gen)
                    yield {"tokens": ids[:, :-1], "labels": ids[:, 1:]}

        data = batches(start)

        def forward_step(data_iterator, model):
            batch = next(data_iterator)
            tokens, labels = batch["tokens"].to(device), batch["labels"].to(device)
            pos = torch.arange(seq, device=device).unsqueeze(0).expand(mb, seq)
            out = model(tokens, pos, None, labels=labels)

            def loss_func(token_losses):
                loss = token_losses.float().mean()
                # clone: the schedule divides the returned loss by num_microbatches in place
                return loss, {"lm loss": loss.detach().clone()}

            return out, loss_func

        forward_backward = get_forward_backward_func()
        for step in range(start, args.steps):
            ddp.zero_grad_buffer()
            optimizer.zero_grad()
            losses = forward_backward(
                forward_step_func=forward_step,
                data_iterator=data,
                model=ddp,
                num_microbatches=args.micro_batches,
                seq_length=seq,
                micro_batch_size=mb,
                forward_only=False,
            )
            ok, grad_norm, _ = optimizer.step()
            scheduler.step(increment=1)
            if parallel_state.is_pipeline_last_stage() and (
                parallel_state.get_tensor_model_parallel_rank() == 0
                and parallel_state.get_data_parallel_rank() == 0
            ):
                loss = float(torch.stack([x["lm loss"] for x in losses]).mean())
                record = {
                    "step": step + 1,
                    "loss": round(loss, 6),
                    "lr": optimizer.param_groups[0]["lr"],
                    "grad_norm": None if grad_norm is None else round(float(grad_norm), 6),
                    "updated": bool(ok),
                }
                print(json.dumps(record), flush=True)
            done = step + 1
            if args.save and (
                done == args.steps or (args.save_every and done % args.save_every == 0)
            ):
                save_checkpoint(done)
        parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
