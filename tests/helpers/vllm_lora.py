"""Load PEFT LoRA adapters with vLLM's own LoRA loading code, on CPU, in a separate process.

vLLM is installed apart from the project's environment (``pip install --no-deps --target DIR``,
see ``launch/setup_env.sh``: its wheel pins a CUDA torch), so the loading runs in a child
process with ``DIR`` on ``PYTHONPATH``; the test process never imports vLLM. Usage::

    from tests.helpers.vllm_lora import run_vllm_lora_jobs
    results = run_vllm_lora_jobs([{"model_dir": d, "adapter_dir": a, "max_lora_rank": 16}], tmp)
    results["jobs"][0]["status"]  # "loaded" or "refused" (with "stage" and "error")

Per job the child builds vLLM's model class for the HF config in ``model_dir`` (no weights),
wraps it in vLLM's LoRA model manager (``LRUCacheWorkerLoRAManager.create_lora_manager``), and
loads the adapter through ``WorkerLoRAManager._load_adapter`` (``PEFTHelper.from_local_dir``,
``validate_legal``, ``LoRAModel.from_local_checkpoint``) and ``add_adapter`` (packing into
``qkv_proj`` / ``gate_up_proj``, scaling, copying into the layers' stacked buffers). It saves
the loaded A/B tensors per module and, for every LoRA-wrapped linear, the update the layer
computes on a seeded input: ``lora_layer(x) - base_layer(x)`` through vLLM's CPU punica ops.
The child imports nothing from layerfreeze.

Run the child by hand: ``PYTHONPATH=$DIR:. python -m tests.helpers.vllm_lora jobs.json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

#: Where ``launch/setup_env.sh`` installs vLLM (``LAYERFREEZE_VLLM_DIR`` overrides it).
DEFAULT_VLLM_DIR = Path.home() / ".cache" / "layerfreeze" / "vllm"

#: Exit status of the child when vLLM cannot be imported (the caller skips, with the reason).
IMPORT_FAILED = 3

_REPO = Path(__file__).resolve().parents[2]


def vllm_dir() -> Path:
    """The ``--target`` directory holding vLLM and its loader's pure-Python dependencies."""
    return Path(os.environ.get("LAYERFREEZE_VLLM_DIR") or DEFAULT_VLLM_DIR)


def vllm_missing() -> str | None:
    """Why vLLM is not installed in :func:`vllm_dir` (None when it is; importing is not tried)."""
    target = vllm_dir()
    if (target / "vllm" / "__init__.py").is_file():
        return None
    return (
        f"vllm is not installed in {target} (LAYERFREEZE_VLLM_DIR); install it with "
        "LAYERFREEZE_WITH_VLLM=1 bash launch/setup_env.sh"
    )


class VllmUnavailable(RuntimeError):
    """vLLM's LoRA loader cannot be imported; the message says why."""


def run_vllm_lora_jobs(jobs: list[dict], workdir: Path, timeout: float = 900) -> dict:
    """Run ``jobs`` in one child process with vLLM on its path.

    Returns ``{"vllm_version", "max_lora_rank_values", "jobs": [one result per job]}``.

    Each job: ``model_dir`` (a saved HF config with ``architectures``), ``adapter_dir``,
    ``max_lora_rank``, ``out`` (a ``.safetensors`` path for the tensors), optionally
    ``lora_dtype`` (vLLM's ``--lora-dtype``; the base model is float32). Tensor names in
    ``out``: ``A:<module>`` / ``B:<module>`` (as loaded, before packing), ``x:<vllm module>`` and
    ``delta:<vllm module>``.

    Raises:
        VllmUnavailable: vLLM is not installed or its import fails.
        RuntimeError: the child failed otherwise (its output is in the message).
    """
    target = vllm_dir()
    missing = vllm_missing()
    if missing:
        raise VllmUnavailable(missing)
    workdir.mkdir(parents=True, exist_ok=True)
    jobs_file, results_file = workdir / "jobs.json", workdir / "results.json"
    jobs_file.write_text(json.dumps(jobs))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(target), str(_REPO)])
    env["VLLM_TARGET_DEVICE"] = "cpu"  # vLLM's CPU platform (the wheel itself is a CUDA build)
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    proc = subprocess.run(
        [sys.executable, "-m", "tests.helpers.vllm_lora", str(jobs_file), str(results_file)],
        env=env,
        cwd=str(workdir),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode == IMPORT_FAILED:
        raise VllmUnavailable(proc.stdout.strip().splitlines()[-1])
    if proc.returncode != 0:
        raise RuntimeError(
            f"vLLM child failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n"
            f"{proc.stderr[-8000:]}"
        )
    return json.loads(results_file.read_text())


# ------------------------------------------------------------------------------ child process


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _vllm_config(job: dict):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(
        model=job["model_dir"],
        skip_tokenizer_init=True,
        load_format="dummy",
        dtype="float32",  # a bfloat16 base model needs vllm._C's CPU kernels (not in the wheel)
        lora_dtype=job.get("lora_dtype", "auto"),  # "auto": the model's dtype
        max_model_len=job.get("max_model_len", 64),
        enforce_eager=True,
        enable_lora=True,
        max_lora_rank=job["max_lora_rank"],
        max_loras=1,
        distributed_executor_backend="uni",
    ).create_engine_config()


def _run_job(job: dict, state: dict) -> dict:
    import torch
    from safetensors.torch import save_file
    from vllm.config import set_current_vllm_config
    from vllm.lora.layers import LoRAMapping
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
    from vllm.lora.request import LoRARequest
    from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager
    from vllm.model_executor.model_loader import get_model_loader
    from vllm.model_executor.model_loader.utils import process_weights_after_loading
    from vllm.utils.torch_utils import set_default_torch_dtype

    stage = "config"
    try:
        vc = _vllm_config(job)
        with set_current_vllm_config(vc):
            if not state.get("dist"):
                from vllm.distributed import (
                    ensure_model_parallel_initialized,
                    init_distributed_environment,
                )

                init_distributed_environment(
                    world_size=1,
                    rank=0,
                    distributed_init_method=f"tcp://127.0.0.1:{_free_port()}",
                    local_rank=0,
                    backend="gloo",
                )
                ensure_model_parallel_initialized(1, 1)
                state["dist"] = True
            stage = "model"
            # BaseModelLoader.load_model's steps, without its torch.accelerator.empty_cache()
            # (which raises on a CPU-only torch 2.13; vLLM 0.33 pins torch 2.14).
            loader = get_model_loader(vc.load_config)
            with set_default_torch_dtype(vc.model_config.dtype), torch.device("cpu"):
                model = loader.create_model(vllm_config=vc, model_config=vc.model_config)
                loader.load_weights(model, vc.model_config)  # dummy (random) base weights
                process_weights_after_loading(model, vc.model_config, torch.device("cpu"))
            model.eval()
            stage = "lora_manager"
            wm = LRUCacheWorkerLoRAManager(
                vc, torch.device("cpu"), getattr(model, "embedding_modules", {})
            )
            lora_model = wm.create_lora_manager(model, vc)
            am = wm._adapter_manager
            expected = set()
            for m in am.supported_lora_modules:
                expected.update(am.packed_modules_mapping.get(m, [m]))
            result = {
                "status": "loaded",
                "model_class": type(model).__name__,
                "expected_lora_modules": sorted(expected),
                "supported_lora_modules": sorted(am.supported_lora_modules),
                "packed_modules_mapping": {
                    k: list(v) for k, v in am.packed_modules_mapping.items()
                },
            }
            stage = "load"
            request = LoRARequest("layerfreeze", 1, job["adapter_dir"])
            # WorkerLoRAManager.add_adapter = _load_adapter + add_adapter + activate_adapter;
            # the first step is called alone to keep the tensors as read (before packing).
            raw = wm._load_adapter(request)
            tensors = {}
            modules = {}
            for name, w in raw.loras.items():
                tensors[f"A:{name}"] = w.lora_a.contiguous()
                tensors[f"B:{name}"] = w.lora_b.contiguous()
                modules[name] = {"rank": w.rank, "scaling": w.scaling}
            result["rank"], result["modules"] = raw.rank, modules
            stage = "activate"
            wm.add_adapter(request)
            result["active"] = sorted(wm.list_adapters())
            stage = "forward"
            tokens = 5
            wm.set_active_adapters({request}, LoRAMapping((1,) * tokens, (1,), is_prefill=True))
            g = torch.Generator().manual_seed(0)
            for name, layer in lora_model.named_modules():
                if not isinstance(layer, BaseLinearLayerWithLoRA):
                    continue  # embeddings / LM head: layerfreeze never adapts them
                base = layer.base_layer
                x = torch.randn(tokens, base.input_size, generator=g)
                with torch.no_grad():
                    y, y0 = layer(x), base(x)
                y = y[0] if isinstance(y, tuple) else y
                y0 = y0[0] if isinstance(y0, tuple) else y0
                tensors[f"x:{name}"] = x
                tensors[f"delta:{name}"] = (y - y0).contiguous()
            save_file(tensors, job["out"])
            return result
    except Exception as e:  # the verdict is the point: report it with the stage
        import traceback

        return {
            "status": "refused",
            "stage": stage,
            "error": f"{type(e).__name__}: {e}",
            "traceback": traceback.format_exc()[-3000:],
        }


def main(argv: list[str]) -> int:
    """Child entry point: ``python -m tests.helpers.vllm_lora jobs.json results.json``."""
    jobs_file, results_file = argv
    try:
        import vllm
        import vllm.lora.lora_model  # noqa: F401
        import vllm.lora.peft_helper  # noqa: F401
        import vllm.lora.worker_manager  # noqa: F401
    except Exception as e:
        print(f"vllm cannot be imported from {vllm_dir()}: {type(e).__name__}: {e}")
        return IMPORT_FAILED
    import typing

    from vllm.config.lora import MaxLoRARanks

    state: dict = {}
    results = {
        "vllm_version": vllm.__version__,
        "max_lora_rank_values": list(typing.get_args(MaxLoRARanks)),
        "jobs": [_run_job(job, state) for job in json.loads(Path(jobs_file).read_text())],
    }
    Path(results_file).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
