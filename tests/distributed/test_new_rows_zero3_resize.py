"""resize_for_new_tokens on a model loaded under ZeRO-3 (partitioned at load through a live
HfDeepSpeedConfig) on 2 gloo ranks: the gathered result equals the formula applied to the
gathered weights taken before the resize, and old rows are bit-identical."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.dist import run_distributed

pytestmark = pytest.mark.slow


def _body(rank: int, world: int, old_dir: str, new_dir: str, tied: bool) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations import HfDeepSpeedConfig

    from layerfreeze.engines.partition import gathered, is_partition_managed
    from layerfreeze.vocab_resize import resize_for_new_tokens
    from tests.helpers.tiny_models import tiny_config

    ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    keep = HfDeepSpeedConfig(ds)  # noqa: F841  (transformers' ZeRO-3 switch lives while it does)
    old, new = AutoTokenizer.from_pretrained(old_dir), AutoTokenizer.from_pretrained(new_dir)
    cfg = tiny_config("llama", num_layers=2, hidden=32, num_heads=2, num_kv_heads=1,
                      vocab_size=len(old), tie_word_embeddings=tied)
    model = AutoModelForCausalLM.from_config(cfg)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert is_partition_managed(emb.weight)
    with gathered([emb.weight, head.weight]):
        before = {"emb": emb.weight.detach().clone(), "head": head.weight.detach().clone()}
    report = resize_for_new_tokens(model, old, new)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    with gathered([emb.weight, head.weight]):
        after = {"emb": emb.weight.detach().clone(), "head": head.weight.detach().clone()}
    return {"before": before, "after": after, "report": report,
            "same_object": head.weight is emb.weight}


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_zero3_resize_matches_the_formula(tmp_path, tied):
    from transformers import AutoTokenizer

    from layerfreeze.data.vocab_extend import extend_tokenizer
    from tests.helpers.tokenizer_fixtures import build_llama2_style, bundled

    base = build_llama2_style(tmp_path / "base")
    extend_tokenizer(base, [bundled("zh.txt")], tmp_path / "out", vocab_size=900, max_new=20)
    old = AutoTokenizer.from_pretrained(str(base))
    new = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    n_old, n_new = len(old), len(new)
    res = run_distributed(_body, world_size=2, args=(str(base), str(tmp_path / "out"), tied))
    for out in res:
        b, a = out["before"], out["after"]
        assert a["emb"].shape[0] == n_new and a["head"].shape[0] == n_new
        assert out["same_object"] == tied and out["report"].tied == tied
        assert torch.equal(a["emb"][:n_old], b["emb"]) and torch.equal(a["head"][:n_old], b["head"])
        for i in range(n_old, n_new):
            text = new.convert_tokens_to_string([new.convert_ids_to_tokens(i)])
            ids = old(text, add_special_tokens=False)["input_ids"]
            for key in ("emb", "head"):
                exp = sum(b[key][j].double() for j in ids) / len(ids)
                torch.testing.assert_close(a[key][i].double(), exp, rtol=0, atol=1e-6)
    assert torch.equal(res[0]["after"]["emb"], res[1]["after"]["emb"])
