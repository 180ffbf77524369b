"""workers/storage.py on a local disk: links inside an output are never followed by a listing or a
delete (a link is listed and removed as itself, a folder that is a link is refused), so no file
ifrender did not write is ever deleted."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from workers.errors import StorageError
from workers.storage import delete, list_prefix, write_bytes


def foreign(tmp_path: Path) -> Path:
    """Someone else's folder on another disk, with files ifrender never wrote."""
    other = tmp_path / "other-disk"
    (other / "deep").mkdir(parents=True)
    for name in ("a.png", "b.txt", "deep/c.bin"):
        (other / name).write_bytes(b"not ifrender's")
    return other


def count(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file())


def test_a_link_inside_the_output_is_listed_and_deleted_as_a_link(tmp_path):
    other = foreign(tmp_path)
    out = tmp_path / "out"
    write_bytes(str(out / "images/000000-000-run1/r0.png"), b"ours")
    os.symlink(other, out / "images" / "000000-000-planted")  # under an attempt folder's name
    os.symlink(other / "a.png", out / "images" / "000000-000-run1" / "r1.png")
    before = count(other)
    keys = list_prefix(str(out), "images/")
    assert keys == ["images/000000-000-planted", "images/000000-000-run1/r0.png", "images/000000-000-run1/r1.png"]
    assert list_prefix(str(out), "images/000000-") == keys
    delete(str(out), keys)
    assert count(other) == before == 3  # the links went, their targets stayed
    assert (
        not (out / "images" / "000000-000-planted").is_symlink() and not (out / "images" / "000000-000-run1").exists()
    )


def test_a_folder_of_the_output_that_is_a_link_is_refused_naming_it(tmp_path):
    other = foreign(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(other, out / "images")
    with pytest.raises(StorageError, match=r"out/images: a link inside the output \(to .*other-disk\)"):
        list_prefix(str(out), "images/000000-")
    with pytest.raises(StorageError, match="a link inside the output"):
        delete(str(out), ["images/a.png"])
    assert list_prefix(str(out)) == ["images"]  # at the top it is listed as itself, never followed
    assert count(other) == 3


def test_the_output_itself_may_be_a_link_and_is_never_removed(tmp_path):
    target = tmp_path / "real"
    target.mkdir()
    link = tmp_path / "named"
    os.symlink(target, link)
    write_bytes(str(link / "job.json"), b"{}")
    assert list_prefix(str(link)) == ["job.json"]
    delete(str(link), ["job.json"])
    assert target.is_dir() and link.is_symlink() and not list_prefix(str(link))
