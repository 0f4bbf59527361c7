"""`mobilemllm push`: copy an exported bundle onto an Android phone with adb, where android_demo finds it.

The bundle lands in ``/data/local/tmp/mobilemllm/<name>/`` (readable by apps without storage
permissions). It is pushed into ``<name>.partial/`` first, its checksums are compared on the phone with
the manifest's, and only then is it moved into place, so the app never sees half a bundle.
``--dry-run`` prints the exact adb commands instead of running them (no adb or phone needed).
"""

from __future__ import annotations

import posixpath
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Optional

import typer

DEVICE_ROOT = "/data/local/tmp/mobilemllm"
TARGETS = ("android",)
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ADB_HELP = ("install Android platform-tools (Debian/Ubuntu: `apt-get install adb`; or the SDK's "
            "platform-tools) and put adb on PATH, or pass --dry-run to print the commands")


def device_dir(name: str) -> str:
    return f"{DEVICE_ROOT}/{name}"


def check_name(name: str) -> str:
    from mobilemllm.errors import UserError

    if not NAME_RE.match(name) or name.endswith(".partial"):
        raise UserError(f"--name {name!r} is not a usable folder name on the phone; use letters, digits, '.', '_' "
                        "and '-' (up to 64, not ending in .partial)")
    return name


def bundle_files(bundle: Path, manifest: dict) -> list[str]:
    """Every file of the bundle, manifest.json last (the app treats a folder with a manifest as complete)."""
    from mobilemllm.bundle import MANIFEST_NAME

    return sorted(manifest["files"]) + [MANIFEST_NAME]


def adb_commands(bundle: Path, manifest: dict, name: str, serial: str | None = None,
                 adb: str = "adb") -> list[list[str]]:
    """The exact adb invocations that copy ``bundle`` to ``/data/local/tmp/mobilemllm/<name>/``."""
    base = [adb] + (["-s", serial] if serial else [])
    final = device_dir(name)
    staging = final + ".partial"
    files = bundle_files(bundle, manifest)
    subdirs = sorted({posixpath.dirname(f) for f in files if posixpath.dirname(f)})
    cmds = [base + ["shell", "rm", "-rf", staging],
            base + ["shell", "mkdir", "-p", staging] + [f"{staging}/{d}" for d in subdirs]]
    for rel in files:
        cmds.append(base + ["push", str(bundle / rel), f"{staging}/{rel}"])
    cmds.append(base + ["shell", "sha256sum"] + [f"{staging}/{rel}" for rel in sorted(manifest["files"])])
    cmds.append(base + ["shell", "rm", "-rf", final])
    cmds.append(base + ["shell", "mv", staging, final])
    return cmds


def connected_devices(adb: str) -> dict[str, str]:
    """{serial: state} from ``adb devices`` (state is 'device' when usable)."""
    from mobilemllm.errors import BackendUnavailable

    try:
        out = subprocess.run([adb, "devices"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BackendUnavailable(f"`{adb} devices` failed: {e}") from None
    if out.returncode != 0:
        raise BackendUnavailable(f"`{adb} devices` failed: {(out.stderr or out.stdout).strip()}")
    devices = {}
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and not line.startswith(("List of devices", "*")):
            devices[parts[0]] = parts[1]
    return devices


def pick_device(devices: dict[str, str], serial: str | None) -> str:
    from mobilemllm.errors import BackendUnavailable, UserError

    ready = sorted(s for s, state in devices.items() if state == "device")
    if serial is not None:
        if serial not in devices:
            listed = ", ".join(f"{s} ({st})" for s, st in sorted(devices.items())) or "none"
            raise BackendUnavailable(f"no device with serial {serial!r} is connected (adb devices lists: {listed})")
        if devices[serial] != "device":
            raise BackendUnavailable(f"device {serial} is '{devices[serial]}', not ready: unlock it and accept the "
                                     "USB debugging prompt, then run again")
        return serial
    if not ready:
        others = ", ".join(f"{s} ({st})" for s, st in sorted(devices.items()))
        raise BackendUnavailable("no Android device is connected" + (f" and ready ({others})" if others else "") +
                                 ": plug one in with USB debugging on (check with `adb devices`), "
                                 "or pass --dry-run to print the commands")
    if len(ready) > 1:
        raise UserError(f"{len(ready)} devices are connected ({', '.join(ready)}); choose one with --serial")
    return ready[0]


def _run(cmd: list[str]) -> str:
    from mobilemllm.errors import BackendUnavailable

    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BackendUnavailable(f"`{shlex.join(cmd)}` failed: {e}") from None
    if out.returncode != 0:
        raise BackendUnavailable(f"`{shlex.join(cmd)}` failed (exit {out.returncode}): "
                                 f"{(out.stderr or out.stdout).strip()[:500]}")
    return out.stdout


def check_sums(output: str, manifest: dict, staging: str) -> None:
    """Compare the phone's ``sha256sum`` output with the manifest; name each file that differs."""
    from mobilemllm.errors import BackendUnavailable

    seen = {}
    for line in output.splitlines():
        parts = line.strip().split(None, 1)
        if len(parts) == 2:
            seen[parts[1].strip()] = parts[0].lower()
    bad = [rel for rel, entry in sorted(manifest["files"].items()) if seen.get(f"{staging}/{rel}") != entry["sha256"]]
    if bad:
        raise BackendUnavailable(f"the copy on the phone differs from the bundle for {', '.join(bad)}; "
                                 f"it was left in {staging} and not moved into place; run push again")


def push(
    bundle: Path = typer.Option(..., "--bundle", "-b", help="An exported bundle folder (mobilemllm export --target android)."),
    target: str = typer.Option("android", "--target", "-t", help="Where to push: android (over adb)."),
    serial: Optional[str] = typer.Option(None, "--serial", "-s", help="adb serial of the phone (see `adb devices`); "
                                                                      "needed when several are connected."),
    name: Optional[str] = typer.Option(None, "--name", "-n", help="Folder name on the phone under "
                                                                  f"{DEVICE_ROOT}/ (default: the bundle folder's name)."),
    dry_run: bool = typer.Option(False, "--dry-run/--no-dry-run", help="Print the adb commands instead of running them."),
) -> None:
    """Copy a bundle to a phone, where the demo app lists it."""
    from mobilemllm.errors import BackendUnavailable, UserError
    from mobilemllm.bundle import load_manifest

    if target not in TARGETS:
        hint = " (iOS: add the bundle folder in the ios_demo app's Files import; see docs/apps.md)" \
            if target == "ios" else ""
        raise UserError(f"unknown --target {target!r}; valid targets: {', '.join(TARGETS)}{hint}")
    name = check_name(name or bundle.resolve().name)
    manifest = load_manifest(bundle)
    if manifest["format"] != "executorch":
        raise UserError(f"{bundle} is a {manifest['format']} bundle; android_demo runs ExecuTorch bundles: "
                        f"export one with `mobilemllm export --target android --model CKPT --out DIR`")
    if dry_run:
        for cmd in adb_commands(bundle, manifest, name, serial):
            typer.echo(shlex.join(cmd))
        return
    adb = shutil.which("adb")
    if adb is None:
        raise BackendUnavailable(f"adb was not found on PATH: {ADB_HELP}")
    serial = pick_device(connected_devices(adb), serial)
    cmds = adb_commands(bundle, manifest, name, serial, adb="adb")
    staging = device_dir(name) + ".partial"
    for cmd in cmds:
        typer.echo(shlex.join(cmd), err=True)
        out = _run([adb] + cmd[1:])
        if cmd[cmd.index("shell") + 1:][:1] == ["sha256sum"] if "shell" in cmd else False:
            check_sums(out, manifest, staging)
    typer.echo(f"pushed {bundle} to {serial}:{device_dir(name)}/ ({len(manifest['files']) + 1} files); "
               "open the MobileMLLM demo app and pick it")
