"""Output folders under faults: recognition before replacing, crashes between the renames, concurrent
writers, stale temporaries, checkpoints with a bad config, and shell injection through a bundle's file names.

Fast: hand-written manifests, byte-string model files, small subprocesses; no export, no torch model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mobilemllm import atomic
from mobilemllm.atomic import OutputBusy, OutputKind
from mobilemllm.bundle import manifest as M
from mobilemllm.bundle import writer as W
from mobilemllm.errors import CheckpointError, UserError

from _manifests import minimal_manifest  # tests/ is on sys.path under pytest

ROOT = Path(__file__).resolve().parents[1]


FILES = {"model.pte": b"program", "tokenizer/tokenizer.json": b"{}"}


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def run_py(code: str, *args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          env=env, timeout=60, **kw)


# ---- 1. recognition: only a bundle (by its manifest's content) or an empty folder is replaced --------------
@pytest.fixture
def web_app(tmp_path) -> Path:
    app = tmp_path / "webapp"
    (app / "src").mkdir(parents=True)
    (app / "index.html").write_text("<html>my app</html>")
    (app / "src" / "app.js").write_text("console.log('hi')")
    (app / "manifest.json").write_text(json.dumps({"name": "My App", "start_url": "/", "display": "standalone"}))
    return app


def test_export_refuses_a_folder_with_a_foreign_manifest(web_app):
    before = tree(web_app)
    with pytest.raises(UserError, match="not a bundle") as e:
        W.write_bundle(web_app, minimal_manifest(), FILES)
    assert "\n" not in str(e.value)
    assert tree(web_app) == before
    assert leftovers(web_app.parent) == []


def test_cli_export_refuses_a_web_app_folder_before_loading(web_app, capsys):
    from mobilemllm.cli import main

    before = tree(web_app)
    code = main(["export", "--model", str(web_app.parent / "no-such-checkpoint"), "--target", "android",
                 "--out", str(web_app)])
    err = capsys.readouterr().err
    assert code == 2 and "not a bundle" in err and len(err.strip().splitlines()) == 1, err
    assert tree(web_app) == before


@pytest.mark.parametrize("manifest", [
    "{not json",
    "[1, 2]",
    json.dumps({"schema_version": 99, "format": "executorch"}),
    json.dumps({"schema_version": 1, "format": "tflite"}),
    json.dumps({"schema_version": 1, "format": "executorch"}),  # ours in name only: does not validate
])
def test_look_alike_manifests_are_not_bundles(tmp_path, manifest):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text(manifest)
    (out / "notes.txt").write_text("keep")
    assert M.bundle_problem(out)
    with pytest.raises(UserError, match="not a bundle"):
        W.check_out_dir(out)
    assert (out / "notes.txt").read_text() == "keep"


def test_a_bundle_and_an_empty_folder_are_replaced(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    W.write_bundle(out, minimal_manifest(), FILES)  # empty folder
    assert M.bundle_problem(out) is None
    W.write_bundle(out, minimal_manifest(), {"model.pte": b"v2"})  # a bundle
    assert tree(out)["model.pte"] == b"v2" and "tokenizer/tokenizer.json" not in tree(out)
    assert leftovers(tmp_path) == []


def test_checkpoint_folder_recognised_by_its_config(tmp_path):
    from mobilemllm.config import ModelConfig
    from mobilemllm.models.checkpoint import CHECKPOINT

    project = tmp_path / "project"
    project.mkdir()
    (project / "config.json").write_text(json.dumps({"port": 8080}))  # someone else's config.json
    (project / "model.safetensors").write_bytes(b"x")
    with pytest.raises(UserError, match="not a checkpoint"):
        atomic.atomic_dir(project, CHECKPOINT)
    (project / "config.json").write_text("[1, 2, 3]")
    with pytest.raises(UserError, match="not a checkpoint"):
        atomic.atomic_dir(project, CHECKPOINT)
    assert (project / "model.safetensors").read_bytes() == b"x" and leftovers(tmp_path) == []
    ModelConfig.from_preset("tiny").save(project / "config.json")  # now it is a checkpoint: replaceable
    tmp = atomic.atomic_dir(project, CHECKPOINT)
    atomic.abort_dir(tmp)
    assert leftovers(tmp_path) == []


def test_checkpoint_config_that_is_not_an_object_is_one_line(tmp_path):
    from mobilemllm.models.checkpoint import load_checkpoint

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"x")
    for text, what in (("[1, 2]", "JSON list"), ('"tiny"', "JSON str"), ("{bad", "not valid JSON")):
        (ckpt / "config.json").write_text(text)
        with pytest.raises(CheckpointError, match=what) as e:
            load_checkpoint(ckpt)
        assert "\n" not in str(e.value)


def test_training_state_kind_refuses_other_folders(tmp_path):
    kind = OutputKind.json_marker("training state", "step.json", "step")
    last = tmp_path / "last"
    last.mkdir()
    (last / "step.json").write_text(json.dumps({"name": "not ours"}))
    with pytest.raises(UserError, match="not a training state"):
        atomic.atomic_dir(last, kind)
    (last / "step.json").write_text(json.dumps({"step": 3}))
    tmp = atomic.atomic_dir(last, kind)
    (tmp / "step.json").write_text(json.dumps({"step": 4}))
    atomic.commit_dir(tmp, last, kind)
    assert json.loads((last / "step.json").read_text()) == {"step": 4}
    with pytest.raises(UserError, match="nothing may replace it"):  # the default kind: new or empty folders only
        atomic.atomic_dir(last)


# ---- 2. atomic, locked replace --------------------------------------------------------------------------
KIND = OutputKind.json_marker("test folder", "done.json", "writer")


def _commit(target: Path, payload: str) -> None:
    tmp = atomic.atomic_dir(target, KIND)
    try:
        (tmp / "payload").write_text(payload)
        (tmp / "done.json").write_text(json.dumps({"writer": payload}))
        atomic.commit_dir(tmp, target, KIND)
    except BaseException:
        atomic.abort_dir(tmp)
        raise


def _failing_replace(monkeypatch, fail_from: int, fail_to: int):
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append((src, dst))
        if fail_from <= len(calls) <= fail_to:
            raise OSError(5, "injected I/O error")
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    return calls


def test_failure_between_the_renames_puts_the_old_folder_back(tmp_path, monkeypatch):
    target = tmp_path / "out"
    _commit(target, "old")
    calls = _failing_replace(monkeypatch, 2, 2)  # the rename of the new folder into place fails
    with pytest.raises(OSError, match="injected"):
        _commit(target, "new")
    assert len(calls) == 3  # aside, (failed) into place, back
    monkeypatch.undo()
    assert (target / "payload").read_text() == "old"


def test_crash_between_the_renames_is_recovered_at_the_next_start(tmp_path, monkeypatch):
    target = tmp_path / "out"
    _commit(target, "old")
    _failing_replace(monkeypatch, 2, 99)  # as if killed: the old folder is aside, nothing is in place
    with pytest.raises(OSError):
        _commit(target, "new")
    monkeypatch.undo()
    assert not target.exists()
    assert [n for n in leftovers(tmp_path) if ".old-" in n]
    atomic.release_dir(target)
    tmp = atomic.atomic_dir(target, KIND)  # the next writer starts: the last complete folder comes back
    assert (target / "payload").read_text() == "old"
    atomic.abort_dir(tmp)
    assert leftovers(tmp_path) == []


def test_writer_killed_between_the_renames(tmp_path):
    target = tmp_path / "out"
    _commit(target, "old")
    res = run_py("""
        import json, os, sys
        from pathlib import Path
        from mobilemllm import atomic
        kind = atomic.OutputKind.json_marker("test folder", "done.json", "writer")
        target = Path(sys.argv[1])
        tmp = atomic.atomic_dir(target, kind)
        (tmp / "payload").write_text("new")
        (tmp / "done.json").write_text(json.dumps({"writer": "new"}))
        real, n = os.replace, []
        def replace(src, dst):
            n.append(1)
            if len(n) == 2:
                os._exit(9)  # killed after the old folder went aside
            real(src, dst)
        atomic.os.replace = replace
        atomic.commit_dir(tmp, target, kind)
    """, str(target))
    assert res.returncode == 9, res.stderr
    assert not target.exists()
    _commit(target, "next")  # recovers the old folder, then replaces it; the dead writer's temporaries go
    assert (target / "payload").read_text() == "next"
    assert leftovers(tmp_path) == []


WORKER = """
    import json, sys
    from pathlib import Path
    from mobilemllm import atomic
    kind = atomic.OutputKind.json_marker("test folder", "done.json", "writer")
    target, name = Path(sys.argv[1]), sys.argv[2]
    for i in range(int(sys.argv[3])):
        tmp = atomic.atomic_dir(target, kind, wait_s=30)
        for j in range(5):
            (tmp / f"part{j}").write_text(f"{name} {i}")
        (tmp / "done.json").write_text(json.dumps({"writer": name, "i": i}))
        atomic.commit_dir(tmp, target, kind)
    print("ok")
"""


def test_concurrent_commits_serialise(tmp_path):
    target, n = tmp_path / "out", 50
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(WORKER), str(target), name, str(n)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for name in ("a", "b")]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and out.strip() == "ok", err
    done = json.loads((target / "done.json").read_text())
    assert done["i"] == n - 1  # the last commit of one of them, complete
    assert {(target / f"part{j}").read_text() for j in range(5)} == {f"{done['writer']} {n - 1}"}
    assert leftovers(tmp_path) == []  # no .tmp-, .old- or .lock left


HOLDER = """
    import sys
    from pathlib import Path
    from mobilemllm.bundle import writer as W
    staging = W.new_bundle_dir(Path(sys.argv[1]))
    print("holding", flush=True)
    sys.stdin.readline()
    W.discard(staging)
"""


def test_second_export_to_the_same_folder_fails_at_once(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HOLDER), str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "holding", holder.stderr.read()
        with pytest.raises(OutputBusy, match=f"another export is writing {out}") as e:
            W.write_bundle(out, minimal_manifest(), FILES)
        assert "\n" not in str(e.value)
        with pytest.raises(OutputBusy, match="another export is writing"):
            W.check_out_dir(out)  # `mobilemllm export` checks this before loading the model
    finally:
        holder.communicate("\n", timeout=30)
    assert holder.returncode == 0
    W.write_bundle(out, minimal_manifest(), FILES)  # free again
    assert leftovers(tmp_path) == []


WRITER = """
    import json, sys
    from pathlib import Path
    from mobilemllm.bundle import writer as W
    W.write_bundle(Path(sys.argv[1]), json.loads(sys.argv[2]), {"model.pte": b"theirs"})
"""


def test_an_export_that_was_overtaken_does_not_overwrite(tmp_path):
    out = tmp_path / "out"
    W.check_out_dir(out)  # this export starts (then loads, quantizes, lowers: minutes)...
    res = run_py(WRITER, str(out), json.dumps(minimal_manifest()))  # ...another one starts and finishes
    assert res.returncode == 0, res.stderr
    staging = W.new_bundle_dir(out)
    (staging / "model.pte").write_bytes(b"ours")
    with pytest.raises(OutputBusy, match=f"another export replaced {out}"):
        W.finish_bundle(staging, out, minimal_manifest())
    assert tree(out)["model.pte"] == b"theirs"
    M.load_manifest(out)
    assert leftovers(tmp_path) == []


def test_stale_temporaries_of_dead_writers_are_cleaned(tmp_path):
    target = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.tmp-{dead.pid}-0123abcd"
    stale.mkdir()
    (stale / "half.bin").write_bytes(b"x" * 10)
    mine = tmp_path / f".out.tmp-{os.getpid()}-4567abcd"  # this process's own: may still be in use
    mine.mkdir()
    _commit(target, "first")
    old = tmp_path / f".out.old-{dead.pid}-89abcdef"  # killed after the swap, before deleting the old one
    old.mkdir()
    _commit(target, "second")
    assert not stale.exists() and not old.exists() and mine.exists()
    mine.rmdir()
    assert leftovers(tmp_path) == [] and (target / "payload").read_text() == "second"


def test_a_symlink_or_file_target_is_refused(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(UserError, match="symbolic link"):
        atomic.atomic_dir(tmp_path / "link", KIND)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        W.check_out_dir(tmp_path / "file")
    assert leftovers(tmp_path) == []


# ---- 4. shell injection on the phone ------------------------------------------------------------------
# A stand-in for adb + phone: logs its argv, and for `shell` joins the arguments with spaces and runs them
# with `sh -c`, as adb and the phone's shell do; /data/local/tmp is mapped into $FAKE_PHONE.
FAKE_ADB = r"""#!/bin/sh
printf '%s\n' "$*" >> "$FAKE_ADB_LOG"
if [ "$1" = "-s" ]; then shift 2; fi
sub=$1; shift
case "$sub" in
  devices) printf 'List of devices attached\nFAKE1\tdevice\n' ;;
  push) dest="$FAKE_PHONE$2"; mkdir -p "$(dirname "$dest")" && cp "$1" "$dest" ;;
  shell) line=$(printf '%s' "$*" | sed "s#/data/local/tmp#$FAKE_PHONE/data/local/tmp#g")
         out=$(cd "$FAKE_PHONE" && sh -c "$line"); rc=$?
         printf '%s\n' "$out" | sed "s#$FAKE_PHONE##g"; exit $rc ;;
  *) echo "fake adb: unexpected $sub" >&2; exit 1 ;;
esac
"""

PAYLOAD = "tokenizer/x;touch PWNED;#"
DIR_PAYLOAD = "a$(touch PWNED2)/b.bin"


@pytest.fixture
def phone(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "adb").write_text(FAKE_ADB)
    (bin_dir / "adb").chmod(0o755)
    phone = tmp_path / "phone"
    phone.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    monkeypatch.setenv("FAKE_PHONE", str(phone))
    monkeypatch.setenv("FAKE_ADB_LOG", str(tmp_path / "adb.log"))
    return phone


def test_push_quotes_file_names_for_the_phone_shell(tmp_path, phone, capsys):
    from mobilemllm.cli import main

    bundle = tmp_path / "evil"
    W.write_bundle(bundle, minimal_manifest(), {**FILES, PAYLOAD: b"a", DIR_PAYLOAD: b"b"})
    code = main(["push", "--bundle", str(bundle), "--name", "evil"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert not list(phone.rglob("PWNED*")), "a file name ran as a command on the phone"
    dest = phone / "data/local/tmp/mobilemllm/evil"
    assert (dest / PAYLOAD).read_bytes() == b"a" and (dest / DIR_PAYLOAD).read_bytes() == b"b"
    log = (tmp_path / "adb.log").read_text()
    assert "sha256sum" in log and "'/data/local/tmp/mobilemllm/evil.partial/tokenizer/x;touch PWNED;#'" in log


def test_push_refuses_paths_outside_the_bundle_before_any_adb_call(tmp_path, phone, capsys):
    from mobilemllm.cli import main

    bundle = tmp_path / "b"
    W.write_bundle(bundle, minimal_manifest(), FILES)
    (tmp_path / "secret").write_bytes(b"s")
    m = json.loads((bundle / "manifest.json").read_text())
    m["files"]["../secret"] = {"size": 1, "sha256": M.sha256_file(tmp_path / "secret")}
    (bundle / "manifest.json").write_text(json.dumps(m))
    for extra in ([], ["--dry-run"]):
        code = main(["push", "--bundle", str(bundle), *extra])
        err = capsys.readouterr().err
        assert code == 2 and "outside the bundle" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "adb.log").exists()


def test_device_root_is_defined_once():
    from mobilemllm.bench import adb
    from mobilemllm.bundle import layout
    from mobilemllm.cli import push

    assert push.DEVICE_ROOT is adb.DEVICE_ROOT is layout.DEVICE_ROOT
    src = "\n".join(p.read_text() for p in (ROOT / "mobilemllm").rglob("*.py"))
    assert src.count('"/data/local/tmp/mobilemllm"') == 1
