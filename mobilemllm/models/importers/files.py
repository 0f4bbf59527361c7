"""Reading a transformers-style folder: JSON, weight files (sharded or single, safetensors or .bin), its format."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from mobilemllm.errors import CheckpointError
from mobilemllm.models.importers.plan import SOURCE_LAYOUTS


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} should hold a JSON object, got {type(data).__name__}")
    return data


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a transformers-style folder: sharded (index json) or single, safetensors or bin."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.exists():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index} has no weight_map")
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (folder / f).exists()]
            if missing:
                raise CheckpointError(f"{folder} is missing shard(s) {', '.join(missing)} listed in {index_name}; "
                                      "download the whole folder again")
            return [folder / f for f in files]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).exists():
            return [folder / single]
    found = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if found:
        return found
    present = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
    raise CheckpointError(f"{folder} has no weights (model.safetensors, pytorch_model.bin or shards with an index "
                          f"json); it has: {present}")


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a folder's weight files, by their names in the files."""
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        part = _read_file(path)
        dup = sorted(set(part) & set(state))
        if dup:
            raise CheckpointError(f"tensor(s) {', '.join(dup[:5])} appear in more than one weight file of {folder}")
        state.update(part)
    return state


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path} is truncated or corrupt ({e}); download it again") from None
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) .bin
    except Exception as e:  # pickle / zip errors come in many types
        raise CheckpointError(f"cannot read {path} ({e.__class__.__name__}: {e}); download it again") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a dict of tensors")
    # .bin files may hold views of one storage; safetensors refuses to save shared memory, so copy those.
    seen: dict[int, int] = {}
    for t in obj.values():
        ptr = t.untyped_storage().data_ptr()
        seen[ptr] = seen.get(ptr, 0) + 1
    return {k: (v.clone() if seen[v.untyped_storage().data_ptr()] > 1 else v) for k, v in obj.items()}


def detect_format(config: dict[str, Any], where: str = "config.json") -> str:
    model_type = str(config.get("model_type", ""))
    archs = [str(a) for a in config.get("architectures") or []]
    if "LlavaForConditionalGeneration" in archs or model_type == "llava":
        return "llava-hf"
    if "text_config" in config and "vision_config" in config:
        raise CheckpointError(f"{where}: model_type {model_type!r} ({', '.join(archs) or 'no architectures'}) is a "
                              "multimodal model this importer does not know; supported: MobileVLM v1/v2, "
                              "LLaVA-HF (LlavaForConditionalGeneration), plain LLaMA with --llm-only")
    if any(k in config for k in ("mm_projector_type", "mm_vision_tower", "mm_hidden_size")):
        return "mobilevlm"
    if model_type == "llama" or any(a in ("LlamaForCausalLM", "MobileLlamaForCausalLM") for a in archs):
        return "llama"
    raise CheckpointError(f"cannot tell the format of {where} (model_type {model_type!r}, architectures "
                          f"{archs or 'none'}); supported: {', '.join(SOURCE_LAYOUTS[1:])}. Pass --format if you know it")
