"""resize_for_new_tokens: a tiny real Llama (tied and untied head) grown to a tokenizer extended
with layerfreeze.data.vocab_extend on the bundled Chinese text; new rows against a separate
computation (another tokenizer path, a weight copy taken before the resize), old rows exact."""

from __future__ import annotations

import pytest
import torch

from layerfreeze.data.vocab_extend import extend_tokenizer
from layerfreeze.vocab_resize import resize_for_new_tokens
from tests.helpers.tiny_models import build_tiny_model
from tests.helpers.tokenizer_fixtures import build_llama2_style, build_qwen_style, bundled

BASES = {"llama2": build_llama2_style, "qwen2": build_qwen_style}


@pytest.fixture(scope="module", params=sorted(BASES))
def tokenizers(request, tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp(request.param)
    base = BASES[request.param](root / "base")
    extend_tokenizer(base, [bundled("zh.txt")], root / "out", vocab_size=900, max_new=40)
    old = AutoTokenizer.from_pretrained(str(base))
    new = AutoTokenizer.from_pretrained(str(root / "out"))
    assert len(new) > len(old)
    return request.param, old, new


def _model(n_vocab: int, tied: bool):
    return build_tiny_model(
        "llama", num_layers=2, hidden=32, num_heads=2, num_kv_heads=1,
        vocab_size=n_vocab, tie_word_embeddings=tied,
    )


def _subtokens(old, new, i: int) -> list[int]:
    # A different path from the module's decode/encode: piece -> string -> __call__.
    text = new.convert_tokens_to_string([new.convert_ids_to_tokens(i)])
    return old(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("init", ["subtoken_mean", "mean"])
def test_new_rows_initialised_old_rows_exact(tokenizers, tied, init):
    _, old, new = tokenizers
    n_old, n_new = len(old), len(new)
    model = _model(n_old, tied)
    emb0 = model.get_input_embeddings().weight.detach().clone()
    head0 = model.get_output_embeddings().weight.detach().clone()

    report = resize_for_new_tokens(model, old, new, init=init)

    emb = model.get_input_embeddings().weight.detach()
    head = model.get_output_embeddings().weight.detach()
    assert emb.shape == (n_new, 32) and head.shape == (n_new, 32)
    assert model.config.vocab_size == n_new
    assert (head.data_ptr() == emb.data_ptr()) == tied
    assert torch.equal(emb[:n_old], emb0) and torch.equal(head[:n_old], head0)
    assert report.first_new_id == n_old and report.initialised == n_new - n_old
    assert report.tied == tied and report.init == init
    for i in range(n_old, n_new):
        if init == "mean":
            ids = list(range(n_old))
        else:
            ids = _subtokens(old, new, i)
            assert ids, f"id {i} has no sub-tokens"
        exp_e = sum(emb0[j].double() for j in ids) / len(ids)
        exp_h = sum(head0[j].double() for j in ids) / len(ids)
        torch.testing.assert_close(emb[i].double(), exp_e, rtol=0, atol=1e-6)
        torch.testing.assert_close(head[i].double(), exp_h, rtol=0, atol=1e-6)
    assert report.fallback_to_mean == (() if init == "subtoken_mean" else tuple(range(n_old, n_new)))


def test_subtokens_are_the_utf8_bytes_for_an_english_only_base(tokenizers):
    """The English-only bases have no Chinese pieces: a new Chinese token's sub-tokens are its
    UTF-8 bytes (byte fallback <0xNN> for SentencePiece, byte-level symbols for BPE)."""
    from layerfreeze.vocab_resize import subtoken_ids

    kind, old, new = tokenizers
    i = next(i for i in range(len(old), len(new)) if "\u4e00" <= new.decode([i]).strip()[:1] <= "\u9fff")
    text = new.decode([i])
    ids = subtoken_ids(old, new, i)
    pieces = old.convert_ids_to_tokens(ids)
    raw = text.strip().encode("utf-8")
    if kind == "llama2":
        byte_pieces = [p for p in pieces if p.startswith("<0x")]
        assert bytes(int(p[3:5], 16) for p in byte_pieces) == raw
    else:
        assert old.convert_tokens_to_string(pieces).encode("utf-8") == text.encode("utf-8")
        assert len(ids) >= len(text.strip())  # no Chinese merges in an English-only BPE


def test_padded_embedding_reuses_rows_without_growing(tokenizers):
    """An embedding already larger than the new vocabulary (padded) keeps its shape; the new
    ids' rows are written, the old ids' and the padding rows past the new vocabulary stay."""
    _, old, new = tokenizers
    n_old, n_new = len(old), len(new)
    model = _model(n_new + 5, tied=False)
    emb0 = model.get_input_embeddings().weight.detach().clone()
    report = resize_for_new_tokens(model, old, new, init="mean")
    emb = model.get_input_embeddings().weight.detach()
    assert emb.shape[0] == n_new + 5 and report.new_rows == n_new + 5
    assert torch.equal(emb[:n_old], emb0[:n_old]) and torch.equal(emb[n_new:], emb0[n_new:])
    torch.testing.assert_close(emb[n_old], emb0[:n_old].mean(0), rtol=0, atol=1e-6)


# ----------------------------------------------------------------- plan part new_rows(from_id=)

FROM = 100
VOCAB = 128


def _train(model, applied, steps=3, wd=0.1):
    opt = torch.optim.AdamW(applied.param_groups(lr=1e-2, weight_decay=wd))
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        # Every batch mixes old and new ids, so old rows would move if they were trained.
        ids = torch.randint(0, VOCAB, (2, 12), generator=gen)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("layers", ["0:full", "1:lora(r=4)"])
def test_only_new_rows_train_and_only_they_hold_adam_state(tied, layers):
    from layerfreeze.apply import apply_plan

    model = _model(VOCAB, tied)
    model.train()
    emb0 = model.get_input_embeddings().weight.detach().clone()
    head0 = model.get_output_embeddings().weight.detach().clone()
    plan = f"{layers},embeddings:new_rows(from_id={FROM}),lm_head:new_rows(from_id={FROM})"
    applied = apply_plan(model, plan, log=False)
    opt = _train(model, applied)

    n_new, hidden = VOCAB - FROM, 32
    row_params = [n for n in applied.trainable_names() if n.endswith("new_rows_weight")]
    assert len(row_params) == (1 if tied else 2)
    # Adam moments: exp_avg + exp_avg_sq of new rows x hidden per trained matrix, nothing else
    # of the embedding / head.
    params = dict(model.named_parameters())
    state_numel = sum(
        t.numel() for n in row_params for k, t in opt.state[params[n]].items() if k != "step"
    )
    assert state_numel == len(row_params) * 2 * n_new * hidden
    emb_w, head_w = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert emb_w not in opt.state and head_w not in opt.state
    # The full matrices did not move at all (old rows bit-identical); the new rows did.
    assert torch.equal(emb_w.detach(), emb0) and torch.equal(head_w.detach(), head0)
    for n in row_params:
        base = emb0 if "embed" in n else head0
        assert not torch.equal(params[n].detach(), base[FROM:])
    # Weight decay reaches the trained rows only (their group carries it).
    groups = [g for g in opt.param_groups if any(p is params[row_params[0]] for p in g["params"])]
    assert groups[0]["weight_decay"] == 0.1

    # Merged export: the full matrix with the trained rows in place, old rows untouched; a plain
    # model loaded from the merged base state dict gives the same logits.
    from layerfreeze.apply import base_state_dict

    ids = torch.tensor([[1, 5, FROM, VOCAB - 1, 50, FROM + 3]])
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits
    applied.merge()
    merged = base_state_dict(model)
    emb_key = next(k for k in merged if k.endswith("embed_tokens.weight"))
    assert torch.equal(merged[emb_key][:FROM], emb0[:FROM])
    emb_rows = next(params[n] for n in row_params if "embed" in n)
    assert torch.equal(merged[emb_key][FROM:], emb_rows.detach())
    if not tied:
        head_rows = next(params[n] for n in row_params if "lm_head" in n)
        assert torch.equal(merged["lm_head.weight"][:FROM], head0[:FROM])
        assert torch.equal(merged["lm_head.weight"][FROM:], head_rows.detach())
    plain = _model(VOCAB, tied)
    missing, unexpected = plain.load_state_dict(
        {k: v for k, v in merged.items() if "lora" not in k}, strict=False
    )
    assert not unexpected
    if layers.startswith("0"):  # full layer: nothing unmerged, the plain model is the export
        with torch.no_grad():
            torch.testing.assert_close(plain(input_ids=ids).logits, want, rtol=0, atol=1e-5)
    applied.unmerge()
    assert torch.equal(model.get_input_embeddings().weight.detach(), emb0)


def test_new_rows_plan_grammar():
    from layerfreeze.errors import ConfigError
    from layerfreeze.plan import LayerPlan

    p = LayerPlan.parse("0:full,embeddings:new_rows(from_id=7),lm_head:new_rows(from_id=7)")
    assert LayerPlan.parse(p.to_dict()) == p and LayerPlan.parse(str(p)) == p
    assert p.embeddings.options.from_id == 7
    for text, match in [
        ("embeddings:new_rows", r"from_id: required key is missing"),
        ("embeddings:new_rows(from_id=-1)", r"from_id: must be the first new token id"),
        ("final_norm:new_rows(from_id=3)", r"policy must be one of freeze, full for this part"),
        ("0-1:new_rows(from_id=3)", r"applies to the embeddings / lm_head parts only"),
        ("default:new_rows(from_id=3)", r"applies to the embeddings / lm_head parts only"),
    ]:
        with pytest.raises(ConfigError, match=match):
            LayerPlan.parse(text)


def test_docs_example_runs(repo_root, tokenizers):
    """The python block of docs/plans.md "New vocabulary rows" runs and gives a plan that applies."""
    import re

    from layerfreeze.apply import apply_plan

    doc = (repo_root / "docs" / "plans.md").read_text(encoding="utf-8")
    section = doc.split("## New vocabulary rows", 1)[1].split("\n## ", 1)[0]
    code = re.findall(r"```python\n(.*?)```", section, re.S)[0]
    _, old, new = tokenizers
    model = build_tiny_model("llama", num_layers=4, hidden=32, num_heads=2, num_kv_heads=1,
                             vocab_size=len(old))
    ns = {"model": model, "old_tokenizer": old, "new_tokenizer": new}
    exec(code, ns)
    applied = apply_plan(model, ns["plan"], log=False)
    assert "model.embed_tokens.new_rows_weight" in applied.trainable_names()
    assert model.get_input_embeddings().new_rows_weight.shape == (len(new) - len(old), 32)


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_export_merged_is_a_plain_checkpoint_with_the_trained_rows(tmp_path, tied, streamed):
    """export_merged (whole, and streamed one layer group at a time as under ZeRO-3): new rows
    fold into the full matrices, no sidecar is needed, a plain AutoModelForCausalLM load gives
    the trained model's logits, the model is left unmerged."""
    from contextlib import nullcontext

    from transformers import AutoModelForCausalLM

    from layerfreeze.apply import apply_plan
    from layerfreeze.export import export_merged

    model = _model(VOCAB, tied).train()
    emb0 = model.get_input_embeddings().weight.detach().clone()
    applied = apply_plan(model, f"0:full,embeddings:new_rows(from_id={FROM}),"
                                f"lm_head:new_rows(from_id={FROM})", log=False)
    _train(model, applied)
    model.eval()
    ids = torch.tensor([[1, 5, FROM, VOCAB - 1, 50, FROM + 3]])
    with torch.no_grad():
        want = model(input_ids=ids).logits
    gather = (lambda names: nullcontext()) if streamed else None
    out = export_merged(applied, tmp_path / "exp", gather=gather)
    cfg = (out / "config.json").read_text()
    from safetensors.torch import load_file

    assert "auto_map" not in cfg and "layerfreeze" not in cfg
    assert load_file(str(out / "layerfreeze_sidecar.safetensors")) == {}
    plain = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert len(plain.get_input_embeddings()._forward_hooks) == 0
    torch.testing.assert_close(plain.get_input_embeddings().weight[:FROM], emb0[:FROM], rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, want, rtol=0, atol=1e-5)
    assert torch.equal(model.get_input_embeddings().weight.detach(), emb0)  # unmerged again


def test_save_and_load_trainable_restores_the_new_rows(tmp_path):
    """save_trainable / load_trainable (the resume path's trainable state) round-trip the
    new rows onto a fresh base model: same logits, old rows still the base's."""
    from layerfreeze.apply import apply_plan
    from layerfreeze.export import load_trainable, save_trainable

    plan = f"1:full,embeddings:new_rows(from_id={FROM}),lm_head:new_rows(from_id={FROM})"
    model = _model(VOCAB, False).train()
    applied = apply_plan(model, plan, log=False)
    _train(model, applied)
    model.eval()
    ids = torch.tensor([[1, 5, FROM, VOCAB - 1, 50, FROM + 3]])
    with torch.no_grad():
        want = model(input_ids=ids).logits
    save_trainable(applied, tmp_path / "t")
    fresh = _model(VOCAB, False).eval()
    emb0 = fresh.get_input_embeddings().weight.detach().clone()
    loaded = load_trainable(fresh, tmp_path / "t")
    assert "lm_head.new_rows_weight" in loaded.trainable_names()
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, want, rtol=0, atol=0)
    assert torch.equal(fresh.get_input_embeddings().weight.detach(), emb0)


def test_schedule_switch_new_rows_then_freeze():
    """A schedule phase with embeddings new_rows, then one with embeddings frozen: the rows move
    in the first phase only; a layer trained in both phases keeps training."""
    from layerfreeze.apply import apply_plan

    model = _model(VOCAB, False).train()
    p0 = f"0:full,embeddings:new_rows(from_id={FROM})"
    p1 = "0:full"
    applied = apply_plan(model, p0, install=[p1], log=False)
    rows = model.get_input_embeddings().new_rows_weight
    start = rows.detach().clone()
    _train(model, applied, steps=2)
    after0 = rows.detach().clone()
    assert not torch.equal(after0, start)
    applied.switch_plan(p1)
    assert not rows.requires_grad
    q0 = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    _train(model, applied, steps=2)
    assert torch.equal(rows.detach(), after0)
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight.detach(), q0)
