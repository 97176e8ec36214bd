"""Permissions of what io.py writes atomically: other users of a shared machine must be able to read
results and models, as they can files written with a plain ``open``/``mkdir``."""
import os
import stat
from collections.abc import Iterator

import pytest

from latentreason.io import (
    PARTIAL_PREFIX,
    FolderBusyError,
    atomic_replace_dir,
    atomic_write_json,
    atomic_write_text,
    make_temp_dir,
    one_writer,
    remove_partial,
    set_default_file_mode,
)
from tests.conftest import folder_held_by_another_process


@pytest.fixture(params=[0o022, 0o027], ids=["umask022", "umask027"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    """Two masks, so the modes are seen to follow the umask rather than a fixed value."""
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(path: os.PathLike) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_write_gives_umask_file_mode(tmp_path, umask: int) -> None:
    target = tmp_path / "out" / "result.txt"
    atomic_write_text(target, "x\n")
    assert _mode(target) == 0o666 & ~umask  # not mkstemp's 0o600
    atomic_write_json(tmp_path / "summary.json", {"a": 1})
    assert _mode(tmp_path / "summary.json") == 0o666 & ~umask


def test_make_temp_dir_gives_umask_dir_mode(tmp_path, umask: int) -> None:
    tmp = make_temp_dir(tmp_path, "model")
    assert tmp.parent == tmp_path and tmp.name.startswith(".latentreason-partial-model-") and not any(tmp.iterdir())
    assert _mode(tmp) == 0o777 & ~umask  # not mkdtemp's 0o700
    atomic_replace_dir(tmp, tmp_path / "model")
    assert _mode(tmp_path / "model") == 0o777 & ~umask  # the mode survives the rename into place


def test_set_default_file_mode(tmp_path, umask: int) -> None:
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"")
    os.chmod(path, 0o600)  # what safetensors 0.8's save_file leaves
    set_default_file_mode(path)
    assert _mode(path) == 0o666 & ~umask


def test_saved_model_folder_is_readable_by_others(tmp_path, umask: int) -> None:
    """save_checkpoint: the folder (mkdtemp) and the weights (safetensors) were both owner-only."""
    from latentreason.models.loading import load_model, save_checkpoint

    save_checkpoint(load_model("tiny-llama-l2-d64"), tmp_path / "ckpt")
    assert _mode(tmp_path / "ckpt") == 0o777 & ~umask
    files = sorted((tmp_path / "ckpt").iterdir())
    assert any(f.suffix == ".safetensors" for f in files)
    assert {f.name: _mode(f) for f in files} == {f.name: 0o666 & ~umask for f in files}


# -- one writer per output folder; what killed writes leave is recognised by name -------------------
def test_a_folder_held_by_another_process_is_refused_until_that_process_dies(tmp_path) -> None:
    """The holder is named; a kill -9 frees the folder (the system drops the lock with the process)."""
    folder = tmp_path / "run"
    with folder_held_by_another_process(folder) as holder:
        with pytest.raises(FolderBusyError, match=rf"{folder}: another process is writing here \(pid {holder.pid} .*eval.output_dir"):
            with one_writer(folder, "eval.output_dir"):
                pass
        holder.kill()
        holder.wait()
        with one_writer(folder, "eval.output_dir"):
            with one_writer(folder / ".", "eval.output_dir"):  # nested in the same process: shared, not refused
                pass


def test_remove_partial_deletes_only_what_killed_writes_left(tmp_path) -> None:
    tmp = make_temp_dir(tmp_path, "checkpoint")
    (tmp / "trainable.safetensors").write_bytes(b"half")
    (tmp_path / f"{PARTIAL_PREFIX}predictions.jsonl-abc").write_text("{")
    for mine in (".git", ".checkpoint-old", "checkpoint.old"):  # a user's, or older names: never touched
        (tmp_path / mine).mkdir()
    (tmp_path / "log.jsonl").write_text("{}\n")
    assert remove_partial(tmp_path) == sorted([tmp.name, f"{PARTIAL_PREFIX}predictions.jsonl-abc"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [".checkpoint-old", ".git", "checkpoint.old", "log.jsonl"]


def test_a_file_system_without_locks_runs_unguarded_with_a_warning(tmp_path, monkeypatch, caplog) -> None:
    """Some network mounts refuse flock (ENOLCK): that is no other writer, so the run goes on."""
    import errno
    import fcntl
    import logging

    def no_locks(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    ran = False
    with caplog.at_level(logging.WARNING, logger="latentreason"):
        with one_writer(tmp_path / "run", "eval.output_dir"):
            ran = True
    assert ran and "cannot lock" in caplog.text
