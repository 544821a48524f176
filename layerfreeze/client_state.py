"""Per-rank client state in checkpoints without pickle: JSON structure + safetensors tensors.

:func:`save_client_state` / :func:`load_client_state` store what the recipe hands an engine's
``save_checkpoint`` (data position, RNG states, ...): tensors, numpy arrays, numbers, strings,
None, lists, tuples and str-keyed dicts. Engine-neutral; both engine adapters use it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from layerfreeze.checkpoint import CheckpointError
from layerfreeze.utils.io import atomic_write_json

__all__ = ["load_client_state", "save_client_state"]


def _encode(obj: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        kind = obj.dtype.kind
        if kind not in "iubf":
            raise TypeError(f"client_state{path}: numpy dtype {obj.dtype} cannot be stored.")
        key = f"t{len(tensors)}"
        tensors[key] = torch.from_numpy(
            np.ascontiguousarray(obj.astype(np.float64 if kind == "f" else np.int64))
        )
        return {"__ndarray__": key, "dtype": obj.dtype.str}
    if isinstance(obj, np.integer | np.floating | np.bool_):
        return obj.item()
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{path}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{path}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"client_state{path}: dict key {k!r} is not a str; use str keys.")
            out[k] = _encode(v, tensors, f"{path}[{k!r}]")
        return out
    raise TypeError(
        f"client_state{path}: cannot store a {type(obj).__name__}; use tensors, numpy arrays, "
        "numbers, strings, None, lists, tuples and dicts with str keys."
    )


def _decode(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__ndarray__", "dtype"}:
            return tensors[obj["__ndarray__"]].numpy().astype(np.dtype(obj["dtype"]))
        if set(obj) == {"__tuple__"}:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        return {k: _decode(v, tensors) for k, v in obj.items()}
    return obj


def save_client_state(directory: Path, rank: int, state: Mapping[str, Any]) -> None:
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(dict(state), tensors, "")
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / f"rank_{rank:05d}.safetensors"))
    atomic_write_json(directory / f"rank_{rank:05d}.json", encoded)


def load_client_state(directory: Path, rank: int) -> dict[str, Any]:
    js = directory / f"rank_{rank:05d}.json"
    try:
        encoded = json.loads(js.read_text(encoding="utf-8"))
        tensors = load_file(str(directory / f"rank_{rank:05d}.safetensors"))
    except (OSError, ValueError) as e:  # JSONDecodeError and safetensors errors are ValueErrors
        raise CheckpointError(
            f"{js}: unreadable client state ({e}). The checkpoint is damaged; resume from an earlier one."
        ) from None
    return _decode(encoded, tensors)
