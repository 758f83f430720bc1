"""Weights split over devices or offloaded to CPU RAM / disk with accelerate, run by our engine.

accelerate's `dispatch_model` puts a hook on every module of the device map; an offloaded module gets a hook
on each of its leaf modules that loads the weights just before the leaf runs and drops them after. The engine
runs a decoder layer's parts itself (norms, projections, MLP: `engine/runner.py`), not the layer's
`forward`, so the leaf hooks are what makes offloading work for it: each part fetches its own weights. A
layer placed on another device is reached by moving the hidden states to that layer's execution device
(`LayerRunner.forward`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from ..errors import InputError

# Modules that stay whole on one device: one SigLIP encoder layer, one DTS, one Qwen2 decoder layer.
NO_SPLIT = ["SiglipEncoderLayer", "Qwen2DecoderLayer"]


def parse_device_map(text: str):
    """`--device-map`: "auto", "balanced", "sequential", a JSON object {module: device}, or a JSON file."""
    import json

    if text in ("auto", "balanced", "balanced_low_0", "sequential"):
        return text
    path = Path(text)
    try:
        mapping = json.loads(path.read_text() if path.is_file() else text)
    except (json.JSONDecodeError, OSError) as err:
        raise InputError(
            f"--device-map {text!r}: expected auto, balanced, sequential, a JSON object or a file ({err})"
        ) from err
    if not isinstance(mapping, dict):
        raise InputError(f"--device-map {text!r}: a JSON object {{module: device}} was expected")
    return mapping


def dispatch(model, device_map, offload_dir=None, max_memory: dict | None = None):
    """`model` (loaded on CPU) spread by `device_map` ("auto", ... or {module: "cuda:0" | "cpu" | "disk"});
    "disk" entries are written to `offload_dir` (a temporary folder kept with the model by default)."""
    from accelerate import dispatch_model, infer_auto_device_map

    if isinstance(device_map, str):
        device_map = infer_auto_device_map(
            model, max_memory=max_memory, no_split_module_classes=NO_SPLIT, dtype=model.dtype
        )
    names = {name for name, _ in model.named_modules()}
    unknown = sorted(set(device_map) - names - {""})
    if unknown:
        raise InputError(f"device map names modules the model does not have: {', '.join(unknown[:5])}")
    if "disk" in device_map.values() and offload_dir is None:
        offload_dir = tempfile.mkdtemp(prefix="videoxl2-offload-")
    model = dispatch_model(model, device_map=device_map, offload_dir=offload_dir)
    model.hf_device_map = dict(device_map)
    return model


def execution_device(module) -> torch.device | None:
    """The device a dispatched module computes on (None when accelerate did not place it)."""
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    return None if device is None else torch.device(device)
