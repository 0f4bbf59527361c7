"""Typed recipes: `key=value` overrides read against the schema, every mistake one line naming the key (through
the real CLI, before any work), strings kept as written, shipped recipes valid, export recipes checked at load."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import yaml

from mobilemllm.cli import main
from mobilemllm.errors import ConfigError
from mobilemllm.training.recipes import Recipe, load_recipe, recipe_names, recipe_path, validate_recipe
from mobilemllm.training.trainer import TrainConfig


def _one_line_error(capsys, args, *fragments) -> str:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


# ------------------------------------------------------------------------------------- through the CLI
@pytest.mark.parametrize("override,fragments", [
    ("instruct.lr=fast", ["instruct.lr must be a number, got 'fast'"]),
    ("seed=abc", ["seed must be an integer, got 'abc'"]),
    ("nosuch.key=1", ["unknown key(s) nosuch", "valid: name, model"]),
    ("num_threads=abc", ["num_threads must be an integer >= 1 or auto, got 'abc'"]),
    ("instruct.max_steps=-3", ["instruct.max_steps must be >= 1, got -3"]),
    ("stages=[pretrain,rlhf]", ["stages has unknown stage(s) 'rlhf'", "valid: foundations, pretrain"]),
    ("instruct.lora.merge=false", ["instruct.lora.merge must be true"]),
    ("model_overrides.llm.layers=2", ["model_overrides.llm: unknown key(s) layers", "num_layers"]),
    ("model_overrides.llm.num_layers=two", ["model_overrides.llm.num_layers must be an integer, got 'two'"]),
    ("model_overrides.connector.kind=qformer", ["model_overrides:", "unknown connector 'qformer'"]),
])
def test_cli_bad_override_is_one_line_before_any_work(capsys, tmp_path, override, fragments):
    out = tmp_path / "run"
    _one_line_error(capsys, ["train", "--recipe", "tiny", "--out", out, "--no-progress", override], *fragments)
    assert not out.exists()  # checked before the data, the model or the output folder


def test_cli_reports_every_problem_together(capsys, tmp_path):
    line = _one_line_error(capsys, ["train", "--out", tmp_path / "run", "instruct.lr=fast", "seed=abc", "nosuch.key=1",
                                    "num_threads=abc", "instruct.max_steps=-3", "seed.x=1", "bad"],
                           "instruct.lr", "seed", "nosuch", "num_threads", "instruct.max_steps",
                           "'seed.x=1'", "'bad' is not key=value")
    assert line.count(";") >= 6


# ------------------------------------------------------------------------------------- reading values
def test_override_values_follow_the_schema_types():
    r = load_recipe("tiny", ["name=007", "data=007", "tokenizer=null", "seed=7", "instruct.lr=1e-4",
                             "instruct.train_llm=true", "num_threads=2", "instruct.data=[a.json, b.json]",
                             "instruct.lora={r: 4, alpha: 8}", "model_overrides.template=plain",
                             "model_overrides.name=010", "eval.limit=5"])
    assert r["name"] == "007" and r["data"] == "007"  # strings stay as written (YAML would read 7 and 8)
    assert r["model_overrides"]["name"] == "010"
    assert r["tokenizer"] is None and r["seed"] == 7 and r["num_threads"] == 2 and r["eval"]["limit"] == 5
    assert r["instruct"]["lr"] == 1e-4 and isinstance(r["instruct"]["lr"], float)  # YAML reads "1e-4" as text
    assert r["instruct"]["train_llm"] is True and r["instruct"]["data"] == ["a.json", "b.json"]
    assert r["instruct"]["lora"] == {"r": 4, "alpha": 8}
    assert load_recipe("tiny", ["num_threads=auto"])["num_threads"] == "auto"


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(TrainConfig)])
def test_every_train_config_key_is_a_stage_key(name):
    """The stage sections follow TrainConfig: each of its fields, written as YAML, loads in every stage."""
    default = getattr(TrainConfig(), name)
    text = yaml.safe_dump(default).splitlines()[0] if default is not None else "null"
    for section in ("pretrain", "instruct", "dpo", "foundations.text", "foundations.vision"):
        r = load_recipe("tiny", [f"{section}.{name}={text}"])
        node = r
        for k in section.split("."):
            node = node[k]
        assert node[name] == default, (section, name)


def test_stage_keys_belong_to_their_stage():
    with pytest.raises(ConfigError, match=r"dpo: unknown key\(s\) lora, max_length"):
        load_recipe("tiny", ["dpo.lora={r: 4}", "dpo.max_length=64"])
    with pytest.raises(ConfigError, match=r"pretrain: unknown key\(s\) beta"):
        load_recipe("tiny", ["pretrain.beta=0.1"])
    with pytest.raises(ConfigError, match="instruct.template must be one of plain, .*got 'chatml'"):
        load_recipe("tiny", ["instruct.template=chatml"])
    with pytest.raises(ConfigError, match="synthetic.question_wordings must be one of canonical, varied"):
        load_recipe("tiny", ["synthetic.question_wordings=random"])


# ------------------------------------------------------------------------------------- recipes as data
@pytest.mark.parametrize("name", recipe_names())
def test_shipped_recipe_validates_unchanged(name):
    """A shipped recipe is valid, and typing keeps it as written (so run folders' fingerprints, which hash
    the recipe's sections, do not change)."""
    raw = yaml.safe_load(recipe_path(name).read_text())
    assert load_recipe(name) == {**raw, "name": name}
    Recipe.model_validate(raw)


def test_loading_never_mutates_the_callers_dict():
    raw = yaml.safe_load(recipe_path("tiny").read_text())
    raw["instruct"]["lr"] = "1e-4"  # as YAML reads it without a dot
    before = copy.deepcopy(raw)
    typed = validate_recipe(raw)
    assert raw == before and typed["instruct"]["lr"] == 1e-4
    typed["instruct"]["lr"] = 5.0
    assert raw == before


def test_model_overrides_need_a_preset(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    with pytest.raises(ConfigError, match="model_overrides apply to a preset"):
        load_recipe("tiny", [f"model={folder}"])  # tiny.yaml has model_overrides
    assert load_recipe("tiny", [f"model={folder}", "model_overrides=null"])["model"] == str(folder)
    with pytest.raises(ConfigError, match="model must be a preset .*tiny.* or a checkpoint folder, got 'tiny2'"):
        load_recipe("tiny", ["model=tiny2"])


# ------------------------------------------------------------------------------------- export recipes
def test_every_export_recipe_validates():
    from mobilemllm.export.recipes import load_recipe as load_export, targets

    assert targets()
    for t in targets():
        rec = load_export(t)
        assert rec["name"] == t
        assert "providers" not in rec


@pytest.mark.parametrize("text,fragments", [
    ("format: onnx\nproviders: [QNNExecutionProvider]\n", ["providers is not an export setting", "--providers"]),
    ("format: onnx\nquantisation: int4\nparity: {greedy_tokens: 0}\n",
     ["unknown key(s) quantisation", "parity.greedy_tokens must be >= 1, got 0"]),
    ("format: executorch\nbackend: xnnpack\nsoc_model: SM8650\nmax_context_len: abc\n",
     ["soc_model applies to backend: qnn only", "max_context_len must be an integer, got 'abc'"]),
    ("format: coreml\nblock_size: big\nparity: {max_rel_diff: 1.0}\n",
     ["block_size must be an integer, got 'big'", "parity: unknown key(s) max_rel_diff"]),
    ("name: x\n", ["format is required"]),
    ("format: tflite\n", ["format must be one of executorch, onnx, coreml, gguf, got 'tflite'"]),
])
def test_export_recipe_mistakes_are_one_line(tmp_path, text, fragments):
    from mobilemllm.export.recipes import load_recipe as load_export

    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_export(path=path)
    msg = str(e.value)
    assert "\n" not in msg
    for f in fragments:
        assert f in msg, (f, msg)


def test_export_help_still_works(capsys):
    assert main(["export", "--help"]) == 0
    assert "--target" in capsys.readouterr().out
