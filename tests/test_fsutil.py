"""atomic_dir: a folder appears whole, with the modes of a plain write, or not at all; and the
disk check before writing one."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from llm_finetune.errors import UserError
from llm_finetune.fsutil import atomic_dir


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o027], ids=["umask-022", "umask-027"])
def test_the_folder_and_its_files_get_the_modes_of_a_plain_write(tmp_path, mask):
    saved = os.umask(mask)
    try:
        with atomic_dir(tmp_path / "merged") as stage:
            (stage / "model.safetensors").write_bytes(b"x")
            (stage / "model.safetensors").chmod(0o600)  # as Unsloth's merge writes it
            (stage / "sub").mkdir(mode=0o700)
            (stage / "sub" / "run.sh").write_text("#!/bin/sh\n")
            (stage / "sub" / "run.sh").chmod(0o700)
    finally:
        os.umask(saved)
    merged = tmp_path / "merged"
    assert _mode(merged) == 0o777 & ~mask  # mkdtemp alone leaves 0700
    assert _mode(merged / "model.safetensors") == 0o666 & ~mask
    assert _mode(merged / "sub") == 0o777 & ~mask
    assert _mode(merged / "sub" / "run.sh") == 0o777 & ~mask


def test_a_failure_leaves_the_old_folder_and_no_staging_folder(tmp_path):
    target = tmp_path / "merged"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(target, overwrite=True) as stage:
        (stage / "new.txt").write_text("new")
        raise RuntimeError("merge failed")
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]
    assert [p.name for p in target.iterdir()] == ["old.txt"]


def test_an_existing_folder_is_refused_unless_overwrite(tmp_path):
    (tmp_path / "merged").mkdir()
    with pytest.raises(UserError, match="already exists"), atomic_dir(tmp_path / "merged"):
        pass
    with atomic_dir(tmp_path / "merged", overwrite=True) as stage:
        (stage / "new.txt").write_text("new")
    assert [p.name for p in (tmp_path / "merged").iterdir()] == ["new.txt"]


def test_the_disk_check_looks_at_the_nearest_existing_folder(tmp_path, monkeypatch):
    """The output's folders do not exist yet: the disk is the one they will be made on."""
    from llm_finetune import fsutil

    output = tmp_path / "not" / "yet" / "merged"
    assert fsutil.existing_ancestor(output) == tmp_path
    asked = []

    def usage(path):
        asked.append(path)
        return shutil._ntuple_diskusage(10**10, 0, 10**9)

    monkeypatch.setattr(fsutil.shutil, "disk_usage", usage)
    fsutil.check_free_disk(output, 9 * 10**8)
    assert asked == [tmp_path]
    with pytest.raises(UserError, match=r"not enough disk for the base's download in .* it needs"):
        fsutil.check_free_disk(output, 10**9, "the base's download")


def test_names_that_look_like_folders_are_never_hub_ids(tmp_path, monkeypatch):
    from llm_finetune.fsutil import looks_like_local_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    for folder in ("./x", "/x", "x/", "~/x", "a/b/c", "outputs/missing", "outputs"):
        assert looks_like_local_path(folder), folder
    for hub_id in ("gpt2", "meta-llama/Llama-3.1-8B", "alice/base"):
        assert not looks_like_local_path(hub_id), hub_id
