"""Two identical 2-rank DeepSpeed runs on CPU (gloo) are bit-identical: losses, global grad
norms, whole weights and fp32 masters after every step, under ZeRO-2 and ZeRO-3.

DeepSpeed's bucketed gradient reduction on gloo is deterministic run to run; what used to make
two runs differ was the LoRA ``A`` initialisation drawing from torch's global generator, which
each new process seeds from the OS. ``B`` starts at zero, so the first loss agrees whatever
``A`` is and the runs part from step 1 on; the second test pins that down.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers.dist import run_distributed

pytestmark = pytest.mark.slow

MICRO = 2
SEQ = 8
STEPS = 4
PLAN = "0-1:lora(r=4,target=mlp),2-3:full"


def _cfg(stage: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": 2,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": 1e-3, "weight_decay": 0.1, "torch_adam": True},
        },
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 10**6,
    }


def _train(rank: int, world: int, stage: int, seed: int) -> dict:
    """Seed the global generator on every rank (as ``layerfreeze train`` does), train
    ``STEPS`` steps and return what each step and the final state produced."""
    import numpy as np

    from layerfreeze.data import DistributedBatchIterator, PackedDataset
    from layerfreeze.engines.deepspeed import DeepSpeedRunner
    from tests.helpers.tiny_models import build_tiny_model

    torch.manual_seed(seed)  # LoRA A is drawn from it inside the runner's apply_plan
    tokens = np.random.default_rng(0).integers(0, 128, size=SEQ * 64 + 1)
    loader = DistributedBatchIterator(
        PackedDataset(tokens, SEQ), MICRO, rank=rank, world_size=world, seed=5
    )
    runner = DeepSpeedRunner(build_tiny_model("llama", num_layers=4), _cfg(stage), plan=PLAN)
    losses, norms = [], []
    for _ in range(STEPS):
        out = runner.train_step(
            [loader.next_batch() for _ in range(runner.gradient_accumulation_steps)]
        )
        losses.append(out.loss)
        norms.append(out.grad_norm)
    state = {}
    for n, p in runner.model.named_parameters():
        with runner.gathered_parameters([n]):
            state[f"weight:{n}"] = p.detach().clone()
    for n, p in runner._named_trainable():
        state[f"master:{n}"] = runner._full_fp32(p)
    runner.close()
    return {"losses": losses, "norms": norms, "state": state}


@pytest.mark.parametrize("stage", [2, 3])
def test_two_identical_runs_are_bit_identical(stage):
    one, two = (run_distributed(_train, world_size=2, args=(stage, 0)) for _ in range(2))
    for rank in range(2):
        assert one[rank]["losses"] == two[rank]["losses"]  # exact, not approx
        assert one[rank]["norms"] == two[rank]["norms"]
        assert one[rank]["state"].keys() == two[rank]["state"].keys()
        for k, v in one[rank]["state"].items():
            assert torch.equal(v, two[rank]["state"][k]), k
    assert any("lora_a" in k for k in one[0]["state"])
    assert one[0]["losses"] == one[1]["losses"]  # every rank reports the same mean loss


def test_only_the_adapter_init_seed_separates_two_runs():
    """Another seed draws another LoRA ``A``: the first loss is unchanged (``B`` = 0), every
    later one differs. This is the run-to-run difference an unseeded process shows."""
    base = run_distributed(_train, world_size=2, args=(2, 0))[0]
    other = run_distributed(_train, world_size=2, args=(2, 1))[0]
    assert other["losses"][0] == base["losses"][0]
    assert all(a != b for a, b in zip(other["losses"][1:], base["losses"][1:], strict=True))
    trainable = {k.split(":", 1)[1] for k in base["state"] if k.startswith("master:")}
    weights = {k.split(":", 1)[1] for k in base["state"] if k.startswith("weight:")}
    assert trainable and weights - trainable
    for n in weights - trainable:  # frozen weights are the seeded model's, whatever A is
        assert torch.equal(base["state"][f"weight:{n}"], other["state"][f"weight:{n}"]), n
    for n in trainable:
        assert not torch.equal(base["state"][f"master:{n}"], other["state"][f"master:{n}"]), n
