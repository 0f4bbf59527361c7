"""The commands shown in README.md and docs/ must not rot.

Every `mobilemllm ...` line in them is parsed by the real CLI (command, sub-command, options and their
types; nothing runs), and the cheap ones run for real. The expensive ones (train, export, bench,
quickstart) run in the quickstart and in the slow tests with tiny settings.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PLACEHOLDER = re.compile(r"<[^>]+>|\.\.\.|\[--")


def doc_commands() -> list[tuple[str, list[str]]]:
    """(where, argv) for every `mobilemllm` command line in a fenced bash block of the docs."""
    out = []
    for path in DOCS:
        lines = path.read_text().splitlines()
        in_block = False
        i = 0
        while i < len(lines):
            line = lines[i]
            if line.startswith("```"):
                in_block = line.strip() in ("```bash", "```sh", "```shell")
                i += 1
                continue
            text, start = line, i
            while in_block and text.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                text = text.rstrip()[:-1] + " " + lines[i].strip()
            i += 1
            stripped = text.strip()
            if not in_block or not re.match(r"^(\.venv/bin/)?mobilemllm\b", stripped):
                continue
            argv = shlex.split(stripped, comments=True)
            if PLACEHOLDER.search(" ".join(argv)):
                continue
            out.append((f"{path.relative_to(ROOT)}:{start + 1}", argv[1:]))
    return out


COMMANDS = doc_commands()


def test_docs_show_commands():
    assert len(COMMANDS) >= 20, COMMANDS
    shown = {argv[0] for _, argv in COMMANDS if argv and not argv[0].startswith("-")}
    assert {"quickstart", "info", "data", "train", "eval", "import", "export", "generate", "bench", "push",
            "demo"} <= shown


@pytest.mark.parametrize("where,argv", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_doc_command_parses(where, argv):
    """The command, its sub-command and every option exist and take the values shown."""
    assert parse_error(argv) is None, f"{where}: `mobilemllm {' '.join(argv)}` does not parse: {parse_error(argv)}"


def parse_error(argv: list[str]) -> str | None:
    """Parse argv with the real CLI without running it; the usage error's message, or None.

    Duck-typed on purpose: typer may bundle its own copy of click, so isinstance checks on click's
    classes are unreliable.
    """
    import typer

    from mobilemllm.cli import app

    cmd = typer.main.get_command(app)
    args = list(argv)
    ctx = None
    while hasattr(cmd, "list_commands") and args and not args[0].startswith("-"):
        name = args.pop(0)
        ctx = cmd.context_class(cmd, info_name=cmd.name or "mobilemllm", parent=ctx)
        sub = cmd.get_command(ctx, name)
        if sub is None:
            return f"unknown command {name!r}"
        cmd = sub
    # Paths in the docs point at files the reader makes first: check option names and types, not files.
    for p in cmd.params:
        if type(getattr(p, "type", None)).__name__ == "Path":
            p.type = type(p.type)()
    try:
        cmd.make_context(cmd.name, args, parent=ctx)
    except Exception as e:  # noqa: BLE001 - click's Exit (from --help) or UsageError, whichever click it is
        if type(e).__name__ == "Exit":
            return None
        if hasattr(e, "format_message"):
            return e.format_message()
        raise
    return None


def test_parse_check_catches_mistakes():
    assert parse_error(["info", "tiny"]) is None
    assert parse_error(["export", "--model", "x", "--out", "y", "--target", "android"]) is None
    assert "no-such" in parse_error(["export", "--model", "x", "--out", "y", "--no-such-option"])
    assert "nope" in parse_error(["nope"])
    assert parse_error(["generate", "--image", "a.png"]) is not None  # --prompt is required


def test_cheap_readme_commands_run(tmp_path, monkeypatch, capsys):
    """`info` and `data synth` exactly as the README shows them (in a scratch folder)."""
    from mobilemllm.cli import main

    monkeypatch.chdir(tmp_path)
    ran = 0
    for where, argv in COMMANDS:
        # `data filter` needs a trained foundations stage: the walkthrough on the trained model runs it
        if where.startswith("README") and argv[:1] in (["info"], ["data"], ["--help"]) and argv[:2] != ["data", "filter"]:
            assert main(argv) == 0, where
            ran += 1
    assert ran >= 3
    assert (tmp_path / "runs" / "data" / "instruct.json").exists()
    assert "144 tokens" in capsys.readouterr().out


# Commands of the README's CLI tour that this walkthrough does not run, and where they are tested instead.
NOT_RUN_HERE = {
    "demo": "serves until stopped; tests/test_demo_web.py drives the same server in headless Chromium",
    "serve": "serves until stopped; tests/test_serve.py drives the same server with the openai client",
    "chat": "reads questions from stdin; tests/test_chat.py runs it as a process with piped questions",
    "import": "needs a downloaded MobileVLM folder; tests/test_importers.py imports folders in the published layouts",
    "train-bench": "builds the 1.7B preset (a GPU job); tests/test_train_bench.py runs it on tiny",
}


# Commands of docs/*.md that the walkthrough runs too (after the README's), as (file, command start, extra
# arguments). Retraining examples get `instruct.max_steps=2` and write to a copy of the run (runs/tiny-copy),
# not to the shared trained model. The docs' other commands need what this machine does not have: a phone
# (--device adb), downloaded checkpoints (import, ckpt/...), the reader's own recipe and data
# (my_recipe.yaml, /data/llava), or bundles of the 1.4B model (benchmarking.md's reference runs).
SHORT = ["instruct.max_steps=2"]
DOCS_RUN = [
    ("docs/training.md", "train --recipe tiny --stage all --out runs/tiny", []),
    ("docs/training.md", "eval --model runs/tiny/dpo", []),
    ("docs/training.md", "train --recipe tiny --stage instruct --out runs/tiny instruct.lr", SHORT),
    ("docs/training.md", "train --recipe tiny --stage instruct --out runs/tiny instruct.lora", SHORT),
    ("docs/export.md", "export --model runs/tiny --target android", []),
    ("docs/export.md", "generate --bundle bundles/tiny-android --image cat.png", []),
    ("docs/onnx.md", "export --model runs/tiny --target onnx", []),
    ("docs/onnx.md", "generate --bundle bundles/tiny-onnx --image cat.png", []),
    ("docs/coreml.md", "export --model runs/tiny --target coreml", []),
    ("docs/benchmarking.md", "bench --bundle bundles/tiny-android --prompt-tokens", []),
    ("docs/benchmarking.md", "export --model runs/tiny/instruct --target android", []),
    ("docs/benchmarking.md", "export --model runs/tiny/instruct --target onnx", []),
    ("docs/benchmarking.md", "bench --model runs/tiny/instruct", []),
    ("docs/apps.md", "export --target android --model CKPT", []),
]


def _docs_tour() -> list[list[str]]:
    tour = []
    for doc, start, extra in DOCS_RUN:
        found = [argv for where, argv in COMMANDS if where.startswith(doc + ":") and " ".join(argv).startswith(start)]
        assert found, f"{doc} no longer shows `mobilemllm {start} ...`; update DOCS_RUN"
        argv = [a.replace("CKPT", "runs/tiny/dpo") for a in found[0]] + extra
        if extra:  # a retraining example: into a copy of the run
            argv = [a if a != "runs/tiny" else "runs/tiny-copy" for a in argv]
        tour.append(argv)
    return tour


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    from _trained import trained_tiny

    return trained_tiny(tmp_path_factory)


@pytest.mark.slow
def test_readme_cli_tour_runs_on_the_trained_tiny_model(trained, tmp_path, monkeypatch):
    """Every command of the README's CLI section (and DOCS_RUN's from docs/), exactly as written, in a scratch folder whose runs/tiny is
    the session's trained tiny model (so `train` reuses its stages) and whose quickstart reuses that training."""
    import os

    from mobilemllm.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "quickstart").mkdir(parents=True)
    os.symlink(trained["out_dir"], tmp_path / "runs" / "tiny")
    os.symlink(trained["out_dir"], tmp_path / "runs" / "quickstart" / "train")
    tour = [argv for where, argv in COMMANDS if where.startswith("README") and argv[:1] != ["--help"]]
    tour += _docs_tour()
    shutil.copy(trained["eval_dir"] / "images" / "shapes_1_000000.png", tmp_path / "cat.png")  # the docs' image
    shutil.copytree(trained["out_dir"], tmp_path / "runs" / "tiny-copy", ignore=shutil.ignore_patterns("logs"))
    ran = []
    for argv in tour:
        if argv[0] in NOT_RUN_HERE:
            continue
        if argv[0] == "train" and argv[argv.index("--out") + 1] == "runs/tiny":
            assert argv[argv.index("--stage") + 1] == "all"  # the fixture's recipe: every stage is reused
        assert main(list(argv)) == 0, f"`mobilemllm {' '.join(argv)}` failed"
        ran.append(argv[0])
    assert {"quickstart", "train", "eval", "export", "generate", "bench", "push"} <= set(ran), ran
    assert (tmp_path / "bundles" / "tiny-android" / "manifest.json").exists()
    assert (tmp_path / "bench.json").exists()
    assert (tmp_path / "runs" / "filtered" / "pretrain.json").exists()  # `data filter`
    for bundle in ("tiny-onnx", "tiny-coreml", "tiny-android-8da4w", "tiny-onnx-int4"):
        assert (tmp_path / "bundles" / bundle / "manifest.json").exists()
    quick = json.loads((tmp_path / "runs" / "quickstart" / "quickstart.json").read_text())
    assert all(quick[s]["done"] for s in ("train", "export-android", "export-onnx", "answer", "bench"))


def test_result_tables_equal_their_raw_files():
    """Every `<!-- results: NAME -->` block in README.md and docs/ is what docs/render_results.py renders
    from docs/results/ (so a published number cannot drift from the file it came from)."""
    proc = subprocess.run([sys.executable, str(ROOT / "docs" / "render_results.py"), "--check"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    blocks = sum(p.read_text().count("<!-- results: ") for p in DOCS)
    assert blocks >= 2, "the README and docs publish their tables through render_results.py"


def test_render_check_catches_a_changed_number(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import render_results as R
    finally:
        sys.path.pop(0)
    md = tmp_path / "x.md"
    body = R._relink(R.render("train-bench-h100"), tmp_path / "x.md")
    md.write_text(f"<!-- results: train-bench-h100 -->\n{body}<!-- /results -->\n")
    assert R.process(md, check=True) == []
    md.write_text(md.read_text().replace("15,450", "16,450"))
    assert R.process(md, check=True) == ["train-bench-h100"]
