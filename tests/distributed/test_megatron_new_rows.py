"""Resize + ``new_rows`` on the megatron engine (layerfreeze/engines/megatron/new_rows.py), real
megatron-core on gloo.

A tiny Llama is resized to an extended SentencePiece tokenizer on the Hugging Face side
(:func:`layerfreeze.vocab_resize.resize_for_new_tokens`) and converted to megatron's
vocabulary-parallel ``GPTModel`` (padded to a multiple of 128 x TP). Expected values come from
independent code: the sub-token-mean formula written here from the tokenizers, and the Hugging
Face model with the same plan trained by ``torch.optim.AdamW`` in this process (the reference
for every megatron loss and trained row).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from tests.helpers.dist import run_distributed

CPU = {"use_cpu_initialization": True}
LR, WD, STEPS = 2e-2, 0.1, 3


def _tokenizers(tmp_path):
    from transformers import AutoTokenizer

    from layerfreeze.data.vocab_extend import extend_tokenizer
    from tests.helpers.tokenizer_fixtures import build_llama2_style, bundled

    base = build_llama2_style(tmp_path / "base")
    extend_tokenizer(base, [bundled("zh.txt")], tmp_path / "ext", vocab_size=900, max_new=21)
    return AutoTokenizer.from_pretrained(str(base)), AutoTokenizer.from_pretrained(
        str(tmp_path / "ext")
    )


def _resized(old, new, tied: bool):
    """(HF model before resize, HF model after ``resize_for_new_tokens``, report)."""
    from transformers import AutoModelForCausalLM

    from layerfreeze.vocab_resize import resize_for_new_tokens
    from tests.helpers.tiny_models import tiny_config

    torch.manual_seed(0)
    cfg = tiny_config("llama", num_layers=2, hidden=32, num_heads=4, num_kv_heads=2,
                      vocab_size=len(old), tie_word_embeddings=tied)
    before = AutoModelForCausalLM.from_config(cfg)
    after = copy.deepcopy(before)
    report = resize_for_new_tokens(after, old, new)
    return before, after, report


def _plan(first: int) -> str:
    return f"0:full,embeddings:new_rows(from_id={first}),lm_head:new_rows(from_id={first})"


def _batch(vocab: int, first: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, vocab, (2, 12), generator=g)
    ids[:, ::3] = torch.randint(first, vocab, (2, 4), generator=g)  # new tokens in every row
    return ids


def _hf_reference(hf, plan: str, ids: torch.Tensor) -> dict:
    """Per-token losses at init and the AdamW-trained run of the HF model under ``plan``."""
    from layerfreeze import apply_plan

    hf = copy.deepcopy(hf)
    applied = apply_plan(hf, plan)
    labels = ids.roll(-1, 1)
    with torch.no_grad():
        logits = hf(ids).logits.float()
    init = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
    opt = torch.optim.AdamW(
        [{"params": g["params"], "weight_decay": g["weight_decay"]}
         for g in applied.param_groups(LR, WD)], lr=LR)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = hf(ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    applied.merge()
    emb = hf.get_input_embeddings().weight.detach().clone()
    head = hf.get_output_embeddings().weight.detach().clone()
    return {"init": init, "losses": losses, "emb": emb, "head": head}


def _gather_rows(weight: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    world = ps.get_tensor_model_parallel_world_size()
    if world == 1:
        return weight.detach().clone()
    shards = [torch.empty_like(weight) for _ in range(world)]
    dist.all_gather(shards, weight.detach().contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(shards, 0)


def _megatron_run(hf_config, hf_sd, ids, plan, out_dir: str, resume: bool,
                  divisible_by: int = 128, fmt: str = "safetensors",
                  distributed_optimizer: bool = False) -> dict:
    """Convert, check the resized rows, train ``STEPS`` steps under ``plan`` (saving after step
    2), export merged; optionally resume from step 2 in a fresh model and redo step 3."""
    from layerfreeze.engines.megatron import convert as C
    from layerfreeze.engines.megatron.new_rows import record_vocab_size
    from layerfreeze.engines.megatron.provider import apply_megatron_plan
    from layerfreeze.engines.megatron.runner import MegatronRunner
    from layerfreeze.engines.megatron.vocab import mask_padded_vocab
    from tests.helpers.megatron import gather_tp_logits, position_ids

    vocab = int(hf_config.vocab_size)

    def build():
        model = C.build_gpt_from_hf_config(
            hf_config, config_overrides=CPU, make_vocab_size_divisible_by=divisible_by
        )
        C.load_hf_weights(model, hf_sd, hf_config)
        record_vocab_size(model, vocab)
        mask_padded_vocab(model, vocab)
        return model

    model = build()
    tied = model.share_embeddings_and_output_weights
    out: dict = {"padded": int(model.vocab_size), "tied": tied}
    out["emb0"] = _gather_rows(model.embedding.word_embeddings.weight)
    if not tied:
        out["head0"] = _gather_rows(model.output_layer.weight)
    pos, labels = position_ids(ids), ids.roll(-1, 1)
    model.eval()
    with torch.no_grad():
        out["convert_losses"] = model(ids, pos, None, labels=labels).clone()
    model.train()
    applied = apply_megatron_plan(model, plan)
    with torch.no_grad():
        out["init_losses"] = model.eval()(ids, pos, None, labels=labels).clone()
    model.train()

    def runner_for(m, a):
        return MegatronRunner(m, applied=a, lr=LR, weight_decay=WD, clip_grad=0.0,
                              hf_config=hf_config, checkpoint_format=fmt,
                              use_distributed_optimizer=distributed_optimizer)

    runner = runner_for(model, applied)
    out["trainable"] = sorted(applied.trainable_names())
    window = [{"input_ids": ids, "labels": ids}]
    out["losses"] = []
    for step in range(STEPS):
        out["losses"].append(float(runner.train_step(window).loss))
        if step == 1:
            runner.save_checkpoint(f"{out_dir}/ckpt")
    out["state"] = runner.optimizer_state_numel()  # summed over ranks
    out["trainable_numel"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    emb = model.embedding.word_embeddings
    out["emb_after"] = _gather_rows(emb.weight)
    out["emb_new"] = emb.new_rows_weight.detach().clone()
    if not tied:
        out["head_after"] = _gather_rows(model.output_layer.weight)
        out["head_new"] = model.output_layer.new_rows_weight.detach().clone()
    model.eval()
    with torch.no_grad():
        out["trained_logits"] = gather_tp_logits(model(ids, pos, None))[..., :vocab].clone()
    model.train()
    runner.export_merged(f"{out_dir}/export")
    # the export merged and unmerged: the live shards are untouched
    assert torch.equal(_gather_rows(emb.weight), out["emb_after"])
    runner.close(destroy_model_parallel=False)
    if resume:
        m2 = build()
        a2 = apply_megatron_plan(m2, plan)
        r2 = runner_for(m2, a2)
        r2.load_checkpoint(f"{out_dir}/ckpt")
        out["resumed_loss"] = float(r2.train_step(window).loss)
        out["resumed_emb_new"] = m2.embedding.word_embeddings.new_rows_weight.detach().clone()
        r2.close(destroy_model_parallel=False)
    return out


_SUBS: dict[int, list[int]] = {}


def out_subs(report) -> dict[int, list[int]]:
    assert len(_SUBS) == report.initialised - len(report.fallback_to_mean) > 0
    return _SUBS


def _tokenizers_and_subs(tmp_path):
    """The tokenizers, and each new id's old sub-token ids (``_SUBS``)."""
    old, new = _tokenizers(tmp_path)
    _SUBS.clear()
    for i in range(len(old), len(new)):
        sub = old.encode(new.decode([i]), add_special_tokens=False)
        if sub:
            _SUBS[i] = sub
    return old, new


def _check_state(res: list[dict]) -> None:
    """Optimizer state exists for the trainable parameters only (old rows have none)."""
    total = sum(o["trainable_numel"] for o in res)
    assert res[0]["state"]["master"] == total
    assert res[0]["state"]["exp_avg"] == total == res[0]["state"]["exp_avg_sq"]


def _check(out: dict, ref: dict, before, after, report, multiple: int, export_dir) -> None:
    from transformers import AutoModelForCausalLM

    n_old, n_new, hidden = report.first_new_id, report.new_rows, after.config.hidden_size
    tied = out["tied"]
    assert out["padded"] % multiple == 0 and out["padded"] > n_new
    # 1. resize + conversion: old rows bit-identical, new rows = the HF resize, padding zero
    for key, w in (("emb0", after.get_input_embeddings().weight),
                   ("head0", after.get_output_embeddings().weight)):
        if key not in out:
            continue
        got = out[key]
        assert torch.equal(got[:n_new], w.detach())
        assert bool((got[n_new:] == 0).all())
        old_w = (before.get_input_embeddings() if key == "emb0"
                 else before.get_output_embeddings()).weight.detach()
        assert torch.equal(got[:n_old], old_w)
    # new rows: the mean of the old rows of the string's old sub-tokens (the formula, here)
    for i, sub in out_subs(report).items():
        want = out["emb0"][sub].float().mean(0)
        torch.testing.assert_close(out["emb0"][i].float(), want, rtol=0, atol=1e-6)
        if "head0" in out:
            torch.testing.assert_close(out["head0"][i].float(), out["head0"][sub].float().mean(0),
                                       rtol=0, atol=1e-6)
    # per-token losses of the converted (padded, masked) model = the resized HF model's
    torch.testing.assert_close(out["convert_losses"], ref["init"], rtol=0, atol=1e-5)
    # 2. new_rows: same per-token losses at init as the HF model with the same plan
    torch.testing.assert_close(out["init_losses"], ref["init"], rtol=0, atol=1e-5)
    names = [n for n in out["trainable"] if "new_rows_weight" in n]
    assert names == (["embedding.word_embeddings.new_rows_weight"] if tied else
                     ["embedding.word_embeddings.new_rows_weight", "output_layer.new_rows_weight"])
    assert not any(n.endswith("word_embeddings.weight") or n == "output_layer.weight"
                   for n in out["trainable"])
    # the new rows only: rows n_old .. n_new - 1, never the padding
    assert out["emb_new"].shape == (n_new - n_old, hidden)
    # training equals the HF reference (AdamW, decay on the new rows)
    assert out["losses"] == pytest.approx(ref["losses"], abs=2e-5)
    emb = out["emb_after"]
    assert torch.equal(emb[:n_old], out["emb0"][:n_old])          # old rows bit-identical
    assert bool((emb[n_new:] == 0).all())                          # padding never trained
    assert torch.equal(emb[n_old:n_new], out["emb0"][n_old:n_new])  # full weight frozen
    torch.testing.assert_close(out["emb_new"], ref["emb"][n_old:], rtol=0, atol=1e-5)
    assert (out["emb_new"] - out["emb0"][n_old:n_new]).abs().min() > 0  # every new row moved
    if not tied:
        assert torch.equal(out["head_after"][:n_new], out["head0"][:n_new])
        torch.testing.assert_close(out["head_new"], ref["head"][n_old:], rtol=0, atol=1e-5)
    # HF export = the merged model: rows in place, same logits as the trained megatron model
    exported = AutoModelForCausalLM.from_pretrained(str(export_dir)).float().eval()
    w = exported.get_input_embeddings().weight.detach()
    assert w.shape[0] == n_new
    assert torch.equal(w[:n_old], out["emb0"][:n_old])
    assert torch.equal(w[n_old:], out["emb_new"])
    if not tied:
        h = exported.get_output_embeddings().weight.detach()
        assert torch.equal(h[:n_old], out["head0"][:n_old]) and torch.equal(h[n_old:],
                                                                            out["head_new"])
    return exported


def _logits_equal(exported, ids, trained_logits) -> None:
    with torch.no_grad():
        logits = exported(ids).logits.float()
    torch.testing.assert_close(logits, trained_logits, rtol=0, atol=1e-4)


def test_tp1_resize_then_new_rows_matches_hf(tp1, tmp_path):
    old, new = _tokenizers_and_subs(tmp_path)
    before, after, report = _resized(old, new, tied=False)
    ids = _batch(len(new), len(old))
    plan = _plan(report.first_new_id)
    ref = _hf_reference(after, plan, ids)
    out = _megatron_run(after.config, after.state_dict(), ids, plan, str(tmp_path), resume=True)
    exported = _check(out, ref, before, after, report, 128, tmp_path / "export")
    _check_state([out])
    _logits_equal(exported, ids, out["trained_logits"])
    assert out["resumed_loss"] == out["losses"][2]
    assert torch.equal(out["resumed_emb_new"], out["emb_new"])


def _tp2_body(rank, world, hf_config, hf_sd, ids, plan, out_dir, divisible_by, fmt):
    from tests.helpers.megatron import megatron_parallel

    with megatron_parallel(tp=2, pp=1):
        return _megatron_run(hf_config, hf_sd, ids, plan, out_dir, resume=True,
                             divisible_by=divisible_by, fmt=fmt)


# Vocabulary 621 (600 old + 21 new). divisible_by=608 pads to 1216 at TP=2: rank 0 holds rows
# 0-607, rank 1 rows 608-1215, so the new rows 600-620 straddle the two shards. 128 pads to 768:
# every new row on rank 1 (rank 0 holds none, its hooks still join the collectives). The
# untied run saves and resumes with checkpoint.format: dist (megatron-core dist_checkpointing:
# the embedding's sharded_state_dict carries new_rows_weight), the others with safetensors.
@pytest.mark.slow
@pytest.mark.parametrize(
    "tied,divisible_by,fmt",
    [(False, 608, "dist"), (True, 608, "safetensors"), (True, 128, "safetensors")],
    ids=["untied-straddling-dist", "tied-straddling", "tied-rank1-only"],
)
def test_tp2_resize_then_new_rows_matches_hf(tmp_path, tied, divisible_by, fmt):
    old, new = _tokenizers_and_subs(tmp_path)
    before, after, report = _resized(old, new, tied=tied)
    ids = _batch(len(new), len(old))
    plan = _plan(report.first_new_id)
    ref = _hf_reference(after, plan, ids)
    res = run_distributed(
        _tp2_body, world_size=2,
        args=(after.config, after.state_dict(), ids, plan, str(tmp_path), divisible_by, fmt),
        timeout=900,
    )
    _check_state(res)
    for out in res:
        exported = _check(out, ref, before, after, report, 2 * divisible_by,
                          tmp_path / "export")
        _logits_equal(exported, ids, out["trained_logits"])
        assert out["resumed_loss"] == out["losses"][2]
        assert torch.equal(out["resumed_emb_new"], out["emb_new"])


def _dp2_body(rank, world, hf_config, hf_sd, ids, plan, out_dir):
    from tests.helpers.megatron import megatron_parallel

    with megatron_parallel(tp=1, pp=1):
        return _megatron_run(hf_config, hf_sd, ids, plan, out_dir, resume=False,
                             distributed_optimizer=True)


@pytest.mark.slow
def test_dp2_distributed_optimizer_new_rows_matches_hf(tmp_path):
    """Two data-parallel replicas (same batch) with megatron's distributed optimizer: the new
    rows' state is sharded over the replicas, the run still equals the HF reference."""
    old, new = _tokenizers_and_subs(tmp_path)
    before, after, report = _resized(old, new, tied=False)
    ids = _batch(len(new), len(old))
    plan = _plan(report.first_new_id)
    ref = _hf_reference(after, plan, ids)
    res = run_distributed(_dp2_body, world_size=2,
                          args=(after.config, after.state_dict(), ids, plan, str(tmp_path)),
                          timeout=900)
    total = res[0]["trainable_numel"]  # every parameter once: the state is split over DP
    assert res[0]["state"]["exp_avg"] == total
    for out in res:
        exported = _check(out, ref, before, after, report, 128, tmp_path / "export")
        _logits_equal(exported, ids, out["trained_logits"])


def _pp2_body(rank, world, hf_config, hf_sd, ids, plan, out_dir):
    """PP=2 (TP=1), untied: the embedding's new rows on stage 0, the head's on stage 1."""
    from megatron.core import parallel_state as ps

    from layerfreeze.engines.megatron import convert as C
    from layerfreeze.engines.megatron.new_rows import record_vocab_size
    from layerfreeze.engines.megatron.runner import MegatronRunner
    from layerfreeze.engines.megatron.vocab import mask_padded_vocab
    from tests.helpers.megatron import megatron_parallel

    vocab = int(hf_config.vocab_size)
    with megatron_parallel(tp=1, pp=2):
        pre, post = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
        model = C.build_gpt_from_hf_config(hf_config, pre, post, config_overrides=CPU,
                                           make_vocab_size_divisible_by=128)
        C.load_hf_weights(model, hf_sd, hf_config)
        record_vocab_size(model, vocab)
        mask_padded_vocab(model, vocab)
        part = model.embedding.word_embeddings if pre else model.output_layer
        w0 = part.weight.detach().clone()
        runner = MegatronRunner(model, plan=plan, lr=LR, weight_decay=WD, clip_grad=0.0,
                                hf_config=hf_config)
        window = [{"input_ids": ids, "labels": ids}]
        losses = [float(runner.train_step(window).loss) for _ in range(STEPS)]
        out = {"stage": "emb" if pre else "head", "losses": losses,
               "old_same": torch.equal(part.weight, w0),
               "new": part.new_rows_weight.detach().clone(),
               "trainable": sorted(runner.applied.trainable_names())}
        runner.export_merged(f"{out_dir}/export")
        runner.close(destroy_model_parallel=False)
        return out


@pytest.mark.slow
def test_pp2_new_rows_matches_hf(tmp_path):
    from transformers import AutoModelForCausalLM

    old, new = _tokenizers_and_subs(tmp_path)
    _before, after, report = _resized(old, new, tied=False)
    ids = _batch(len(new), len(old))
    plan = _plan(report.first_new_id)
    ref = _hf_reference(after, plan, ids)
    res = run_distributed(_pp2_body, world_size=2,
                          args=(after.config, after.state_dict(), ids, plan, str(tmp_path)),
                          timeout=900)
    n_old = report.first_new_id
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export")).float()
    for out in res:
        assert out["losses"] == pytest.approx(ref["losses"], abs=2e-5)
        assert out["old_same"]
        torch.testing.assert_close(out["new"], ref[out["stage"]][n_old:], rtol=0, atol=1e-5)
        assert [n for n in out["trainable"] if "new_rows" in n] == [
            "embedding.word_embeddings.new_rows_weight" if out["stage"] == "emb"
            else "output_layer.new_rows_weight"]
        hf_w = (exported.get_input_embeddings() if out["stage"] == "emb"
                else exported.get_output_embeddings()).weight.detach()
        assert torch.equal(hf_w[:n_old], after.state_dict()[
            "model.embed_tokens.weight" if out["stage"] == "emb" else "lm_head.weight"][:n_old])
        assert torch.equal(hf_w[n_old:], out["new"])


# ---------------------------------------------------------------------------------------------
# `layerfreeze train engine=megatron` (the recipe records the real vocabulary): at TP=2 with a
# 999-token vocabulary (padded to 1000) the new-rows plan logs the DeepSpeed engine's losses.


@pytest.mark.slow
def test_train_cli_tp2_new_rows_losses_equal_deepspeed(tmp_path, eval_data_dir):
    from tests.e2e.test_train_cli import _config, _losses, _train, _write
    from tests.e2e.test_train_megatron import _mconfig, _mtrain

    plan = {"spec": "0:full,embeddings:new_rows(from_id=900),lm_head:new_rows(from_id=900)"}
    common = dict(
        train={"steps": 3, "grad_accum_steps": 1},
        checkpoint={"every_steps": 0, "export_final": False},
    )
    cache = tmp_path / "cache"
    dcfg = _config(tmp_path / "d", cache, plan=plan, logging={"wandb_project": None}, **common)
    dcfg["tokenizer"]["vocab_size"] = 999
    dcfg["model"]["attn_implementation"] = "sdpa"
    proc = _train(_write(tmp_path / "d.yaml", dcfg))
    assert proc.returncode == 0, proc.stderr[-6000:]
    mcfg = _mconfig(tmp_path / "m", cache, 2, 1, eval_data_dir, plan=plan, **common)
    mcfg["tokenizer"]["vocab_size"] = 999
    mcfg["eval"] = {"every_steps": 0, "at_end": False}
    proc = _mtrain(_write(tmp_path / "m.yaml", mcfg))
    assert proc.returncode == 0, proc.stderr[-6000:]
    deepspeed, megatron = _losses(tmp_path / "d"), _losses(tmp_path / "m")
    assert sorted(megatron) == [1, 2, 3]
    assert [megatron[s] for s in (1, 2, 3)] == pytest.approx(
        [deepspeed[s] for s in (1, 2, 3)], rel=1e-5)


# `tokenizer.extend_from` on the Megatron engine: the recipe resizes the Hugging Face model to
# the extended tokenizer (the DeepSpeed engine's rows), converts it at TP=2 (padded past the new
# size) and trains the new rows; step losses equal the DeepSpeed engine's on the same config.


@pytest.mark.slow
def test_train_cli_tp2_extend_from_losses_equal_deepspeed(tmp_path):
    import yaml

    from tests.e2e.test_train_cli import _losses
    from tests.e2e.test_train_megatron import _mtrain
    from tests.faults._train import train, write_config
    from tests.unit.test_tokenizer_extend_train import make_base, run_config

    base = make_base(tmp_path)
    sections = dict(checkpoint={"every_steps": 0, "export_final": False},
                    train={"steps": 3}, model={"attn_implementation": "sdpa"})
    (tmp_path / "d").mkdir()
    dconfig = run_config(tmp_path / "d", base, **sections)
    proc = train(dconfig, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    mcfg = yaml.safe_load(dconfig.read_text())
    mcfg.pop("deepspeed")
    mcfg["engine"] = "megatron"
    mcfg["megatron"] = {"tensor_model_parallel_size": 2}
    mcfg["logging"]["out_dir"] = str(tmp_path / "m" / "run")
    proc = _mtrain(write_config(tmp_path / "m.yaml", mcfg), timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "resized to" in proc.stderr
    n_new = json.loads((tmp_path / "d" / "run" / "tokenizer" / "layerfreeze_vocab_extend.json")
                       .read_text())["new_size"]
    assert f"resized to {n_new} rows" in proc.stderr
    deepspeed, megatron = _losses(tmp_path / "d" / "run"), _losses(tmp_path / "m" / "run")
    assert sorted(megatron) == [1, 2, 3]
    assert [megatron[s] for s in (1, 2, 3)] == pytest.approx(
        [deepspeed[s] for s in (1, 2, 3)], rel=1e-5)


def test_tp1_schedule_freezes_embedding_rows_in_phase_two(tp1):
    """A schedule whose second phase freezes the embedding's new rows (the head's keep
    training): the frozen rows stop, the others move, old rows never change, and the rebuilt
    optimizer holds state for the head's new rows only."""
    from layerfreeze.engines.megatron import convert as C
    from layerfreeze.engines.megatron.new_rows import record_vocab_size
    from layerfreeze.engines.megatron.runner import MegatronRunner
    from tests.helpers.tiny_models import build_tiny_model

    vocab, first = 91, 80
    hf = build_tiny_model("llama", num_layers=2, num_heads=4, num_kv_heads=2, vocab_size=vocab)
    model = C.build_gpt_from_hf_config(hf.config, config_overrides=CPU,
                                       make_vocab_size_divisible_by=4)
    C.load_hf_weights(model, hf.state_dict(), hf.config)
    record_vocab_size(model, vocab)
    rows = f"new_rows(from_id={first})"
    schedule = [{"plan": f"embeddings:{rows},lm_head:{rows}", "until_step": 2},
                {"plan": f"embeddings:freeze,lm_head:{rows}", "until_step": None}]
    runner = MegatronRunner(model, schedule=schedule, lr=LR, weight_decay=WD, clip_grad=0.0)
    emb, head = model.embedding.word_embeddings, model.output_layer
    w0 = (emb.weight.detach().clone(), head.weight.detach().clone())
    ids = _batch(vocab, first)
    window = [{"input_ids": ids, "labels": ids}]
    snaps = []
    for _ in range(4):
        runner.train_step(window)
        snaps.append((emb.new_rows_weight.detach().clone(), head.new_rows_weight.detach().clone()))
    assert runner.phase == 1
    assert not torch.equal(snaps[1][0], emb.weight[first:vocab])   # trained in phase 0
    assert torch.equal(snaps[3][0], snaps[1][0])                    # frozen in phase 1
    assert not torch.equal(snaps[3][1], snaps[1][1])                # the head's keep training
    assert torch.equal(emb.weight, w0[0]) and torch.equal(head.weight, w0[1])
    state = runner.optimizer_state_numel()
    assert state["master"] == state["exp_avg"] == head.new_rows_weight.numel()
    runner.close(destroy_model_parallel=False)
