"""Checkpoint folders: ``config.json`` + ``model.safetensors`` + tokenizer files, loadable offline.

Folders are written atomically (:mod:`mobilemllm.atomic`): into a temporary sibling, then renamed over
the target under a lock, so an interrupted save never leaves a half-written checkpoint behind. An existing
folder is replaced only if it is a checkpoint (a config.json that loads, beside model.safetensors).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mobilemllm.atomic import OutputKind, abort_dir, atomic_dir, commit_dir
from mobilemllm.config import ModelConfig
from mobilemllm.data.tokenizer import load_tokenizer
from mobilemllm.errors import CheckpointError, UserError
from mobilemllm.models.vlm import MobileVLM

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def read_config(path: str | Path) -> ModelConfig:
    """The ModelConfig in ``path`` (a checkpoint's config.json); one-line CheckpointError when it is not one."""
    path = Path(path)
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({str(e)[:200]}); re-save the checkpoint") from None
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a JSON {type(data).__name__}, not an object of model config fields; "
                              "re-save the checkpoint")
    try:
        return ModelConfig.from_dict(data)
    except UserError as e:
        raise CheckpointError(f"{path} is not a model config: {e}") from None


def checkpoint_problem(folder: Path) -> str | None:
    """Why ``folder`` is not a checkpoint (None when it is): recognised by a config that loads, not by names."""
    missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (folder / n).is_file()]
    if missing:
        return f"it has no {' or '.join(missing)}"
    try:
        read_config(folder / CONFIG_NAME)
    except CheckpointError as e:
        return str(e)
    return None


CHECKPOINT = OutputKind("checkpoint", checkpoint_problem, writer="checkpoint save")


def save_checkpoint(model, tokenizer, path: str | Path, extra: dict | None = None) -> Path:
    """Save model config, weights and tokenizer into ``path`` (atomically)."""
    path = Path(path)
    tmp = atomic_dir(path, CHECKPOINT)
    try:
        cfg = model.config.replace(vision={"pretrained_path": None}, llm={"pretrained_path": None})
        cfg.save(tmp / CONFIG_NAME)
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        if cfg.llm.tie_word_embeddings:
            state.pop("llm.lm_head.weight", None)
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "mobilemllm": "1"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if extra:
            (tmp / "training_state.json").write_text(json.dumps(extra, indent=2))
        return commit_dir(tmp, path, CHECKPOINT)
    except BaseException:
        abort_dir(tmp)
        raise


RUN_INDEX_NAME = "run.json"


def record_run_stage(run_dir: str | Path, stage: str, *, policy: bool) -> None:
    """Note in a training run folder's index (``run.json``) that its ``stage`` folder holds a finished
    checkpoint; ``policy``: a model that answers (not, say, a reward model). The run folder then says
    itself which checkpoint it stands for (:func:`check_checkpoint_dir`), and this layer needs no stage
    names. A stage recorded again moves to the end: the index lists the stages in the order they finished."""
    run_dir = Path(run_dir)
    entries = [e for e in _run_index(run_dir) if e["stage"] != stage] + [{"stage": stage, "policy": bool(policy)}]
    tmp = run_dir / (RUN_INDEX_NAME + ".tmp")
    tmp.write_text(json.dumps({"stages": entries}, indent=1) + "\n")
    tmp.replace(run_dir / RUN_INDEX_NAME)


def _run_index(run_dir: Path) -> list[dict]:
    """The index's entries, oldest first ([] without a readable index)."""
    try:
        entries = json.loads((run_dir / RUN_INDEX_NAME).read_text())["stages"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    ok = isinstance(entries, list) and all(isinstance(e, dict) and isinstance(e.get("stage"), str) for e in entries)
    return entries if ok else []


def _is_checkpoint(folder: Path) -> bool:
    return all((folder / n).exists() for n in (CONFIG_NAME, WEIGHTS_NAME))


def latest_policy(run_dir: str | Path) -> Path | None:
    """The folder of the policy checkpoint a training run finished last (by its ``run.json``), skipping
    stages whose folder is gone or unfinished; None when the index names none."""
    run_dir = Path(run_dir)
    for entry in reversed(_run_index(run_dir)):
        folder = run_dir / Path(entry["stage"]).name  # a name, never a path out of the run folder
        if entry.get("policy") and _is_checkpoint(folder):
            return folder
    return None


def check_checkpoint_dir(path: str | Path) -> Path:
    """``path`` if it is a checkpoint folder, or the latest policy checkpoint of a training run folder (as
    its ``run.json`` says); else a clear error."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(
            f"checkpoint folder {path} does not exist. Make one with `mobilemllm train ...`, import one with "
            "`mobilemllm import ...`, or use a preset name such as `tiny`")
    missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (path / n).exists()]
    if len(missing) == 2 and (path / RUN_INDEX_NAME).exists():  # a `mobilemllm train --out` folder
        found = latest_policy(path)
        if found is None:
            raise CheckpointError(f"training run {path} has no finished model yet ({RUN_INDEX_NAME} names none "
                                  "whose folder is complete); finish a stage with `mobilemllm train`")
        print(f"note: {path} is a training run; using its latest model, {found}", file=sys.stderr)
        return found
    if missing:
        present = ", ".join(sorted(p.name for p in path.iterdir())) or "nothing"
        stages = sorted(p.name for p in path.iterdir() if p.is_dir() and _is_checkpoint(p))
        hint = f"; its sub-folders {', '.join(stages)} are checkpoints: pass one of them" if stages else ""
        raise CheckpointError(f"checkpoint folder {path} is missing {', '.join(missing)} (it has: {present}){hint}")
    return path


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is truncated or corrupt ({e}); re-save or re-download it") from None


def load_weights_into(model, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` strictly, naming every missing, unexpected or mismatched tensor."""
    own = model.state_dict()
    if model.config.llm.tie_word_embeddings and "llm.model.embed_tokens.weight" in state:
        state = dict(state)
        state.setdefault("llm.lm_head.weight", state["llm.model.embed_tokens.weight"])
    tied_head = {"llm.lm_head.weight"} if model.config.llm.tie_word_embeddings else set()
    missing = sorted(set(own) - set(state) - tied_head)
    unexpected = sorted(set(state) - set(own))
    mismatched = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("mismatched", mismatched)):
        if items:
            shown = ", ".join(items[:8]) + (f" ... (+{len(items) - 8} more)" if len(items) > 8 else "")
            problems.append(f"{len(items)} {label} tensor(s): {shown}")
    if problems:
        raise CheckpointError(f"{source} does not match its config: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)


def load_checkpoint(path: str | Path, with_tokenizer: bool = True, dtype: torch.dtype = torch.float32):
    """Load (model, tokenizer) from a checkpoint folder. tokenizer is None if absent or not asked for."""
    path = check_checkpoint_dir(path)
    cfg = read_config(path / CONFIG_NAME)
    cfg = cfg.replace(vision={"pretrained_path": None}, llm={"pretrained_path": None})
    state = load_state_dict_file(path / WEIGHTS_NAME)
    from transformers.initialization import no_init_weights

    with no_init_weights():  # every weight is overwritten below: skip the (slow) random initialisation
        model = MobileVLM(cfg, load_weights=False)
    if cfg.llm.tie_word_embeddings:
        model.llm.tie_weights()
    load_weights_into(model, state, str(path / WEIGHTS_NAME))
    model.to(dtype).eval()
    tokenizer = None
    if with_tokenizer and ((path / "tokenizer.json").exists() or (path / "tokenizer.model").exists()):
        tokenizer = load_tokenizer(path)
    return model, tokenizer
