"""Output folders are written all or nothing."""

import os

import pytest
from GDPILiverAnomalyLib.errors import OutputError
from GDPILiverAnomalyLib.files.outputs import atomic_dir, check_output_dir, write_text_atomic


def test_atomic_dir_creates_the_folder_only_on_success(tmp_path):
    out = tmp_path / "result"
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("interrupted")
    assert not out.exists() and os.listdir(tmp_path) == []
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("a")
    assert (out / "a.txt").read_text() == "a" and os.listdir(tmp_path) == ["result"]


def test_atomic_dir_replaces_an_existing_folder_as_a_whole(tmp_path):
    out = tmp_path / "result"
    out.mkdir()
    (out / "a.txt").write_text("old")
    (out / "stale.txt").write_text("from the earlier run")
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("new")
    assert os.listdir(out) == ["a.txt"] and (out / "a.txt").read_text() == "new"
    assert os.listdir(tmp_path) == ["result"]


def test_output_contract_refuses_non_empty_folders_unless_overwriting_a_result(tmp_path):
    out = tmp_path / "result"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="exists and is not empty.*--overwrite"):
        check_output_dir(out)
    with pytest.raises(OutputError, match="not an earlier result"):
        check_output_dir(out, overwrite=True, marker="run.json")
    (out / "run.json").write_text("{}")
    assert check_output_dir(out, overwrite=True, marker="run.json") == out
    link = tmp_path / "link"
    link.symlink_to(out)
    assert check_output_dir(link, overwrite=True, marker="run.json") == out  # the target


def test_check_output_dir_refuses_a_file_and_an_unwritable_parent(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="not a folder"):
        check_output_dir(tmp_path / "file")
    assert check_output_dir(tmp_path / "new" / "deeper") == (tmp_path / "new" / "deeper")
    assert not (tmp_path / "new").exists()  # checking writes nothing


def test_write_text_atomic_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "summary.csv"
    write_text_atomic(path, "a,b\n")
    write_text_atomic(path, "c,d\n")
    assert path.read_text() == "c,d\n" and os.listdir(tmp_path) == ["summary.csv"]


def test_overwrite_replaces_only_a_folder_that_is_all_result(tmp_path):
    out = tmp_path / "result"
    out.mkdir()
    (out / "run.json").write_text("{}")
    (out / "notes.txt").write_text("the user's notes beside an earlier result")
    is_result = lambda p: p.name in ("run.json", "score.nrrd")  # noqa: E731
    with pytest.raises(OutputError, match="notes.txt is not part of one"):
        check_output_dir(out, overwrite=True, marker="run.json", result_entries=is_result)
    (out / "notes.txt").unlink()
    assert check_output_dir(out, True, "run.json", is_result) == out


def test_the_current_folder_and_mount_points_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputError, match="current folder"):
        check_output_dir(".")
    with pytest.raises(OutputError, match="current folder"):
        check_output_dir(tmp_path.parent)
    with pytest.raises(OutputError, match="mount point"):
        check_output_dir("/proc")


def test_without_replace_a_folder_filled_meanwhile_is_kept(tmp_path):
    out = tmp_path / "result"
    with (
        pytest.raises(OutputError, match="filled by something else"),
        atomic_dir(out, replace=False) as tmp,
    ):
        (tmp / "score.nrrd").write_text("new")
        out.mkdir()
        (out / "other.txt").write_text("another run got here first")
    assert os.listdir(out) == ["other.txt"] and os.listdir(tmp_path) == ["result"]
