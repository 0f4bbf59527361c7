"""The `mobilemllm` command: every command's --help, info, generate, data synth, and bad input giving one
line and a non-zero exit code. Runs in-process through ``mobilemllm.cli.main``, plus real subprocesses of
the installed console script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mobilemllm.cli import app, main

ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "NO_COLOR": "1", "COLUMNS": "200"}


def command_paths() -> list[tuple[str, ...]]:
    """Every command and sub-command path of the typer app (new commands are picked up automatically)."""
    import typer.main

    paths: list[tuple[str, ...]] = [()]

    def walk(group, prefix):
        for name, cmd in sorted(getattr(group, "commands", {}).items()):
            if getattr(cmd, "hidden", False):
                continue
            paths.append(prefix + (name,))
            walk(cmd, prefix + (name,))

    walk(typer.main.get_command(app), ())
    return paths


def commands() -> dict[tuple[str, ...], object]:
    import typer.main

    root = typer.main.get_command(app)
    out = {}
    for path in command_paths()[1:]:
        cmd = root
        for name in path:
            cmd = cmd.commands[name]
        out[path] = cmd
    return out


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], (f, lines[0])


# ------------------------------------------------------------------------------------------- help


def test_the_foundation_commands_are_registered():
    paths = command_paths()
    for path in [("info",), ("generate",), ("data",), ("data", "synth")]:
        assert path in paths


@pytest.mark.parametrize("path", command_paths(), ids=lambda p: " ".join(p) or "mobilemllm")
def test_help_works_for_every_command(capsys, path):
    code, out, err = run(capsys, *path, "--help")
    assert code == 0, err
    assert "Usage:" in out and "mobilemllm" in out
    assert "Traceback" not in out + err


@pytest.mark.parametrize("path", sorted(commands()), ids=lambda p: " ".join(p))
def test_every_option_has_help_and_booleans_are_flags(path):
    cmd = commands()[path]
    assert (cmd.help or "").strip(), f"`mobilemllm {' '.join(path)}` has no help text (add a docstring)"
    for param in cmd.params:
        if getattr(param, "hidden", False) or param.param_type_name != "option" or param.name == "help":
            continue
        assert (param.help or "").strip(), f"option {param.opts} of `{' '.join(path)}` has no help text"
        if getattr(param, "bare_type", None) is bool or type(getattr(param, "type", None)).__name__ == "BoolParamType":
            assert param.is_flag, f"boolean option {param.opts} of `{' '.join(path)}` must be a --x/--no-x flag"


# ------------------------------------------------------------------------------------------- info


def test_info_on_a_preset(capsys):
    code, out, err = run(capsys, "info", "mobilevlm-v2-1.7b", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["name"] == "mobilevlm-v2-1.7b"
    assert report["connector"] == "ldpv2"
    assert (report["patches_per_view"], report["visual_tokens"]) == (576, 144)
    p = report["parameters"]
    assert p["total"] == p["vision"] + p["connector"] + p["llm"]
    assert round(p["connector"] / 1e6, 1) == 6.3
    assert p["llm"] == 1_364_297_728  # MobileLLaMA 1.4B: 24 x 2048, vocab 32000, untied head
    assert p["vision"] == 303_507_456  # CLIP ViT-L/14-336 vision tower (post-layernorm included)

    code, out, err = run(capsys, "info", "tiny")  # the table
    assert code == 0, err
    assert "ldpv2" in out and "16 tokens" in out and "params: total" in out


def test_info_on_a_checkpoint(capsys, tiny_checkpoint, tiny_model):
    code, out, err = run(capsys, "info", tiny_checkpoint, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["parameters"] == tiny_model.parameter_counts()
    assert report["visual_tokens"] == tiny_model.config.num_visual_tokens
    assert "llama 2L x 64" in report["llm"]


# --------------------------------------------------------------------------------------- generate


def test_generate_with_a_checkpoint(capsys, tiny_checkpoint, shapes_image):
    from mobilemllm.inference import answer
    from mobilemllm.models.checkpoint import load_checkpoint

    prompt = "What colour is the circle?"
    code, out, err = run(capsys, "generate", "--model", tiny_checkpoint, "--image", shapes_image, "--prompt", prompt,
                         "--max-new-tokens", "8")
    assert code == 0, err
    model, tok = load_checkpoint(tiny_checkpoint)
    want = answer(model, tok, shapes_image, prompt, max_new_tokens=8)
    assert want.text  # the seeded tiny model says something (random words)
    assert out.strip() == want.text
    assert f"[{want.prompt_tokens} prompt tokens, {len(want.tokens)} generated in" in err


def test_generate_needs_exactly_one_source(capsys, shapes_image):
    code, _, err = run(capsys, "generate", "--image", shapes_image, "--prompt", "hi")
    assert_one_line_error(code, err, "--model", "--bundle")


# ------------------------------------------------------------------------------------------- data


def test_data_synth_writes_the_data_set(capsys, tmp_path):
    out_dir = tmp_path / "data"
    code, out, err = run(capsys, "data", "synth", "--out", out_dir, "--num-images", "6", "--seed", "2")
    assert code == 0, err
    assert "wrote 6 images" in out
    assert len(list((out_dir / "images").glob("*.png"))) == 6
    for name in ("pretrain.json", "instruct.json", "dpo.json", "eval_questions.json", "eval_pope_random.json",
                 "eval_captions.json", "corpus.txt"):
        assert (out_dir / name).is_file(), name
    assert len(json.loads((out_dir / "instruct.json").read_text())) == 6
    assert not [p for p in out_dir.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_data_synth_bad_arguments(capsys, tmp_path):
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    code, _, err = run(capsys, "data", "synth", "--out", afile, "-n", "2")
    assert_one_line_error(code, err, "is a file")
    code, _, err = run(capsys, "data", "synth", "--out", tmp_path / "d", "--image-size", "4")
    assert code == 2 and "image-size" in err and "Traceback" not in err
    assert not (tmp_path / "d").exists()


# ------------------------------------------------------------------------------------- bad input


def test_unknown_preset(capsys, shapes_image):
    code, _, err = run(capsys, "info", "tiny2")
    assert_one_line_error(code, err, "unknown preset 'tiny2'", "mobilevlm-v2-1.7b")
    code, _, err = run(capsys, "generate", "--model", "tiny2", "--image", shapes_image, "--prompt", "hi")
    assert_one_line_error(code, err, "unknown preset 'tiny2'")


def test_missing_image(capsys, tmp_path):
    code, _, err = run(capsys, "generate", "--model", "tiny", "--image", tmp_path / "nope.png", "--prompt", "hi")
    assert_one_line_error(code, err, "image not found", "nope.png")


def test_corrupt_image(capsys, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    code, _, err = run(capsys, "generate", "--model", "tiny", "--image", bad, "--prompt", "hi")
    assert_one_line_error(code, err, "cannot read image", "bad.jpg")


def test_missing_checkpoint_folder(capsys, tmp_path, shapes_image):
    missing = tmp_path / "runs" / "ckpt"
    code, _, err = run(capsys, "generate", "--model", missing, "--image", shapes_image, "--prompt", "hi")
    assert_one_line_error(code, err, "does not exist", str(missing))
    code, _, err = run(capsys, "info", missing)
    assert_one_line_error(code, err, "does not exist", str(missing))
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, "info", tmp_path / "empty")
    assert_one_line_error(code, err, "missing config.json, model.safetensors")


def test_usage_errors_exit_non_zero_without_traceback(capsys):
    code, out, err = run(capsys, "info", "--no-such-option")
    assert code == 2
    assert "No such option" in err and "Traceback" not in out + err
    code, out, err = run(capsys, "generate", "--model", "tiny")  # missing --image
    assert code == 2 and "Missing option" in err


# ------------------------------------------------------------------------------- console script


def console_script() -> str:
    exe = Path(sys.executable).parent / "mobilemllm"
    found = str(exe) if exe.exists() else shutil.which("mobilemllm")
    if not found:
        pytest.fail("the `mobilemllm` console script is not installed; run `pip install -e .`")
    return found


@pytest.mark.slow  # a real process: imports torch and transformers from cold
def test_console_script(tiny_checkpoint, tmp_path):
    ok = subprocess.run([console_script(), "info", str(tiny_checkpoint), "--json"], capture_output=True, text=True,
                        env=ENV, cwd=tmp_path, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["visual_tokens"] == 16


@pytest.mark.slow  # a real process: imports torch and transformers from cold
def test_console_script_error(tmp_path):
    bad = subprocess.run([console_script(), "generate", "--model", "tiny", "--image", str(tmp_path / "x.png"),
                          "--prompt", "hi"], capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=120)
    assert bad.returncode == 2
    assert bad.stdout == ""
    assert_one_line_error(bad.returncode, bad.stderr, "image not found")
