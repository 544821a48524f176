"""New vocabulary rows (``embeddings`` / ``lm_head`` ``new_rows``) travel with a LoRA adapter in
PEFT's own ``trainable_token_indices`` format, checked through real ``peft`` (0.21): a tiny Llama
(tied and untied head) trained a few real AdamW steps under LoRA layers + new rows, exported by
``export_peft``, loaded by ``PeftModel.from_pretrained`` on the resized base (equal logits),
``merge_and_unload`` equal to our ``export_merged``; and back into a plan by ``peft_plan`` +
``load_peft_adapter`` (ours and PEFT-written adapters)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from layerfreeze import apply_plan
from layerfreeze.export import export_merged
from layerfreeze.interop.peft import (
    export_peft,
    load_peft_adapter,
    peft_export_problems,
    peft_plan,
    vllm_compatibility,
)
from tests.helpers.tiny_models import build_tiny_model

torch.set_num_threads(1)

FROM, VOCAB = 100, 128
LORA = "0-1:lora(r=4,alpha=8,target=[q_proj,v_proj])"
EMB, HEAD = "model.embed_tokens", "lm_head"
DELTA = "base_model.model.{}.token_adapter.trainable_tokens_delta"
IDS = torch.tensor([[1, 5, FROM, VOCAB - 1, 50, FROM + 3, 7, FROM + 20]])


def _model(tied: bool):
    return build_tiny_model(
        "llama",
        num_layers=2,
        hidden=32,
        num_heads=2,
        num_kv_heads=1,
        vocab_size=VOCAB,
        tie_word_embeddings=tied,
    )


def _train(model, applied, steps: int = 3) -> None:
    """Real AdamW steps on batches mixing old and new ids (so every trained part moves)."""
    model.train()
    opt = torch.optim.AdamW(applied.param_groups(lr=3e-2, weight_decay=0.01))
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(0, VOCAB, (2, 12), generator=gen)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _trained(tied: bool, parts: str):
    """(base state dict before the plan, model, applied, our logits)."""
    model = _model(tied)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    applied = apply_plan(model, f"{LORA},{parts}", log=False)
    _train(model, applied)
    return base, model, applied, _logits(model)


def _fresh(tied: bool, base: dict):
    fresh = _model(tied)
    fresh.load_state_dict(base)
    return fresh.eval()


# (tied, plan parts, the trainable_token_indices PEFT must read, the modules that carry rows)
CASES = {
    "tied": (True, f"embeddings:new_rows(from_id={FROM})", list(range(FROM, VOCAB)), [EMB]),
    "untied-both": (
        False,
        f"embeddings:new_rows(from_id={FROM}),lm_head:new_rows(from_id={FROM})",
        {EMB: list(range(FROM, VOCAB)), HEAD: list(range(FROM, VOCAB))},
        [EMB, HEAD],
    ),
    "untied-emb": (False, f"embeddings:new_rows(from_id={FROM})", list(range(FROM, VOCAB)), [EMB]),
    "untied-head": (
        False,
        "lm_head:new_rows(from_id=110)",
        {HEAD: list(range(110, VOCAB))},
        [HEAD],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_new_rows_export_loads_in_peft_with_equal_logits_and_merge(tmp_path, case):
    tied, parts, indices, carriers = CASES[case]
    base, model, applied, ours = _trained(tied, parts)
    assert (ours - _logits(_fresh(tied, base))).abs().max() > 1e-3  # training changed the model
    assert peft_export_problems(applied) == []
    out = export_peft(applied, tmp_path / "adapter", base_model_name_or_path="tiny/resized")

    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["trainable_token_indices"] == indices
    assert cfg["modules_to_save"] is None
    tensors = load_file(str(out / "adapter_model.safetensors"))
    for name in carriers:
        rows = model.get_submodule(name).new_rows_weight
        torch.testing.assert_close(tensors[DELTA.format(name)], rows.detach(), rtol=0, atol=0)
    assert sorted(k for k in tensors if "token_adapter" in k) == sorted(
        DELTA.format(n) for n in carriers
    )
    readme = (out / "README.md").read_text()
    assert f"vocab_size={VOCAB}" in readme and "resize" in readme

    # PEFT on the resized base: the same model as ours.
    peft_model = PeftModel.from_pretrained(_fresh(tied, base), str(out)).eval()
    torch.testing.assert_close(_logits(peft_model), ours, rtol=0, atol=1e-5)
    # merge_and_unload equals our merged export, tensor by tensor (and in logits).
    merged_dir = export_merged(applied, tmp_path / "merged")
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(merged_dir)).eval()
    unloaded = peft_model.merge_and_unload().eval()
    ref_sd, got_sd = ref.state_dict(), unloaded.state_dict()
    assert ref_sd.keys() == got_sd.keys()
    for k in ref_sd:
        torch.testing.assert_close(got_sd[k], ref_sd[k], rtol=0, atol=1e-6, msg=k)
    torch.testing.assert_close(_logits(unloaded), ours, rtol=0, atol=1e-5)


def test_rows_the_adapter_carries_do_not_depend_on_the_base_init_of_new_rows(tmp_path):
    """PEFT's trainable tokens replace rows (not add a delta): a base resized with another init of
    the new rows gives the same logits when the adapter carries every new row."""
    tied, parts, _, _ = CASES["untied-both"]
    base, _model_, applied, ours = _trained(tied, parts)
    out = export_peft(applied, tmp_path / "a")
    other = dict(base)
    g = torch.Generator().manual_seed(9)
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        other[k] = base[k].clone()
        other[k][FROM:] = torch.randn(other[k][FROM:].shape, generator=g)
    peft_model = PeftModel.from_pretrained(_fresh(tied, other), str(out)).eval()
    torch.testing.assert_close(_logits(peft_model), ours, rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_through_peft_plan_and_load(tmp_path, case):
    tied, parts, _, _ = CASES[case]
    base, _m, applied, ours = _trained(tied, parts)
    out = export_peft(applied, tmp_path / "a")
    fresh = _fresh(tied, base)
    plan = peft_plan(fresh, out)
    want = applied.plan
    assert plan.embeddings == want.embeddings
    if not tied:
        assert plan.lm_head == want.lm_head
    applied2 = apply_plan(fresh, plan, log=False)
    loaded = load_peft_adapter(applied2, out)
    assert any(n.endswith("new_rows_weight") for n in loaded)
    torch.testing.assert_close(_logits(fresh), ours, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "tied, form", [(True, "list"), (True, "dict"), (False, "dict")],
    ids=["tied-list", "tied-dict", "untied-dict"],
)
def test_peft_written_trainable_tokens_load_into_a_plan(tmp_path, tied, form):
    """An adapter PEFT itself saved with trainable_token_indices (a tail of rows; LoRA with a
    trained B) loads into the plan peft_plan builds: our logits equal PEFT's. With a tied head
    and the dict form naming both modules, PEFT saves the embedding's rows only."""
    model = _model(tied)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    tti = (
        list(range(FROM, VOCAB))
        if form == "list"
        else {"embed_tokens": list(range(FROM, VOCAB)), "lm_head": list(range(FROM, VOCAB))}
    )
    pm = get_peft_model(
        model,
        LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], trainable_token_indices=tti
        ),
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n or "trainable_tokens_delta" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pm.eval()
    want = _logits(pm)
    pm.save_pretrained(str(tmp_path / "p"))
    fresh = _fresh(tied, base)
    plan = peft_plan(fresh, tmp_path / "p")
    assert plan.embeddings.name == "new_rows" and plan.embeddings.options.from_id == FROM
    applied = apply_plan(fresh, plan, log=False)
    load_peft_adapter(applied, tmp_path / "p")
    torch.testing.assert_close(_logits(fresh), want, rtol=0, atol=1e-5)


def test_vllm_compatibility_names_the_trainable_tokens():
    _b, _m, applied, _ = _trained(False, CASES["untied-both"][1])
    problems = vllm_compatibility(applied, max_lora_rank=8)
    assert len(problems) == 1, problems
    assert "trainable_token_indices" in problems[0] and "merged" in problems[0]
    _b, _m, plain, _ = _trained(False, "embeddings:freeze")
    assert vllm_compatibility(plain, max_lora_rank=8) == []


@pytest.mark.slow
def test_cli_export_peft_carries_the_new_rows(tmp_path, capsys):
    """`layerfreeze export --format peft` on a save_trainable directory of a new-rows plan."""
    from layerfreeze.cli import main as cli_main
    from layerfreeze.export import save_trainable

    tied, parts, indices, _ = CASES["untied-both"]
    base, _m, applied, ours = _trained(tied, parts)
    fresh = _fresh(tied, base)
    fresh.save_pretrained(str(tmp_path / "base"))
    save_trainable(applied, tmp_path / "run")
    rc = cli_main(
        [
            "export",
            "--model",
            str(tmp_path / "base"),
            "--adapter-dir",
            str(tmp_path / "run"),
            "--format",
            "peft",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert rc == 0
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["trainable_token_indices"] == indices
    peft_model = PeftModel.from_pretrained(_fresh(tied, base), str(tmp_path / "out")).eval()
    torch.testing.assert_close(_logits(peft_model), ours, rtol=0, atol=1e-5)


def test_scaled_embedding_new_rows_keep_the_scale_and_match_peft(tmp_path):
    """Gemma3 scales its embedding output by embed_scale inside the module; the new rows must be
    scaled too (PEFT's trainable tokens apply embed_scale): the model is unchanged at apply time,
    and after training PEFT's model equals ours."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                           vocab_size=VOCAB)
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(cfg).eval()
    assert model.get_input_embeddings().embed_scale != 1
    base = {k: v.clone() for k, v in model.state_dict().items()}
    before = _logits(model)
    applied = apply_plan(model, f"0-1:lora(r=2,alpha=4,target=[q_proj]),"
                                f"embeddings:new_rows(from_id={FROM})", log=False)
    torch.testing.assert_close(_logits(model), before, rtol=0, atol=0)
    _train(model, applied, steps=2)
    ours = _logits(model)
    out = export_peft(applied, tmp_path / "a")
    fresh = Gemma3ForCausalLM(cfg).eval()
    fresh.load_state_dict(base)
    peft_model = PeftModel.from_pretrained(fresh, str(out)).eval()
    torch.testing.assert_close(_logits(peft_model), ours, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_vllm_refuses_the_trainable_tokens_as_vllm_compatibility_says(tmp_path):
    """vLLM's own LoRA loader (0.33, CPU child process, tests/helpers/vllm_lora.py) on our
    export of LoRA + new rows: refused on the trainable-token tensors, as vllm_compatibility
    reports (vllm-project/vllm#36501)."""
    import os

    from tests.helpers.vllm_lora import VllmUnavailable, run_vllm_lora_jobs, vllm_missing

    def unavailable(why):
        if os.environ.get("LAYERFREEZE_WITH_VLLM") == "1":
            pytest.fail(f"LAYERFREEZE_WITH_VLLM=1 but vLLM's LoRA loader is not available: {why}")
        pytest.skip(f"vLLM's LoRA loader is not available: {why}")

    if vllm_missing():
        unavailable(vllm_missing())
    _b, model, applied, _ = _trained(False, CASES["untied-both"][1])
    assert any("vllm-project/vllm#36501" in p for p in vllm_compatibility(applied, 8))
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(tmp_path / "base")
    export_peft(applied, tmp_path / "adapter")
    job = {"model_dir": str(tmp_path / "base"), "adapter_dir": str(tmp_path / "adapter"),
           "max_lora_rank": 8, "out": str(tmp_path / "t.safetensors"), "lora_dtype": "auto"}
    try:
        res = run_vllm_lora_jobs([job], tmp_path / "child")["jobs"][0]
    except VllmUnavailable as e:
        unavailable(str(e))
    assert res["status"] == "refused", res
    assert "token_adapter.trainable_tokens_delta is unsupported LoRA weight" in res["error"], res
