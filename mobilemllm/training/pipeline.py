"""Run a recipe's stages end to end: data -> foundations -> pretrain -> instruct -> dpo -> evaluation.

Layout of an output folder (``out_dir``)::

    data/train/, data/eval/      the synthetic shapes world (train seed 0, held-out eval seed 1)
    foundations/ pretrain/ instruct/ dpo/
                                 one checkpoint folder per stage (config.json, model.safetensors,
                                 tokenizer files, training_state.json, eval.json)
    logs/<stage>/metrics.jsonl   the training log; logs/<stage>/last/ the resumable state while running
    results.json                 per-stage evaluation table
    .lock, .lock.owner           held while a run writes here (a second run into the same folder stops at once)

Each stage starts from the previous stage's folder. A stage whose folder is complete and whose
fingerprint (its recipe section, the previous stage's fingerprint and the data) is unchanged is
reused, so re-running a pipeline only trains what is missing or changed.

The quickstart entry point is :func:`run_tiny_pipeline`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from filelock import FileLock, Timeout
from rich.console import Console

from mobilemllm.config import ModelConfig
from mobilemllm.data.dataset import ConversationDataset, PreferenceDataset, collate
from mobilemllm.data.shapes import write_synthetic
from mobilemllm.data.tokenizer import eos_ids, load_tokenizer, tiny_tokenizer
from mobilemllm.errors import ConfigError, UserError
from mobilemllm.evaluation import evaluate
from mobilemllm.evaluation.run import REPORT_VERSION, format_table, summarize
from mobilemllm.models.checkpoint import load_checkpoint, record_run_stage, save_checkpoint
from mobilemllm.models.vlm import MobileVLM
from mobilemllm.training.distributed import barrier, dist_env
from mobilemllm.training.foundations import CONTRASTIVE_NAME, train_foundations
from mobilemllm.training.losses import DPOObjective, LMObjective
from mobilemllm.training.ppo import (PolicyWithValue, PPOConfig, PPOObjective, PPOTrainer, PromptDataset,
                                     save_value_head)
from mobilemllm.training.recipes import (PPO_KEYS, foundations_config, foundations_image_features, load_recipe,
                                         stage_options, stage_train_config)
from mobilemllm.training.reward import (HEAD_NAME, RewardModel, RewardObjective, load_reward_model, pair_accuracy,
                                        save_reward_head)
from mobilemllm.training.stages import ALIGNMENT, ORDER, get_stage, trainable_parts
from mobilemllm.training.threads import adaptive_threads, busy_cores, cpu_threads  # noqa: F401 (busy_cores: API)
from mobilemllm.training.trainer import Trainer

STATE_NAME = "training_state.json"
EVAL_NAME = "eval.json"
RESULTS_NAME = "results.json"
LOCK_NAME = ".lock"
OWNER_NAME = ".lock.owner"  # who holds the lock (the lock file itself may be emptied by a failed attempt)


# ------------------------------------------------------------------------------------------ data
def prepare_data(recipe: dict[str, Any], out_dir: Path, log: Callable[[str], None] = print) -> tuple[Path, Path | None]:
    """The training and evaluation data folders; writes the synthetic world when the recipe has none."""
    data = recipe.get("data")
    eval_data = recipe.get("eval_data")
    syn = recipe.get("synthetic") or {}
    if data is None:
        data = out_dir / "data" / "train"
        _synth(data, syn.get("train_images", 3000), syn.get("train_seed", 0), syn, log)
    if eval_data is None and recipe.get("data") is None:
        eval_data = out_dir / "data" / "eval"
        _synth(eval_data, syn.get("eval_images", 200), syn.get("eval_seed", 1), syn, log)
    data = Path(data)
    if not data.is_dir():
        raise UserError(f"training data folder {data} does not exist; set `data=` to a folder of LLaVA-format "
                        "files, or leave it null for the synthetic shapes world")
    return data, Path(eval_data) if eval_data else None


# The synthetic world's options a recipe may set (``synthetic:``), with write_synthetic's defaults; a data
# folder is reused only when its meta.json records the same values.
SYNTHETIC_OPTIONS = {"hallucination_rate": 0.3, "single_turn": False, "question_wordings": "canonical",
                     "question_copies": 1}


def _synth(path: Path, n: int, seed: int, syn: dict, log) -> None:
    opts = {k: syn.get(k, default) for k, default in SYNTHETIC_OPTIONS.items()}
    meta = path / "meta.json"
    if meta.exists():
        m = json.loads(meta.read_text())
        if (m.get("num_images") == n and m.get("seed") == seed
                and all(m.get(k, SYNTHETIC_OPTIONS[k]) == v for k, v in opts.items())
                and (path / "eval_paraphrase.json").exists()  # folders written before these get them now
                and (path / "dpo_substitutions.json").exists()):
            return
    if dist_env().is_main:
        log(f"writing {n} synthetic images (seed {seed}) to {path}")
        try:
            write_synthetic(path, num_images=n, seed=seed, split="train" if seed == syn.get("train_seed", 0)
                            else "eval", **opts)
        except ValueError as e:
            raise ConfigError(f"synthetic: {e}") from None
    barrier(dist_env())


# ----------------------------------------------------------------------------------------- models
def initial_model(recipe: dict[str, Any]):
    """(model, tokenizer) the first stage starts from: a checkpoint folder or a preset (+ tokenizer)."""
    name = recipe.get("model", "tiny")
    if Path(str(name)).is_dir():
        model, tok = load_checkpoint(name)
    else:
        cfg = ModelConfig.from_preset(str(name), **(recipe.get("model_overrides") or {}))
        tok = None
        if recipe.get("tokenizer") is None and cfg.name == "tiny":
            tok = tiny_tokenizer(cfg.llm.vocab_size)
        # the recipe's seed fixes the random initial weights too: a rerun starts from the same model
        torch.manual_seed(int(recipe.get("seed", 0)))
        model = MobileVLM(cfg)
    if recipe.get("tokenizer"):
        tok = load_tokenizer(recipe["tokenizer"])
    if tok is None:
        raise ConfigError(f"model {name!r} has no tokenizer; set `tokenizer:` in the recipe to a tokenizer folder")
    return model, tok


def _previous(stages: list[str], stage: str) -> str | None:
    """The stage whose checkpoint ``stage`` starts from: the one before it, or for an alignment stage (dpo, rm,
    ppo) the last one before it that is not an alignment stage (the instruct model)."""
    i = stages.index(stage) if stage in stages else ORDER.index(stage)
    before = stages[:i] if stage in stages else [s for s in stages if ORDER.index(s) < ORDER.index(stage)]
    if stage in ALIGNMENT:
        before = [s for s in before if s not in ALIGNMENT]
    return before[-1] if before else None


def _fingerprint(recipe: dict[str, Any], stage: str, prev_fp: str | None, data: Path) -> str:
    # the data folder's real path: the same run reached through a symlink or a relative --out is reused
    keys = {"stage": stage, "section": recipe.get(stage), "prev": prev_fp, "data": str(Path(data).resolve()),
            "model": recipe.get("model"), "model_overrides": recipe.get("model_overrides"),
            "seed": recipe.get("seed"), "synthetic": recipe.get("synthetic")}
    return hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_state(out_dir: Path, stage: str) -> dict[str, Any] | None:
    path = out_dir / stage / STATE_NAME
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if stage == "rm":
        if not (out_dir / stage / HEAD_NAME).is_file():  # killed between the checkpoint and its head
            return None
    return state if state.get("complete") else None


# ----------------------------------------------------------------------------------------- stages
def _param_groups(connector_lr: float | None):
    def groups(model):
        conn = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("connector.")]
        rest = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("connector.")]
        if connector_lr is None:
            return [{"params": conn + rest}]
        return [{"params": conn, "lr": connector_lr}, {"params": rest}]
    return groups


def _apply_lora(model, lora: dict[str, Any]) -> None:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise UserError("LoRA needs peft: pip install 'mobilemllm[train]'") from None
    targets = lora.get("target_modules") or ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"]
    cfg = LoraConfig(r=int(lora.get("r", 8)), lora_alpha=int(lora.get("alpha", 16)),
                     lora_dropout=float(lora.get("dropout", 0.0)), target_modules=targets, bias="none")
    model.llm = get_peft_model(model.llm, cfg)


def merge_lora(model, adapter_dir: Path | None = None) -> None:
    """Save the adapter (optional) and fold LoRA into the LLM's weights, leaving a plain model."""
    if adapter_dir is not None:
        model.llm.save_pretrained(str(adapter_dir))
    model.llm = model.llm.merge_and_unload()


def _concat(datasets: list):
    """One data set, or several files of a stage (``data: [a.json, b.json]``) read as one."""
    return datasets[0] if len(datasets) == 1 else torch.utils.data.ConcatDataset(datasets)


def _curriculum_indices(stage: str, cfg, opts: dict[str, Any], dataset, data_paths: list[Path],
                        data_dir: Path) -> list[int] | None:
    """The sample indices of the stage's ``curriculum_data`` files (which must be among its ``data``)."""
    files = opts.get("curriculum_data")
    if not cfg.curriculum_steps:
        return None  # no curriculum: curriculum_data, if any, is not used
    if not files:
        raise ConfigError(f"{stage}: curriculum_steps={cfg.curriculum_steps} needs curriculum_data, the "
                          "files (among the stage's data) that the first steps draw from")
    wanted = [Path(f) if Path(f).is_absolute() else data_dir / f for f in ([files] if isinstance(files, str) else files)]
    missing = [str(w) for w in wanted if w not in data_paths]
    if missing:
        raise ConfigError(f"{stage}: curriculum_data {', '.join(missing)} is not in the stage's data "
                          f"({', '.join(str(p) for p in data_paths)}); list it in {stage}.data too, or "
                          f"turn the curriculum off with {stage}.curriculum_steps=0")
    sizes = [len(d) for d in dataset.datasets] if isinstance(dataset, torch.utils.data.ConcatDataset) else [len(dataset)]
    out, start = [], 0
    for path, n in zip(data_paths, sizes):
        if path in wanted:
            out.extend(range(start, start + n))
        start += n
    return out


def _run_keys(recipe: dict[str, Any], stage: str, cfg, opts: dict[str, Any], data_paths: list[Path],
              template: str | None, parts: dict[str, bool], init: str | Path | None) -> dict[str, Any]:
    """What decides a stage's result besides its TrainConfig; a resumed run must match them (or be told to go
    on with --resume-changed). ``init``: the starting checkpoint's fingerprint, so a retrained previous stage
    counts as a change."""
    try:
        start = json.loads((Path(init) / STATE_NAME).read_text()).get("fingerprint") if init else None
    except (OSError, ValueError, AttributeError):
        start = None
    return {"data": [str(p.resolve()) for p in data_paths], "image_folder": opts.get("image_folder"),
            "template": template, "max_length": opts.get("max_length"), "trainable": parts,
            "curriculum_data": opts.get("curriculum_data") if cfg.curriculum_steps else None,
            "lora": opts.get("lora") if stage == "instruct" else None,
            "beta": float(opts.get("beta", 0.1)) if get_stage(stage).objective == "dpo" else None,
            **({"rpo_alpha": float(opts["rpo_alpha"])} if opts.get("rpo_alpha") else {}),
            **(_ppo_keys(opts) if stage == "ppo" else {}),
            "init": start or str(init or recipe.get("model", "tiny"))}


def _ppo_keys(opts: dict[str, Any]) -> dict[str, Any]:
    """ppo's options and its reward model (by fingerprint) decide its result too."""
    rm = opts.get("reward_model")
    try:
        rm_fp = json.loads((Path(rm) / STATE_NAME).read_text()).get("fingerprint") if rm else None
    except (OSError, ValueError, AttributeError):
        rm_fp = None
    return {"ppo": {k: opts.get(k) for k in PPO_KEYS}, "reward_model": rm_fp or (str(rm) if rm else None)}


def run_stage(recipe: dict[str, Any], stage: str, out_dir: str | Path, *, data_dir: Path, init: str | Path | None,
              resume: bool = True, progress: bool = True, fingerprint: str = "",
              resume_changed: bool = False) -> dict[str, Any]:
    """Train one stage from ``init`` (a checkpoint folder; None: the recipe's model) into ``out_dir/stage``.

    ``resume_changed``: continue an interrupted run of the stage even though its settings changed."""
    out_dir = Path(out_dir)
    t0, cpu0 = time.perf_counter(), time.process_time()
    model, tok = _start_model(recipe, init)
    run_dir = out_dir / "logs" / stage
    fit = dict(resume=resume, progress=progress, resume_changed=resume_changed)
    if stage == "foundations":
        summary, cfg_dump = _train_foundations(recipe, model, tok, data_dir, run_dir, **fit)
        heads = None
    else:
        model, heads, summary, cfg_dump = _train_stage(recipe, stage, model, tok, out_dir, data_dir, init, run_dir,
                                                       **fit)
    model = model.cpu().float()
    state = {"stage": stage, "complete": True, "fingerprint": fingerprint, "recipe": recipe.get("name"),
             "init": str(init) if init else recipe.get("model"), "data": str(data_dir), "config": cfg_dump,
             "train": summary, "wall_s": round(time.perf_counter() - t0, 2),
             "cpu_s": round(time.process_time() - cpu0, 2)}
    if dist_env().is_main:
        _save_stage(model, tok, heads, state, out_dir / stage, run_dir)
    barrier(dist_env())
    return state


def _start_model(recipe: dict[str, Any], init: str | Path | None):
    """(model, tokenizer) of the starting checkpoint, or of the recipe's model for the first stage. Every stage
    folder carries its tokenizer, so one without is refused here rather than at the first batch."""
    if init is None:
        return initial_model(recipe)
    model, tok = load_checkpoint(init)
    if tok is None:
        raise UserError(f"{init} has no tokenizer files; every stage folder needs one")
    return model, tok


def _train_foundations(recipe: dict[str, Any], model, tok, data_dir: Path, run_dir: Path, *, resume: bool,
                       progress: bool, resume_changed: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """The foundations stage (text LM and contrastive vision pretraining; two trainers of their own):
    (summary, the settings recorded in the checkpoint's state)."""
    text, vision = foundations_config(recipe, "text"), foundations_config(recipe, "vision")
    features = foundations_image_features(recipe)
    summary = train_foundations(model, tok, data_dir, run_dir, text, vision, resume=resume, progress=progress,
                                resume_changed=resume_changed, image_features=features,
                                allow_outside_images=bool(recipe.get("allow_outside_images")))
    return summary, {"text": vars(text), "vision": {**vars(vision), "image_features": features}}


def _train_stage(recipe: dict[str, Any], stage: str, model, tok, out_dir: Path, data_dir: Path,
                 init: str | Path | None, run_dir: Path, *, resume: bool, progress: bool, resume_changed: bool):
    """One trainer-loop stage (pretrain, instruct, dpo, rm, ppo): (model, heads, summary, settings). ``heads``:
    the reward or value head that goes beside an rm/ppo checkpoint (None otherwise)."""
    st = get_stage(stage)
    cfg, opts = stage_train_config(recipe, stage), stage_options(recipe, stage)
    files = opts.get("data") or st.data
    data_paths = [Path(f) if Path(f).is_absolute() else data_dir / f
                  for f in ([files] if isinstance(files, str) else files)]
    template = opts.get("template") or st.template
    parts = trainable_parts(st, opts.get("train_vision"), opts.get("train_connector"), opts.get("train_llm"))
    lora = _set_trainable(model, stage, cfg, opts, parts)
    _check_start(st, stage, init, cfg)
    if st.objective == "ppo":
        opts["reward_model"] = str(opts.get("reward_model") or out_dir / "rm")
        trainer = _ppo_trainer(recipe, stage, model, tok, init, cfg, opts, data_paths, opts.get("image_folder"),
                               template, parts, run_dir, progress)
    else:
        if st.objective == "rm":
            torch.manual_seed(cfg.seed)  # the head's initial weights
            model = RewardModel(model)
            model.set_trainable(**parts)
        dataset, objective, collate_fn = _stage_data(recipe, st.objective, model, tok, init, opts, data_paths,
                                                     template)
        trainer = Trainer(model, objective, dataset, collate_fn, cfg, run_dir, progress=progress, desc=stage,
                          param_groups=_param_groups(cfg.connector_lr),
                          curriculum=_curriculum_indices(stage, cfg, opts, dataset, data_paths, data_dir),
                          run_keys=_run_keys(recipe, stage, cfg, opts, data_paths, template, parts, init))
    summary = trainer.fit(resume=resume, resume_changed=resume_changed)
    model, heads = _trained_model(trainer, model, st.objective, cfg, lora, run_dir)
    return model, heads, summary, {**vars(cfg), **opts, "trainable": parts}


def _set_trainable(model, stage: str, cfg, opts: dict[str, Any], parts: dict[str, bool]) -> dict[str, Any] | None:
    """Freeze what the stage does not train; with ``lora`` (instruct only) the LLM gets adapters instead.
    Returns the LoRA settings (None: none)."""
    model.set_trainable(**parts)
    lora = opts.get("lora") if stage == "instruct" else None
    if lora and cfg.fsdp:
        raise ConfigError("instruct: lora and fsdp cannot be combined yet; use DDP (fsdp: false) for LoRA")
    if lora:
        model.set_trainable(llm=False)
        _apply_lora(model, lora)
    return lora


def _check_start(st, stage: str, init: str | Path | None, cfg) -> None:
    """The alignment stages start from (and compare against) the instruct model: refuse to start without it,
    in one line, before any data is read."""
    if st.objective in ("rm", "ppo"):
        if init is None:
            raise ConfigError(f"the {stage} stage starts from the instruct checkpoint: run instruct first "
                              "(or pass --init FOLDER)")
        if cfg.fsdp:
            raise ConfigError(f"{stage}: fsdp is not supported for this stage; set {stage}.fsdp=false")
    if st.objective == "dpo" and init is None:
        raise ConfigError("the dpo stage needs the instruct checkpoint as its reference: run instruct first")


def _stage_data(recipe: dict[str, Any], objective: str, model, tok, init, opts: dict[str, Any],
                data_paths: list[Path], template: str | None):
    """(dataset, objective, collate function) of a trainer-loop stage: preference pairs for rm and dpo (chosen
    and rejected in one batch), conversations for the language-model stages."""
    pad = tok.pad_token_id
    allow = bool(recipe.get("allow_outside_images"))
    if objective in ("rm", "dpo"):
        dataset = _concat([PreferenceDataset(p, opts.get("image_folder"), tok, model.config, template=template,
                                             allow_outside_images=allow) for p in data_paths])
        if objective == "rm":
            loss = RewardObjective()
        else:
            reference, _ = load_checkpoint(init, with_tokenizer=False)
            loss = DPOObjective(reference, beta=float(opts.get("beta", 0.1)),
                                rpo_alpha=float(opts.get("rpo_alpha", 0.0)), lean=True)
        return dataset, loss, lambda items: collate([c for c, _ in items] + [r for _, r in items], pad)
    dataset = _concat([ConversationDataset(p, opts.get("image_folder"), tok, model.config, template=template,
                                           max_length=opts.get("max_length"), allow_outside_images=allow)
                       for p in data_paths])
    return dataset, LMObjective(lean=True), lambda items: collate(items, pad)


def _trained_model(trainer, model, objective: str, cfg, lora, run_dir: Path):
    """(the plain VLM to save, the rm/ppo head or None) after training: the head split off, FSDP shards gathered,
    LoRA merged, every part trainable again (as a loaded checkpoint is)."""
    heads = None
    if objective in ("rm", "ppo"):
        heads, model = trainer.model, trainer.model.vlm  # the checkpoint is the VLM; the head goes beside it
    env = dist_env()
    if cfg.fsdp and env.distributed:  # gather the shards into a plain model for the checkpoint
        full = trainer.full_state_dict()
        model = MobileVLM(model.config, load_weights=False)
        if env.is_main:
            model.load_state_dict(full)
    if lora:
        merge_lora(model, run_dir / "lora_adapter" if env.is_main else None)
    model.set_trainable(vision=True, connector=True, llm=True)
    trainer.model = model
    return model, heads


def _save_stage(model, tok, heads, state: dict[str, Any], folder: Path, run_dir: Path) -> None:
    """The checkpoint folder (weights, tokenizer, state), the heads and foundations' text tower beside it;
    then the resumable state is dropped, since the stage is complete."""
    save_checkpoint(model, tok, folder, extra=state)
    _save_heads(state["stage"], heads, folder)
    if state["stage"] == "foundations" and (run_dir / "vision" / CONTRASTIVE_NAME).is_file():
        # the text tower beside the vision tower: `mobilemllm data filter` scores with them
        shutil.copyfile(run_dir / "vision" / CONTRASTIVE_NAME, folder / CONTRASTIVE_NAME)
    shutil.rmtree(run_dir / "last", ignore_errors=True)
    for sub in ("text", "vision"):
        shutil.rmtree(run_dir / sub / "last", ignore_errors=True)


def _ppo_trainer(recipe, stage, model, tok, init, cfg, opts, data_paths, image_folder, template, parts, run_dir,
                 progress):
    """The ppo stage's trainer: policy + value head from ``init``, frozen reference (``init`` again), the
    reward model of ``opts["reward_model"]``, rollout prompts from the stage's data."""
    reward_model, _ = load_reward_model(opts["reward_model"])
    reference, _ = load_checkpoint(init, with_tokenizer=False)
    torch.manual_seed(cfg.seed)  # the value head's initial weights
    policy = PolicyWithValue(model)
    policy.set_trainable(**parts)
    allow = bool(recipe.get("allow_outside_images"))
    dataset = _concat([PromptDataset(p, image_folder, tok, model.config, template=template,
                                     allow_outside_images=allow) for p in data_paths])
    ppo_cfg = PPOConfig(**{k: opts[k] for k in PPO_KEYS if opts.get(k) is not None})
    objective = PPOObjective(reference, reward_model, ppo_cfg, tok.pad_token_id if tok.pad_token_id is not None
                             else 0, eos_ids(tok))
    return PPOTrainer(policy, objective, dataset, cfg, run_dir, progress=progress, desc=stage,
                      param_groups=_param_groups(cfg.connector_lr),
                      run_keys=_run_keys(recipe, stage, cfg, opts, data_paths, template, parts, init))


def _save_heads(stage: str, heads, folder: Path) -> None:
    """The reward head (rm) or value head (ppo) beside the stage's checkpoint."""
    if heads is None:
        return
    if stage == "rm":
        save_reward_head(heads.cpu().float(), folder)
    else:
        save_value_head(heads.cpu().float(), folder)


def evaluate_stage(out_dir: Path, stage: str, eval_dir: Path, eval_opts: dict[str, Any],
                   reuse: bool = True) -> dict[str, Any]:
    """Evaluate ``out_dir/stage`` on ``eval_dir`` (cached in the stage folder's eval.json)."""
    folder = out_dir / stage
    state = json.loads((folder / STATE_NAME).read_text())
    # the real path: the same run reached through a symlink or a relative --out reuses its evaluations too
    key = {"fingerprint": state.get("fingerprint"), "eval_dir": str(Path(eval_dir).resolve()), "opts": eval_opts,
           "report_version": REPORT_VERSION}
    cache = folder / EVAL_NAME
    if reuse and cache.exists():
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return cached["report"]
    if stage == "rm":
        report = _evaluate_reward_model(folder, eval_dir, state, eval_opts)
    else:
        model, tok = load_checkpoint(folder)
        report = evaluate(model, tok, eval_dir, **eval_opts)
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "report": report}, indent=1))
    tmp.replace(cache)
    return report


def _evaluate_reward_model(folder: Path, eval_dir: Path, state: dict[str, Any], eval_opts: dict[str, Any]):
    """Held-out pair accuracy of an rm stage folder on the evaluation data's preference pairs, pooled and per
    file: ``eval_pairs`` (a file or a list), by default each file the reward model was trained on that the
    evaluation folder has too (dpo.json when none is): a reward model trained on two kinds of pairs is judged
    on both."""
    cfg = state.get("config") or {}
    names = _file_list(cfg.get("eval_pairs")) or [
        n for n in _file_list(cfg.get("data")) if not Path(n).is_absolute() and (eval_dir / n).is_file()]
    paths = [Path(n) if Path(n).is_absolute() else eval_dir / n for n in names or ["dpo.json"]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        return {"reward": None, "note": f"no held-out pairs ({', '.join(missing)})"}
    rm, tok = load_reward_model(folder)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    by_file = {}
    for path in paths:
        ds = PreferenceDataset(path, eval_opts.get("image_folder"), tok, rm.config, template=cfg.get("template"),
                               allow_outside_images=bool(eval_opts.get("allow_outside_images")))
        if eval_opts.get("limit"):
            ds.records = ds.records[:eval_opts["limit"]]
        by_file[path.name] = pair_accuracy(rm, ds, pad, eval_opts.get("batch_size", 32))
    n = sum(r["n"] for r in by_file.values())
    pooled = {k: sum(r[k] * r["n"] for r in by_file.values()) / max(1, n) for k in ("pair_accuracy", "mean_margin")}
    return {"reward": {"data": ", ".join(str(p) for p in paths), "n": n, **pooled, "by_file": by_file}}


def _file_list(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else list(value or [])


# ----------------------------------------------------------------------------------------- run folder
def check_out_dir(out_dir: Path) -> None:
    """Create ``out_dir``, or say in one line why it cannot be (a file there, a file on the way to it)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"the output folder {out_dir} is a file; pass a folder as --out (it is created if missing)")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the output folder {out_dir}: {e.strerror or e}") from None


@contextlib.contextmanager
def run_lock(out_dir: Path) -> Iterator[None]:
    """Hold ``out_dir/.lock`` while a run writes into ``out_dir``: a second run into the same folder fails at
    once instead of interleaving its checkpoints and logs with this one's. Advisory (``filelock``: flock on
    POSIX), so the operating system releases it when the process dies, however it dies."""
    lock = FileLock(str(out_dir / LOCK_NAME))
    try:
        lock.acquire(blocking=False)
    except Timeout:
        raise UserError(f"another run is using {out_dir} ({_lock_owner(out_dir)}); wait for it to finish or "
                        "choose another --out") from None
    try:
        (out_dir / OWNER_NAME).write_text(f"pid {os.getpid()} on {platform.node() or 'this machine'}")
        yield
    finally:
        lock.release()


def _lock_owner(out_dir: Path) -> str:
    try:
        return (out_dir / OWNER_NAME).read_text().strip() or "pid unknown"
    except OSError:
        return "pid unknown"


def run_recipe(recipe: dict[str, Any] | str, out_dir: str | Path, *, stages: list[str] | None = None,
               overrides: list[str] | None = None, resume: bool = True, fresh: bool = False,
               evaluate_stages: bool = True, init: str | Path | None = None, progress: bool = True,
               log: Callable[[str], None] = print, resume_changed: bool = False) -> dict[str, Any]:
    """Run ``stages`` (default: the recipe's) into ``out_dir``, evaluate each, write results.json.

    The run holds ``out_dir/.lock`` (:func:`run_lock`). ``resume_changed``: an interrupted stage whose
    settings changed since its state was saved continues with the new ones instead of being refused.
    ``num_threads: auto`` adapts the thread count to the CPU load while the stages train."""
    if isinstance(recipe, (str, Path)):
        recipe = load_recipe(recipe, overrides)
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    lock = run_lock(out_dir) if dist_env().is_main else contextlib.nullcontext()
    with lock, adaptive_threads(recipe.get("num_threads") == "auto"):
        return _run_recipe(recipe, out_dir, stages=stages, resume=resume, fresh=fresh,
                           evaluate_stages=evaluate_stages, init=init, progress=progress, log=log,
                           resume_changed=resume_changed)


def _run_recipe(recipe: dict[str, Any], out_dir: Path, *, stages: list[str] | None, resume: bool, fresh: bool,
                evaluate_stages: bool, init: str | Path | None, progress: bool, log: Callable[[str], None],
                resume_changed: bool) -> dict[str, Any]:
    env = dist_env()
    if not env.is_main:
        log = lambda _m: None  # noqa: E731
    threads = cpu_threads(recipe.get("num_threads"), env.world_size)
    if threads and not torch.cuda.is_available():
        torch.set_num_threads(threads)
    plan = list(recipe.get("stages") or [s for s in ORDER if s != "foundations"])
    todo = stages or plan
    for s in todo:
        get_stage(s)
    if fresh and env.is_main and out_dir.exists():
        for s in ORDER:
            shutil.rmtree(out_dir / s, ignore_errors=True)
            shutil.rmtree(out_dir / "logs" / s, ignore_errors=True)
        (out_dir / RESULTS_NAME).unlink(missing_ok=True)
    barrier(env)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_all, cpu_all = time.perf_counter(), time.process_time()
    data_dir, eval_dir = prepare_data(recipe, out_dir, log)
    eval_opts = dict(recipe.get("eval") or {})
    if recipe.get("allow_outside_images"):
        eval_opts["allow_outside_images"] = True

    results: dict[str, Any] = {"recipe": recipe.get("name"), "out_dir": str(out_dir), "stages": {}}
    earlier = _earlier_results(out_dir)
    fps: dict[str, str] = {}
    ordered = [s for s in ORDER if s in set(plan) | set(todo)]
    for stage in ordered:
        prev = _previous(ordered, stage)
        # a stage's result depends on the checkpoint it starts from (and ppo on the reward model)
        before = "/".join(str(fps.get(s)) for s in ([prev] + (["rm"] if stage == "ppo" else [])))
        fp = fps[stage] = _fingerprint(recipe, stage, before if prev or stage == "ppo" else None, data_dir)
        if stage not in todo:
            kept = _still_valid(earlier.get(stage), out_dir, stage, fp)
            if kept is not None:
                results["stages"][stage] = kept
            continue
        state = stage_state(out_dir, stage)
        if resume and state and state.get("fingerprint") == fp:
            log(f"{stage}: reusing {out_dir / stage}")
        else:
            if prev is None:
                start = init
            elif init is not None and stage == todo[0]:
                start = init
            else:
                start = out_dir / prev
                if stage_state(out_dir, prev) is None:
                    raise UserError(f"stage {stage} starts from {start}, which is not a finished checkpoint; run "
                                    f"`mobilemllm train --stage {prev}` first (or pass --init FOLDER)")
            log(f"{stage}: training from {start or recipe.get('model')}")
            state = run_stage(recipe, stage, out_dir, data_dir=data_dir, init=start, resume=resume,
                              progress=progress, fingerprint=fp, resume_changed=resume_changed)
        if env.is_main:  # the run folder says which checkpoint it stands for (a reward model is not one)
            record_run_stage(out_dir, stage, policy=get_stage(stage).objective != "rm")
        entry: dict[str, Any] = {"checkpoint": str(out_dir / stage), "fingerprint": fp,
                                 "train_wall_s": state.get("wall_s"), "train_cpu_s": state.get("cpu_s")}
        if evaluate_stages and eval_dir is not None and stage != "foundations" and env.is_main:
            t0, cpu0 = time.perf_counter(), time.process_time()
            report = evaluate_stage(out_dir, stage, eval_dir, eval_opts)
            entry["eval"] = report
            entry["summary"] = summarize(report)
            entry["eval_wall_s"] = round(time.perf_counter() - t0, 2)
            entry["eval_cpu_s"] = round(time.process_time() - cpu0, 2)
        results["stages"][stage] = entry
    results["total_wall_s"] = round(time.perf_counter() - t_all, 2)
    results["total_cpu_s"] = round(time.process_time() - cpu_all, 2)
    results["torch_threads"] = torch.get_num_threads()
    results["table"] = {s: e["summary"] for s, e in results["stages"].items() if "summary" in e}
    if env.is_main:
        tmp = out_dir / (RESULTS_NAME + ".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(out_dir / RESULTS_NAME)
    return results


def _earlier_results(out_dir: Path) -> dict[str, Any]:
    """The stages of the folder's results.json from an earlier run (empty when there is none or it is unreadable:
    it is rewritten at the end of this run either way)."""
    try:
        stages = json.loads((out_dir / RESULTS_NAME).read_text()).get("stages")
    except (OSError, ValueError, AttributeError):
        return {}
    return stages if isinstance(stages, dict) else {}


def _still_valid(entry: Any, out_dir: Path, stage: str, fp: str) -> dict[str, Any] | None:
    """An earlier run's entry for a stage this run does not train, kept in results.json when it describes the
    checkpoint that is in the folder now, for these settings (``--stage ppo`` must not drop the other stages'
    numbers, and must not keep numbers of a checkpoint that was retrained or of other settings)."""
    if not isinstance(entry, dict) or entry.get("fingerprint") != fp:
        return None
    state = stage_state(out_dir, stage)
    return entry if state is not None and state.get("fingerprint") == fp else None


def print_results(results: dict[str, Any], console=None) -> None:
    rows = {s: e["eval"] for s, e in results["stages"].items() if "eval" in e}
    if rows:
        (console or Console()).print(format_table(rows, title=f"{results.get('recipe')}: per-stage evaluation"))


def run_tiny_pipeline(out_dir: str | Path, data_dir: str | Path | None = None, fresh: bool = False,
                      progress: bool = True, overrides: list[str] | None = None) -> dict[str, Any]:
    """Train and evaluate the tiny model end to end on this machine (the quickstart's engine).

    Writes the synthetic data (train seed 0 and held-out eval seed 1 under ``out_dir/data``, unless
    ``data_dir`` is given: a folder with train files and an ``eval`` subfolder or eval files), trains
    foundations + pretrain + instruct + dpo (each a checkpoint folder ``out_dir/<stage>``), evaluates
    each stage, writes ``out_dir/results.json`` and prints the per-stage table. Finished stages are
    reused unless ``fresh``.

    Returns the results dict: ``{"stages": {stage: {"checkpoint", "train_wall_s", "eval", "summary",
    "eval_wall_s"}}, "table": {stage: {vqa_accuracy, pope_accuracy, pope_f1, pope_yes_ratio,
    pope_hallucination, caption_object_halluc, caption_halluc_captions}}, "total_wall_s", ...}``.
    """
    extra = list(overrides or [])
    if data_dir is not None:
        d = Path(data_dir)
        extra.append(f"data={d}")
        extra.append(f"eval_data={d / 'eval' if (d / 'eval').is_dir() else d}")
    recipe = load_recipe("tiny", extra)
    results = run_recipe(recipe, out_dir, fresh=fresh, progress=progress, log=print if progress else (lambda m: None))
    if progress:
        print_results(results)
    return results
