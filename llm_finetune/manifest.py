"""A small JSON beside every artefact: what made it, and the hash and size of every file.

A re-run reuses a finished adapter or merged model only when its manifest still matches the
files on disk and the config that made it; publishing checks it before uploading, so what
lands on the Hub is exactly what was verified.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from llm_finetune.errors import UserError
from llm_finetune.fsutil import read_json_object

MANIFEST = "llm-finetune-manifest.json"
LIBRARIES = ("llm-finetune", "torch", "transformers", "peft", "trl", "datasets", "huggingface_hub")
HASH_CHUNK = 8 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint(data: Any) -> str:
    """A stable hash of JSON-able data (a config section), to tell configs apart."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


@functools.cache
def source_commit() -> str | None:
    """The git commit of this package's checkout (with "-dirty" when it has local changes),
    None for an installed package: a version number alone does not say which code ran."""
    checkout = Path(__file__).resolve().parent.parent
    if not (checkout / ".git").exists():
        return None
    try:
        git = ["git", "-C", str(checkout)]
        commit = subprocess.run(
            [*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        changed = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):  # no git on the box, or not a repository
        return None
    return commit + ("-dirty" if changed else "")


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in LIBRARIES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    if commit := source_commit():
        found["llm-finetune-commit"] = commit
    return found


def file_table(folder: Path) -> dict[str, dict[str, Any]]:
    return {
        path.relative_to(folder).as_posix(): {
            "sha256": sha256_file(path),
            "size": path.stat().st_size,
        }
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }


def write_manifest(folder: Path, stage: str, fingerprint_of_inputs: str, **facts: Any) -> dict:
    """Describe `folder` (every file's sha256 and size) and what produced it."""
    manifest = {
        "stage": stage,
        "inputs_fingerprint": fingerprint_of_inputs,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": versions(),
        "files": file_table(folder),
        **facts,
    }
    path = Path(folder) / MANIFEST
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(path)
    return manifest


def read_manifest(folder: Path) -> dict | None:
    """The folder's manifest (None without one); a damaged one is a one-line UserError."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    fix = "remove the folder and make it again (overwrite: true in a run)"
    manifest = read_json_object(path, fix)
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(isinstance(f, dict) for f in files.values()):
        raise UserError(f"{str(path)!r} lists no files, it is damaged: {fix}")
    return manifest


def check_manifest(folder: Path, fingerprint_of_inputs: str | None = None) -> dict:
    """The folder's files are exactly those its manifest lists (and, if given, from the same
    inputs). Raises UserError naming what differs."""
    manifest = read_manifest(folder)
    if manifest is None:
        raise UserError(
            f"{str(folder)!r} already exists without a {MANIFEST} (unfinished, or not ours): "
            "remove it, use a new output_dir, or overwrite: true to replace it"
        )
    if (
        fingerprint_of_inputs is not None
        and manifest.get("inputs_fingerprint") != fingerprint_of_inputs
    ):
        raise UserError(
            f"{str(folder)!r} was made from a different config or input; "
            "use a new output_dir, or overwrite: true to replace it"
        )
    actual = file_table(Path(folder))
    expected = manifest["files"]
    changed = sorted(
        name for name in set(actual) | set(expected) if actual.get(name) != expected.get(name)
    )
    if changed:
        raise UserError(
            f"{str(folder)!r} changed since it was written ({', '.join(changed[:3])}"
            f"{'...' if len(changed) > 3 else ''}); restore the files or set overwrite: true"
        )
    return manifest
