"""layerfreeze's PEFT export loaded by vLLM's own LoRA loading code (vLLM 0.33, on CPU).

For each plan the adapter is written by :func:`export_peft` and loaded in a child process
(tests/helpers/vllm_lora.py) by vLLM's real ``WorkerLoRAManager`` on vLLM's real model class
for the same HF config: ``PEFTHelper.from_local_dir`` + ``validate_legal``,
``LoRAModel.from_local_checkpoint`` (expected modules from the model's LoRA manager), packing
into ``qkv_proj`` / ``gate_up_proj`` and activation into the LoRA layers. Checked here:

* the A/B tensors vLLM read equal ours, module by module, with our rank and ``alpha / r``
  (also cast under ``--lora-dtype bfloat16``);
* every vLLM LoRA linear computes our update ``(alpha / r) x A^T B^T`` (zero where we have
  none), through vLLM's CPU punica ops: so the packing order and the scale are right;
* :func:`vllm_compatibility`'s verdict agrees with vLLM's (both load, or both refuse), and
  its tables (:data:`VLLM_LORA_MODULES`, :data:`VLLM_MAX_LORA_RANKS`) equal vLLM's; the one
  disagreement (vLLM 0.33 also serves differing ``alpha / r``) is pinned by a test.

Not covered on CPU: a whole-model forward (vLLM's CPU attention backend calls
``torch.ops._C`` kernels, which the CUDA wheel does not build; not attempted), bfloat16 base
weights (their CPU weight packing fails on the missing ``_C.convert_weight_packed``), tensor
parallelism.

vLLM is not in the project's environment (its wheel pins a CUDA torch); ``launch/setup_env.sh``
installs it into a separate ``--target`` directory when ``LAYERFREEZE_WITH_VLLM=1``. Without it
these tests skip, saying so. One child process loads every case (~1 minute on 2 cores).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from layerfreeze import apply_plan
from layerfreeze.interop.peft import (
    VLLM_LORA_MODULES,
    VLLM_MAX_LORA_RANKS,
    export_peft,
    vllm_compatibility,
)
from layerfreeze.policies.lora import iter_lora_adapters
from tests.helpers.tiny_models import build_matrix_model, build_tiny_model
from tests.helpers.vllm_lora import VllmUnavailable, run_vllm_lora_jobs, vllm_missing

pytestmark = pytest.mark.slow  # one vLLM child process (import alone is ~15 s)

#: case -> (family, plan, vLLM's --max-lora-rank). Tiny families come from build_tiny_model,
#: the others from the family matrix (build_matrix_model).
CASES: dict[str, tuple[str, str, int]] = {
    # rank_pattern (r=4 / r=2, same alpha / r), different targets per layer (full names)
    "llama": (
        "llama",
        "0-1:lora(r=4,alpha=8,target=mlp),2-3:lora(r=2,alpha=4,target=[q_proj,v_proj])",
        8,
    ),
    # short target names + layers_to_transform; Qwen2's q/k/v have biases
    "qwen2": ("qwen2", "1-2:lora(r=4,alpha=16,target=attn)", 8),
    # the other model types VLLM_LORA_MODULES lists, every linear adapted
    "mistral": ("mistral", "all:lora(r=4,alpha=8)", 8),
    "qwen3": ("qwen3", "all:lora(r=4,alpha=8)", 8),
    "gemma": ("gemma", "all:lora(r=4,alpha=8)", 8),
    "gemma2": ("gemma2", "all:lora(r=4,alpha=8)", 8),
    # refused by both: the rank exceeds the server's max_lora_rank
    "rank_over_max": ("llama", "all:lora(r=16,alpha=16)", 8),
    # refused by both: vLLM's GPT-2 has no LoRA support (ours: model type not checked)
    "gpt2": ("gpt2", "all:lora(r=4)", 8),
    # ours refuses (alpha / r differs); vLLM 0.33 reads rank_pattern / alpha_pattern
    "ratio_differs": ("llama", "0-1:lora(r=8,alpha=16),2-3:lora(r=4,alpha=16)", 8),
    # --lora-dtype bfloat16: vLLM casts the float32 export
    "llama_bf16": ("llama", "all:lora(r=4,alpha=8)", 8),
    # the export's lora_alpha doubled by hand after export_peft: the comparison must see it
    "tampered_alpha": ("llama", "all:lora(r=4,alpha=8)", 8),
}
_LORA_DTYPE = {"llama_bf16": "bfloat16"}
_TINY = {"llama", "qwen2", "gpt2"}

#: vLLM's LoRA-capable modules that a layerfreeze plan never adapts (outside the blocks).
_NON_BLOCK = {"embed_tokens", "lm_head"}


def _build(family: str) -> torch.nn.Module:
    if family in _TINY:
        return build_tiny_model(family, num_layers=4)
    return build_matrix_model(family)


def _randomize_lora(model: torch.nn.Module, seed: int) -> None:
    """Trained-looking adapters: random non-zero A and B."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("lora_a", "lora_b")):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


def _adapters(applied) -> dict:
    """Qualified module name -> layerfreeze LoRA adapter."""
    return {
        f"{layer.name}.{path}": adapter
        for layer in applied.layout.layers
        for path, _base, adapter in iter_lora_adapters(layer.module)
    }


def _unavailable(why: str) -> None:
    """Skip, unless the test command installed vLLM (tests/run.sh sets LAYERFREEZE_WITH_VLLM=1
    by default): then a missing or broken vLLM is a failure, not a silent skip in CI."""
    if os.environ.get("LAYERFREEZE_WITH_VLLM") == "1":
        pytest.fail(f"LAYERFREEZE_WITH_VLLM=1 but vLLM's LoRA loader is not available: {why}")
    pytest.skip(f"vLLM's LoRA loader is not available: {why}")


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """Export every case, load them all in one vLLM child; case -> (model, applied, result)."""
    if vllm_missing():
        _unavailable(vllm_missing())
    root = tmp_path_factory.mktemp("vllm_lora")
    jobs, built = [], {}
    for i, (case, (family, plan, max_rank)) in enumerate(CASES.items()):
        model = _build(family)
        applied = apply_plan(model, plan)
        _randomize_lora(model, seed=10 + i)
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(root / f"{case}_base")
        export_peft(applied, root / f"{case}_adapter")  # the plain PEFT export (no vLLM check)
        if case == "tampered_alpha":
            cfg_path = root / f"{case}_adapter" / "adapter_config.json"
            cfg = json.loads(cfg_path.read_text())
            cfg_path.write_text(json.dumps({**cfg, "lora_alpha": 2 * cfg["lora_alpha"]}))
        built[case] = (model, applied)
        jobs.append(
            {
                "model_dir": str(root / f"{case}_base"),
                "adapter_dir": str(root / f"{case}_adapter"),
                "max_lora_rank": max_rank,
                "out": str(root / f"{case}.safetensors"),
                "lora_dtype": _LORA_DTYPE.get(case, "auto"),
            }
        )
    try:
        results = run_vllm_lora_jobs(jobs, root / "child")
    except VllmUnavailable as e:
        _unavailable(str(e))
    assert results["vllm_version"].startswith("0.33"), results["vllm_version"]
    out = {"_vllm": results}
    for (case, (model, applied)), job, res in zip(
        built.items(), jobs, results["jobs"], strict=True
    ):
        res["tensors"] = load_file(job["out"]) if res["status"] == "loaded" else {}
        out[case] = (model, applied, res)
    return out


def _check_loaded_equals_ours(applied, res, dtype=torch.float32) -> None:
    """vLLM read exactly our modules and tensors (cast to the server's dtype), rank and scale."""
    ours = _adapters(applied)
    assert res["status"] == "loaded", res
    assert set(res["modules"]) == set(ours)  # exactly our modules, named as in the model
    t = res["tensors"]
    for name, ad in ours.items():
        assert torch.equal(t[f"A:{name}"], ad.lora_a.detach().to(dtype)), name
        assert torch.equal(t[f"B:{name}"], ad.lora_b.detach().to(dtype)), name
        assert res["modules"][name]["rank"] == ad.r, name
        assert res["modules"][name]["scaling"] == pytest.approx(ad.alpha / ad.r), name


def _check_updates_equal_ours(applied, res, dtype=torch.float32) -> None:
    """Each vLLM LoRA linear packs some HF linears (q/k/v -> qkv_proj); the update it computes
    must be the concatenation of ours, ``(alpha / r) x A^T B^T``, or zero where we have none."""
    ours = _adapters(applied)
    t = res["tensors"]
    packed = res["packed_modules_mapping"]
    deltas = [k.removeprefix("delta:") for k in t if k.startswith("delta:")]
    assert deltas, "vLLM wrapped no linear with LoRA"
    adapted = set()
    modules = dict(applied.model.named_modules())
    for vname in deltas:
        x = t[f"x:{vname}"].double()
        parent, short = vname.rsplit(".", 1)
        parts = []
        for piece in packed.get(short, [short]):
            hf = f"{parent}.{piece}"
            if hf in ours:
                ad = ours[hf]
                a, b = (w.detach().to(dtype).double() for w in (ad.lora_a, ad.lora_b))
                parts.append((ad.alpha / ad.r) * (x @ a.T @ b.T))
                adapted.add(hf)
            else:
                parts.append(torch.zeros(x.shape[0], modules[hf].out_features, dtype=x.dtype))
        expected = torch.cat(parts, dim=-1)
        # float32: rounding only; bfloat16: vLLM computes in bf16 (8 mantissa bits)
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(
            t[f"delta:{vname}"].double(),
            expected,
            rtol=tol,
            atol=tol * max(1.0, expected.abs().max().item()),
            msg=vname,
        )
    assert adapted == set(ours)  # every adapter of ours took effect in some vLLM layer


@pytest.mark.parametrize("case", ["llama", "qwen2", "mistral", "qwen3", "gemma", "gemma2"])
def test_vllm_loads_our_export_with_our_tensors_and_updates(loaded, case):
    _model, applied, res = loaded[case]
    assert vllm_compatibility(applied, max_lora_rank=CASES[case][2]) == []
    _check_loaded_equals_ours(applied, res)
    _check_updates_equal_ours(applied, res)


@pytest.mark.parametrize("case", ["llama", "qwen2", "mistral", "qwen3", "gemma", "gemma2"])
def test_vllm_lora_modules_table_matches_vllm(loaded, case):
    """VLLM_LORA_MODULES[model_type] is what vLLM's model class takes LoRA on in the blocks."""
    _model, applied, res = loaded[case]
    assert res["status"] == "loaded", res
    vllm_modules = set(res["expected_lora_modules"]) - _NON_BLOCK
    assert set(VLLM_LORA_MODULES[applied.layout.model_type]) == vllm_modules


def test_max_lora_rank_values_match_vllm(loaded):
    assert list(VLLM_MAX_LORA_RANKS) == loaded["_vllm"]["max_lora_rank_values"]


def test_rank_over_max_is_refused_by_both(loaded):
    _model, applied, res = loaded["rank_over_max"]
    (ours,) = vllm_compatibility(applied, max_lora_rank=8)
    assert ours.startswith("rank 16 exceeds vLLM's max_lora_rank 8")
    assert res["status"] == "refused" and res["stage"] == "load", res
    assert "LoRA rank 16 is greater than max_lora_rank 8" in res["error"]


def test_gpt2_is_refused_by_both(loaded):
    _model, applied, res = loaded["gpt2"]
    (ours,) = vllm_compatibility(applied)
    assert ours.startswith("model_type 'gpt2': layerfreeze does not know")
    # VllmConfig's own check, before any model is built
    assert res["status"] == "refused" and res["stage"] == "config", res
    assert "LoRA is not supported for GPT2LMHeadModel" in res["error"]


def test_differing_alpha_over_r_is_refused_by_us_but_vllm_033_applies_it(loaded):
    """A known, conservative disagreement: vLLM 0.33's PEFTHelper scales each module by its
    own rank_pattern / alpha_pattern entry, so it serves this export correctly; our check still
    refuses it (a server whose vLLM ignores the patterns would scale half the modules wrong)."""
    _model, applied, res = loaded["ratio_differs"]
    (ours,) = vllm_compatibility(applied, max_lora_rank=8)
    assert ours.startswith("alpha / r differs between modules")
    _check_loaded_equals_ours(applied, res)
    _check_updates_equal_ours(applied, res)
    assert {m["scaling"] for m in res["modules"].values()} == {2.0, 4.0}


def test_bfloat16_lora_dtype_casts_our_export(loaded):
    _model, applied, res = loaded["llama_bf16"]
    assert vllm_compatibility(applied, max_lora_rank=8) == []
    _check_loaded_equals_ours(applied, res, dtype=torch.bfloat16)
    _check_updates_equal_ours(applied, res, dtype=torch.bfloat16)


def test_the_update_comparison_sees_a_wrong_scale(loaded):
    """The same comparison fails on an adapter whose lora_alpha was doubled after export."""
    _model, applied, res = loaded["tampered_alpha"]
    assert res["status"] == "loaded", res
    with pytest.raises(AssertionError):
        _check_updates_equal_ours(applied, res)
    assert {m["scaling"] for m in res["modules"].values()} == {4.0}  # ours: 8 / 4 = 2
