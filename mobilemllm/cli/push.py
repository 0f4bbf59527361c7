"""`mobilemllm push`: copy an exported bundle onto an Android phone with adb, where android_demo finds it.

The bundle lands in ``/data/local/tmp/mobilemllm/<name>/`` (readable by apps without storage
permissions). It is pushed into ``<name>.partial/`` first, its checksums are compared on the phone with
the manifest's, and only then is it moved into place, so the app never sees half a bundle.
``--dry-run`` prints the exact adb commands instead of running them (no adb or phone needed).

File names come from the manifest, a file anyone can edit: they are checked to stay inside the bundle
(:func:`mobilemllm.bundle.load_manifest`) and every argument of an ``adb shell`` command is quoted for
the phone's shell (adb joins its arguments with spaces and the phone runs ``sh -c`` on the result).
"""

from __future__ import annotations

import posixpath
import re
import shlex
from pathlib import Path
from typing import Optional

import typer

from mobilemllm.bench.adb import DEVICE_ROOT, _check, find_adb, list_devices, pick_serial, shell
from mobilemllm.bundle import load_manifest
from mobilemllm.bundle.layout import MANIFEST_NAME
from mobilemllm.bundle.manifest import confined_path
from mobilemllm.errors import BackendUnavailable, UserError

TARGETS = ("android",)
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ADB_HELP = ("install Android platform-tools (Debian/Ubuntu: `apt-get install adb`; or the SDK's "
            "platform-tools) and put adb on PATH, or pass --dry-run to print the commands")


def device_dir(name: str) -> str:
    return f"{DEVICE_ROOT}/{name}"


def check_name(name: str) -> str:
    if not NAME_RE.match(name) or name.endswith(".partial"):
        raise UserError(f"--name {name!r} is not a usable folder name on the phone; use letters, digits, '.', '_' "
                        "and '-' (up to 64, not ending in .partial)")
    return name


def bundle_files(bundle: Path, manifest: dict) -> list[str]:
    """Every file of the bundle, manifest.json last (the app treats a folder with a manifest as complete).

    Refuses (one line) a manifest whose paths lead outside ``bundle``, before any command is built.
    """
    for rel in manifest["files"]:
        confined_path(bundle, rel)
    return sorted(manifest["files"]) + [MANIFEST_NAME]


def adb_commands(bundle: Path, manifest: dict, name: str, serial: str | None = None,
                 adb: str = "adb") -> list[list[str]]:
    """The exact adb invocations that copy ``bundle`` to ``/data/local/tmp/mobilemllm/<name>/``."""
    base = [adb] + (["-s", serial] if serial else [])
    final = device_dir(name)
    staging = final + ".partial"
    files = bundle_files(bundle, manifest)
    subdirs = sorted({posixpath.dirname(f) for f in files if posixpath.dirname(f)})
    cmds = [base + shell("rm", "-rf", staging),
            base + shell("mkdir", "-p", staging, *[f"{staging}/{d}" for d in subdirs])]
    for rel in files:  # adb push takes the remote path as one argument, no shell: not quoted
        cmds.append(base + ["push", str(bundle / rel), f"{staging}/{rel}"])
    cmds.append(base + shell("sha256sum", *[f"{staging}/{rel}" for rel in sorted(manifest["files"])]))
    cmds.append(base + shell("rm", "-rf", final))
    cmds.append(base + shell("mv", staging, final))
    return cmds


def connected_devices(adb: str) -> dict[str, str]:
    """{serial: state} from ``adb devices`` (state is 'device' when usable)."""
    return dict(list_devices(adb))


def pick_device(devices: dict[str, str], serial: str | None) -> str:
    return pick_serial(list(devices.items()), serial, choose="--serial {serial}")


def check_sums(output: str, manifest: dict, staging: str) -> None:
    """Compare the phone's ``sha256sum`` output with the manifest; name each file that differs."""
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
    try:
        adb = find_adb()
    except BackendUnavailable:
        raise BackendUnavailable(f"adb was not found on PATH: {ADB_HELP}") from None
    serial = pick_device(connected_devices(adb), serial)
    cmds = adb_commands(bundle, manifest, name, serial, adb="adb")
    staging = device_dir(name) + ".partial"
    for cmd in cmds:
        typer.echo(shlex.join(cmd), err=True)
        out = _check([adb] + cmd[1:], timeout=1800)
        if cmd[3:5] == ["shell", "sha256sum"]:  # cmd is [adb, -s, serial, ...]: a serial is always picked here
            check_sums(out, manifest, staging)
    typer.echo(f"pushed {bundle} to {serial}:{device_dir(name)}/ ({len(manifest['files']) + 1} files); "
               "open the MobileMLLM demo app and pick it")
