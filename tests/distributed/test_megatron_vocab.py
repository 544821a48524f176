"""Padded vocabulary rows and the loss (layerfreeze/engines/megatron/vocab.py), real megatron-core.

A Hugging Face Llama with a vocabulary of 503 (prime: not divisible by any TP size) is converted
into megatron's ``GPTModel``, whose vocabulary megatron pads (to 504 at TP=2 with
``make_vocab_size_divisible_by=1``, to 512 with 128). The reference per-token losses are computed
from the Hugging Face logits with ``torch.nn.functional.cross_entropy`` (an independent
implementation); megatron-core's unmasked behaviour is predicted by the same formula with the
padded rows' logit 0 appended, since zero rows give logit 0.

TP=1 runs in this process; TP=2 on two gloo ranks (slow).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.helpers.dist import run_distributed
from tests.helpers.tiny_models import build_tiny_model, tiny_batch

VOCAB = 503
CPU = {"use_cpu_initialization": True}


def _hf():
    return build_tiny_model("llama", num_layers=2, num_heads=4, num_kv_heads=2, vocab_size=VOCAB)


def _expected(hf, ids: torch.Tensor, padded: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(HF per-token losses, megatron-core's unmasked ones) for labels ``ids.roll(-1, 1)``."""
    with torch.no_grad():
        logits = hf(ids).logits.float()
    labels = ids.roll(-1, 1)
    exact = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
    zeros = torch.zeros(*logits.shape[:-1], padded - VOCAB)
    unmasked = F.cross_entropy(
        torch.cat([logits, zeros], -1).transpose(1, 2), labels, reduction="none"
    )
    return exact, unmasked


def _measure(hf_config, hf_sd, ids, divisible_by: int, gather: bool) -> dict:
    """Per-token losses with the mask on and off, whole logits (TP-gathered by megatron's
    ``runtime_gather_output`` when ``gather``, else by the test), and a frozen-output-layer
    training run, on the current TP layout."""
    from layerfreeze import apply_plan
    from layerfreeze.engines.megatron import convert as C
    from layerfreeze.engines.megatron import megatron_layout
    from layerfreeze.engines.megatron.vocab import (
        mask_padded_vocab,
        masked_vocab_size,
        unmask_padded_vocab,
    )
    from tests.helpers.megatron import gather_tp_logits, position_ids

    model = C.build_gpt_from_hf_config(
        hf_config, config_overrides=CPU, make_vocab_size_divisible_by=divisible_by
    ).eval()

    def logits_of() -> torch.Tensor:
        if gather:
            return model(ids, pos, None, runtime_gather_output=True)
        return gather_tp_logits(model(ids, pos, None))

    C.load_hf_weights(model, hf_sd, hf_config)
    pos, labels = position_ids(ids), ids.roll(-1, 1)
    out: dict = {"padded": int(model.vocab_size)}
    with torch.no_grad():
        out["off"] = model(ids, pos, None, labels=labels).clone()
        assert mask_padded_vocab(model, VOCAB) == 1 and masked_vocab_size(model) == VOCAB
        mask_padded_vocab(model, VOCAB)  # idempotent
        out["on"] = model(ids, pos, None, labels=labels).clone()
        out["logits"] = logits_of()
    # Trained output layer: the loss gradient of the padded rows (their softmax) is exactly 0.
    model.train()
    model.output_layer.weight.grad = None
    model(ids, pos, None, labels=labels).sum().backward()
    grad = gather_tp_logits(model.output_layer.weight.grad.t().unsqueeze(0))[0].t()
    out["padded_grad"] = grad[VOCAB:].abs().max().item()
    out["real_grad"] = grad[:VOCAB].abs().max().item()
    # Frozen output layer (LoRA everywhere): a few steps, then the padded rows still get no
    # probability and the loss is the real-vocabulary cross entropy of the same logits.
    model.zero_grad(set_to_none=True)
    apply_plan(model, "0-1:lora(r=4,target=all)", layout=megatron_layout(model))
    assert not model.output_layer.weight.requires_grad
    with torch.no_grad():  # hostile start: padded rows that would dominate the softmax
        w = model.output_layer.weight
        start = _tp_start(w.shape[0])
        for i in range(w.shape[0]):
            if start + i >= VOCAB:
                w[i].fill_(1.0)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        model(ids, pos, None, labels=labels).mean().backward()
        opt.step()
    with torch.no_grad():
        out["trained_loss"] = model(ids, pos, None, labels=labels).clone()
        out["trained_padded_prob"] = logits_of().softmax(-1)[..., VOCAB:].max().item()
        unmask_padded_vocab(model)
        assert masked_vocab_size(model) is None
        raw = logits_of()
        out["trained_real_ce"] = F.cross_entropy(
            raw[..., :VOCAB].transpose(1, 2), labels, reduction="none"
        )
        out["trained_unmasked_padded_prob"] = raw.softmax(-1)[..., VOCAB:].max().item()
    return out


def _tp_start(local_rows: int) -> int:
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_rank() * local_rows


def _check(out: dict, exact: torch.Tensor, unmasked: torch.Tensor, padded: int) -> None:
    assert out["padded"] == padded
    torch.testing.assert_close(out["on"], exact, rtol=0, atol=1e-5)
    # megatron-core's own behaviour when unmasked: the formula with logit-0 padded rows
    torch.testing.assert_close(out["off"], unmasked, rtol=0, atol=1e-5)
    assert (out["off"] - exact).abs().max() > 1e-4
    logits = out["logits"]
    assert logits.shape[-1] == padded
    assert bool((logits[..., VOCAB:] == torch.finfo(logits.dtype).min).all())
    assert int(logits.argmax(-1).max()) < VOCAB
    assert out["padded_grad"] == 0.0 and out["real_grad"] > 0
    assert out["trained_padded_prob"] == 0.0
    assert out["trained_unmasked_padded_prob"] > 1e-3  # the hostile rows would take mass
    torch.testing.assert_close(out["trained_loss"], out["trained_real_ce"], rtol=0, atol=1e-5)


def test_tp1_padded_vocab_masked_gives_hf_per_token_losses(tp1):
    hf = _hf()
    ids = tiny_batch(VOCAB, batch=2, seq=8)
    exact, unmasked = _expected(hf, ids, 512)
    out = _measure(hf.config, hf.state_dict(), ids, divisible_by=128, gather=False)
    _check(out, exact, unmasked, 512)


def _tp2_body(rank, world_size, hf_sd, hf_config, ids):
    from tests.helpers.megatron import (
        destroy_model_parallel,
        init_model_parallel,
        megatron_cpu_shim,
    )

    res = {}
    with megatron_cpu_shim():
        # the recipe's padding (TP only: 504, one padded row on rank 1), logits gathered by the
        # test; then Megatron-LM's default (512: rank 1 holds rows 256-511, 9 padded), logits
        # gathered inside the output layer (runtime_gather_output: the hook masks by global column)
        for divisible_by, gather in ((1, False), (128, True)):
            init_model_parallel(tp=2, pp=1)
            try:
                res[divisible_by] = _measure(hf_config, hf_sd, ids, divisible_by, gather)
            finally:
                destroy_model_parallel()
    return res


@pytest.mark.slow
def test_tp2_padded_vocab_masked_gives_hf_per_token_losses():
    hf = _hf()
    ids = tiny_batch(VOCAB, batch=2, seq=8)
    results = run_distributed(
        _tp2_body, world_size=2, args=(hf.state_dict(), hf.config, ids), timeout=600
    )
    for divisible_by, padded in ((1, 504), (128, 512)):
        exact, unmasked = _expected(hf, ids, padded)
        for r in results:
            _check(r[divisible_by], exact, unmasked, padded)


# ---------------------------------------------------------------------------------------------
# The recipe (layerfreeze train engine=megatron) masks by default: at TP=2 with a 999-token
# vocabulary (padded to 1000) the step-1 loss is the DeepSpeed engine's, and with
# megatron.mask_padded_vocab=false it is not.


@pytest.mark.slow
def test_train_tp2_odd_vocab_step1_loss_equals_deepspeed(tmp_path, eval_data_dir):
    from tests.e2e.test_train_cli import _config, _losses, _train, _write
    from tests.e2e.test_train_megatron import _mconfig, _mtrain

    common = dict(
        train={"steps": 1, "grad_accum_steps": 1},
        checkpoint={"every_steps": 0, "export_final": False},
    )
    cache = tmp_path / "cache"
    dcfg = _config(
        tmp_path / "d", cache, plan={"spec": "full"}, logging={"wandb_project": None}, **common
    )
    dcfg["tokenizer"]["vocab_size"] = 999
    dcfg["model"]["attn_implementation"] = "sdpa"
    proc = _train(_write(tmp_path / "d.yaml", dcfg))
    assert proc.returncode == 0, proc.stderr[-6000:]
    deepspeed = _losses(tmp_path / "d")[1]
    runs = {}
    for mask in ("true", "false"):
        out = tmp_path / f"m_{mask}"
        cfg = _mconfig(out, cache, 2, 1, eval_data_dir, plan={"spec": "full"}, **common)
        cfg["tokenizer"]["vocab_size"] = 999
        cfg["eval"] = {"every_steps": 0, "at_end": False}
        proc = _mtrain(
            _write(tmp_path / f"m_{mask}.yaml", cfg), f"megatron.mask_padded_vocab={mask}"
        )
        assert proc.returncode == 0, proc.stderr[-6000:]
        runs[mask] = _losses(out)[1]
    assert runs["true"] == pytest.approx(deepspeed, rel=1e-5)
    assert abs(runs["false"] - deepspeed) > 1e-4  # one zero padded row: log(1 + 1/sum exp)
