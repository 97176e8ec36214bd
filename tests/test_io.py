"""Permissions of what io.py writes atomically: other users of a shared machine must be able to read
results and models, as they can files written with a plain ``open``/``mkdir``."""
import os
import stat
from collections.abc import Iterator

import pytest

from latentreason.io import (
    atomic_replace_dir,
    atomic_write_json,
    atomic_write_text,
    make_temp_dir,
    set_default_file_mode,
)


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
    tmp = make_temp_dir(tmp_path, prefix=".model-")
    assert tmp.parent == tmp_path and tmp.name.startswith(".model-") and not any(tmp.iterdir())
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
