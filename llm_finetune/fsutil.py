"""Folders that appear complete or not at all (a crash never leaves a half-written model), and
the disk checks made before writing one."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llm_finetune.errors import UserError


def refuse_existing(path: Path, overwrite: bool, what: str) -> None:
    """Fail early, before any work, when `path` exists and overwriting was not asked for."""
    if path.exists() and not overwrite:
        raise UserError(
            f"{what} {str(path)!r} already exists; remove it, choose another path, "
            "or allow replacing it (overwrite: true in the config, --overwrite on the command line)"
        )


def looks_like_local_path(name: str) -> bool:
    """Whether `name` is meant as a folder on this machine, so that a missing one is reported
    as missing rather than looked up on the Hub: it exists, starts with `.`, `/` or `~`, ends
    with a separator, has more parts than `namespace/name`, or its parent folder exists."""
    if name.startswith((".", "/", "~")) or name.endswith(("/", os.sep)) or name.count("/") > 1:
        return True
    path = Path(name).expanduser()
    return path.exists() or (path.parent != Path(".") and path.parent.is_dir())


def existing_ancestor(path: Path) -> Path:
    """`path`, or the nearest folder above it that exists (where it will be made)."""
    while not path.exists():
        path = path.parent
    return path


def check_output_folder(name: str, what: str) -> None:
    """A folder that will be written (made if missing): not a file, not under one, and in a
    folder this user may write to."""
    path = Path(name).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {name!r} is a file, not a folder; choose another path")
    above = path if path.exists() else path.parent
    while not above.exists():
        above = above.parent
    if not above.is_dir():
        raise UserError(
            f"{what} {name!r} is under {str(above)!r}, which is a file, not a folder; "
            "choose another path"
        )
    if not os.access(above, os.W_OK | os.X_OK):
        raise UserError(
            f"{what} {name!r}: this user may not write in {str(above)!r}; choose another path, "
            "or change the folder's permissions"
        )


def check_free_disk(output: Path, needed: int, what: str = "the merged model") -> None:
    """Refuse to start writing `needed` bytes at `output` on a disk that cannot hold them."""
    parent = existing_ancestor(output.resolve().parent)
    free = shutil.disk_usage(parent).free
    if free < needed * 1.05:
        raise UserError(
            f"not enough disk for {what} in {str(parent)!r}: it needs "
            f"{needed / 1e9:.2f} GB, {free / 1e9:.2f} GB are free; free space or choose --output"
        )


def same_disk(a: Path, b: Path) -> bool:
    """Whether paths `a` and `b` (made later if missing) land on one filesystem."""
    return (
        existing_ancestor(a.resolve()).stat().st_dev == existing_ancestor(b.resolve()).stat().st_dev
    )


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def give_default_modes(folder: Path) -> None:
    """Give `folder` and what is in it the modes a plain write would have (0666/0777 & ~umask).

    mkdtemp makes 0700 folders, and some writers (Unsloth's merge) write 0600 files; left so,
    a model folder is unreadable to a server running under another user on a shared box.
    """
    mask = _umask()
    folder.chmod(0o777 & ~mask)
    for path in folder.rglob("*"):
        if path.is_symlink():
            continue
        executable = path.is_dir() or path.stat().st_mode & 0o111
        path.chmod((0o777 if executable else 0o666) & ~mask)


def leftovers(target: Path) -> list[Path]:
    """The hidden folders that killed `atomic_dir`s of `target` left beside it."""
    prefixes = (f".{target.name}.partial-", f".{target.name}.old-")
    return [p for p in target.parent.glob(f".{target.name}.*-*") if p.name.startswith(prefixes)]


@contextlib.contextmanager
def atomic_dir(
    target: Path, overwrite: bool = False, what: str = "output folder"
) -> Iterator[Path]:
    """Yield an empty staging folder beside `target`; rename it into place only on success.

    On failure the staging folder is removed and an existing `target` is left untouched. On
    success the folder and its files get the modes of a plain write (`give_default_modes`).
    """
    target = Path(target)
    refuse_existing(target, overwrite, what)
    target.parent.mkdir(parents=True, exist_ok=True)
    for leftover in leftovers(target):  # from a killed earlier run
        shutil.rmtree(leftover, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield staging
        give_default_modes(staging)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            target.rename(old / target.name)
            staging.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def read_json_object(path: Path, fix: str) -> dict[str, Any]:
    """The JSON object in `path` (a config, an index, a manifest); a file that cannot be read,
    or is not a JSON object, is one line naming it and ending with `fix`."""
    name = repr(str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if path.is_symlink():
            raise UserError(
                f"{name} is a link to {os.readlink(path)}, which does not exist: {fix}"
            ) from None
        raise UserError(f"{name} does not exist: {fix}") from None
    except UnicodeDecodeError:
        raise UserError(f"{name} is not JSON (not even UTF-8 text): {fix}") from None
    except OSError as exc:
        raise UserError(f"cannot read {name} ({exc.strerror or exc}): {fix}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        where = "it is empty" if not text.strip() else f"line {exc.lineno}: {exc.msg}"
        raise UserError(f"{name} is not valid JSON ({where}): {fix}") from None
    except RecursionError:
        raise UserError(f"{name} is not valid JSON (nested too deeply): {fix}") from None
    if not isinstance(data, dict):
        raise UserError(f"{name} holds a JSON {type(data).__name__}, not an object: {fix}")
    return data
