"""Healing a pruned model (Gromov et al.) over a 4-bit NF4 base: quantization error, LoRA forward
and backward on the 4-bit base on CPU, held-out loss going down, and the merged export being
``dequant(NF4 base) + (alpha / r) B A``.

bitsandbytes' NF4 runs on CPU here through its torch fallback (``Linear4bit``); every expected
value comes from a formula (the NF4 code table of the QLoRA paper, ``B @ A * alpha / r``) or an
independent computation (plain ``nn.Linear`` on the dequantized weight, bitsandbytes' own
``dequantize_4bit``)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

pytest.importorskip("bitsandbytes")

from layerfreeze import apply_plan  # noqa: E402
from layerfreeze.cli import main  # noqa: E402
from layerfreeze.diagnostics.heal import (  # noqa: E402
    HealConfig,
    finish_healing,
    heal_model,
    heldout_loss,
    token_blocks,
)
from layerfreeze.diagnostics.prune import remove_layers  # noqa: E402
from layerfreeze.quant import (  # noqa: E402
    dequantize_model,
    dequantize_weight,
    quantize_model,
    quantized_linears,
)
from tests.helpers.tiny_models import build_tiny_model, tiny_batch  # noqa: E402

VOCAB = 400
#: The 16 NF4 values (Dettmers et al. 2023, QLoRA, appendix E), normalised to [-1, 1].
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])
BLOCK = 64  # weights per absmax scale (QLoRA's blocksize)


def tiny(num_layers: int = 3, seed: int = 0) -> nn.Module:
    return build_tiny_model("llama", num_layers=num_layers, vocab_size=VOCAB, seed=seed)


def linear_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: m.weight.detach().clone() for n, m in model.named_modules()
        if type(m) is nn.Linear and ".layers." in n
    }


def test_nf4_error_within_the_code_table_bound_and_below_int4():
    """Every dequantized weight is an NF4 code value times its block's stored scale; it moves by
    at most half the widest gap of the code times that scale (plus the scale's own error: QLoRA's
    double quantization stores the scales in 8 bits); on the Gaussian-initialised weights the
    relative error is below a 4-bit absmax integer quantizer's on the same blocks (the reason
    QLoRA chose NF4)."""
    model = tiny()
    before = linear_weights(model)
    names = quantize_model(model)
    assert sorted(names) == sorted(before) and len(names) == 3 * 7
    half_gap = float((NF4_CODE[1:] - NF4_CODE[:-1]).max()) / 2  # 0.1385 (between 0.723 and 1)
    for name, w in before.items():
        deq = dequantize_weight(model.get_submodule(name))
        assert deq.shape == w.shape and deq.dtype == w.dtype
        blocks = w.reshape(-1, BLOCK)  # bitsandbytes blocks: consecutive row-major weights
        dblocks = deq.reshape(-1, BLOCK)
        absmax = blocks.abs().amax(dim=1, keepdim=True)
        # the block's largest weight maps to code +-1, so the stored scale is max |deq|
        scale = dblocks.abs().amax(dim=1, keepdim=True)
        codes = dblocks / scale
        assert torch.isclose(codes[..., None], NF4_CODE, atol=1e-6).any(-1).all(), name
        scale_err = (scale - absmax).abs()
        assert (scale_err <= 0.01 * absmax).all(), name  # 8-bit scales (measured ~0.1 %)
        err = (dblocks - blocks).abs()
        assert (err <= half_gap * torch.maximum(absmax, scale) + scale_err + 1e-7).all(), name
        int4 = torch.round(blocks / absmax * 7).clamp(-7, 7) / 7 * absmax
        rel_nf4 = float((dblocks - blocks).norm() / blocks.norm())
        rel_int4 = float((int4 - blocks).norm() / blocks.norm())
        assert 0 < rel_nf4 < rel_int4, (name, rel_nf4, rel_int4)


def test_lora_forward_and_backward_on_the_4bit_base_on_cpu():
    """Loss and every adapter gradient through the 4-bit base equal those of the same model with
    plain nn.Linear layers holding the dequantized weights; the 4-bit base gets no gradient."""
    model = tiny()
    quantize_model(model)
    torch.manual_seed(1)
    apply_plan(model, "lora_all", log=False)
    with torch.no_grad():  # B = 0 at init: give the adapters a non-zero update
        for n, p in model.named_parameters():
            if "lora_b" in n:
                p.normal_(0, 0.05)
    ref = copy.deepcopy(model)
    assert dequantize_model(ref) and not quantized_linears(ref)
    x = tiny_batch(VOCAB, batch=2, seq=12)
    model.train(), ref.train()
    losses = []
    for m in (model, ref):
        loss = m(input_ids=x, labels=x).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * 3 * 7
    for n, g in grads.items():
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, n
        torch.testing.assert_close(g, ref_grads[n], rtol=1e-4, atol=1e-6)
    frozen = [p for n, p in model.named_parameters() if "lora_" not in n]
    assert all(not p.requires_grad and p.grad is None for p in frozen)


def _blocks(tokenizer_dir, seq_len=32, max_tokens=4096):
    from layerfreeze.data.corpus import default_corpus_files
    from layerfreeze.data.tokenizer import load_tokenizer

    en = [p for p in default_corpus_files() if p.name == "en.txt"]
    return token_blocks(en, load_tokenizer(str(tokenizer_dir)), seq_len, max_tokens)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from layerfreeze.data import train_tokenizer
    from layerfreeze.data.corpus import default_corpus_files

    out = tmp_path_factory.mktemp("tok") / "tok"
    train_tokenizer([default_corpus_files()[0]], out, vocab_size=VOCAB)
    return out


@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_healing_lowers_the_heldout_loss_of_a_pruned_model(tokenizer_dir, quantize):
    model = tiny(num_layers=4)
    remove_layers(model, 1, 2)
    blocks = _blocks(tokenizer_dir)
    cfg = HealConfig(quantize=quantize, steps=12, lr=1e-2, batch_size=4, seq_len=32)
    _applied, report = heal_model(model, blocks, cfg)
    held = blocks[-report.heldout_sequences:]
    assert report.heldout_sequences == max(1, round(len(blocks) * 0.1))
    assert report.quantized_linears == (2 * 7 if quantize == "nf4" else 0)
    assert report.heldout_loss_after == pytest.approx(heldout_loss(model, held), rel=1e-6)
    assert report.heldout_loss_after < report.heldout_loss_before - 0.5, report
    # lora_all = rank 16 on q, k, v, o, gate, up, down of both layers: r (in + out) each
    h, f = 64, model.config.intermediate_size
    kv = model.config.num_key_value_heads * (h // model.config.num_attention_heads)
    per_layer = 16 * ((h + h) * 2 + (h + kv) * 2 + (h + f) * 2 + (f + h))
    assert report.trainable_params == 2 * per_layer


def test_nf4_healed_export_is_dequantized_base_plus_lora(tokenizer_dir, tmp_path):
    """The merged export = bitsandbytes' dequantize_4bit(base) + (alpha / r) B A, and its
    logits equal the healed 4-bit model's up to float rounding (not quantization error)."""
    from bitsandbytes.functional import dequantize_4bit
    from transformers import AutoModelForCausalLM

    from layerfreeze.export import export_merged

    model = tiny()
    full = copy.deepcopy(model)
    blocks = _blocks(tokenizer_dir)
    applied, _ = heal_model(model, blocks, HealConfig(quantize="nf4", steps=4, lr=1e-2, seq_len=32))
    x = blocks[:2]
    with torch.no_grad():
        healed_logits = model(input_ids=x).logits
    expected = {}
    for name in quantized_linears(model):
        q = model.get_submodule(name)
        ad = q.lora_adapter
        deq = dequantize_4bit(q.weight.data, q.weight.quant_state)
        expected[f"{name}.weight"] = deq + (ad.alpha / ad.r) * ad.lora_b.detach() @ ad.lora_a.detach()
    assert expected and all(float((v - full.state_dict()[k]).abs().max()) > 0 for k, v in expected.items())
    with pytest.raises(ValueError, match="dequantize_model"):
        export_merged(applied, tmp_path / "refused")  # a 4-bit weight cannot take the update
    assert not (tmp_path / "refused").exists()
    finish_healing(model)
    export_merged(applied, tmp_path / "export")
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export")).eval()
    state = exported.state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=1e-6)
    with torch.no_grad():
        got = exported(input_ids=x).logits
        fp = full(input_ids=x).logits
    # Float32 reassociation only: x (W + dW)^T vs x W^T + (x A^T) B^T over inner sizes <= 176
    # and 3 layers is ~ 176 * 3 * 1.2e-7 = 6e-5 relative; NF4 error moves the logits by far more.
    scale = float(healed_logits.abs().max())
    torch.testing.assert_close(got, healed_logits, rtol=0, atol=1e-4 * scale)
    assert float((fp - healed_logits).abs().max()) > 100 * 1e-4 * scale


def test_prune_cli_heals_with_nf4_and_saves_a_plain_merged_checkpoint(tokenizer_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from layerfreeze.data.corpus import default_corpus_files
    from layerfreeze.data.tokenizer import load_tokenizer

    src = tmp_path / "base"
    tiny(num_layers=4).save_pretrained(str(src))
    load_tokenizer(str(tokenizer_dir)).save_pretrained(str(src))
    en = str(next(p for p in default_corpus_files() if p.name == "en.txt"))
    out = tmp_path / "healed"
    argv = ["prune", "--model", str(src), "--num-layers", "1", "--out", str(out),
            "--strategy", "deepest", "--heal", "--heal-quantize", "nf4", "--heal-data", en,
            "--heal-steps", "6", "--heal-lr", "1e-2", "--heal-seq-len", "32",
            "--heal-max-tokens", "4096"]
    assert main(argv) == 0
    assert "healed: lora_all, base nf4, 6 steps" in capsys.readouterr().out
    report = json.loads((out / "prune.json").read_text())
    heal = report["heal"]
    assert heal["config"]["quantize"] == "nf4" and heal["quantized_linears"] == 3 * 7
    assert heal["heldout_loss_after"] < heal["heldout_loss_before"]
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.config.num_hidden_layers == 3
    assert not quantized_linears(model) and "lora" not in json.dumps(list(model.state_dict()))
    assert (out / "tokenizer_config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".healed")]  # no staging left


def test_eval_forward_runs_the_trained_4bit_model():
    """bitsandbytes repacks a Linear4bit for its CPU inference kernel at the first eval-mode
    no-grad forward on CPUs with AVX512-BF16, rounding the scales to bf16; quantize_model keeps
    that off, so evaluating (held-out loss, the export check) runs the model that trained: the
    eval logits equal the train-mode logits and the stored 4-bit state is unchanged."""
    model = tiny()
    quantize_model(model)
    q = model.get_submodule(quantized_linears(model)[0])
    packed, absmax = q.weight.data.clone(), q.weight.quant_state.absmax.clone()
    x = tiny_batch(VOCAB, batch=2, seq=8)
    model.train()
    with torch.no_grad():
        train_logits = model(input_ids=x).logits
    model.eval()
    with torch.no_grad():
        eval_logits = model(input_ids=x).logits
    assert torch.equal(eval_logits, train_logits)
    assert not getattr(q.weight.quant_state, "packing_format_for_cpu", False)
    assert torch.equal(q.weight.data, packed) and torch.equal(q.weight.quant_state.absmax, absmax)
    assert q.support_avx512bf16_for_cpu is False  # the attribute bitsandbytes reads


@pytest.mark.parametrize("target", ["mlp", "down", "attn"])
def test_lora_kinds_resolve_the_4bit_layers_logical_shape(target):
    """LoRA's role names (down, mlp, attn) find the 4-bit layers by their logical (in, out)
    widths, not the packed uint8 weight's shape; the adapters get the base layer's widths."""
    model = tiny(num_layers=2)
    quantize_model(model)
    apply_plan(model, f"all:lora(r=4,target={target})", log=False)
    shapes = {
        n: tuple(p.shape) for n, p in model.named_parameters()
        if n.endswith((".lora_a", ".lora_b"))
    }
    assert shapes, target
    cfg = model.config
    widths = {
        "down_proj": (cfg.intermediate_size, cfg.hidden_size),
        "up_proj": (cfg.hidden_size, cfg.intermediate_size),
        "gate_proj": (cfg.hidden_size, cfg.intermediate_size),
    }
    for n, shape in shapes.items():
        layer = next((k for k in widths if f".{k}." in n), None)
        if layer is None:
            continue
        fan_in, fan_out = widths[layer]
        assert shape == ((4, fan_in) if n.endswith(".lora_a") else (fan_out, 4)), (n, shape)
