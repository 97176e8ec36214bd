"""Find host syncs on CPU: the ops that, on a GPU, make the host wait for the device.

A CPU run never waits, so a sync cannot be timed here; it can be seen. Every value the host
reads from a tensor (``bool(t)``, ``.item()``, ``int(t)``, ``if t.any():``) goes through
``aten._local_scalar_dense``; ``torch.equal``, ``nonzero``, boolean-mask indexing and
``unique`` need the data to size or decide their result. A dispatch mode sees each of them.
(``.tolist()`` reads memory without an op: it escapes this check.)
"""
from __future__ import annotations

import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
SYNC_OPS = {
    aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default, aten.nonzero.default,
    aten.masked_select.default, aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
}
TORCH = str(Path(torch.__file__).parent)


class HostSyncError(AssertionError):
    pass


def _is_sync(func: object, args: tuple) -> bool:
    if func in SYNC_OPS:
        return True
    if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default):
        # boolean-mask indexing: the device's mask decides how many elements (nonzero on the host)
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None)
    return False


class HostSyncs(TorchDispatchMode):
    """Record (or, with ``forbid=True``, refuse) host syncs; ``where`` is the innermost caller outside torch."""

    def __init__(self, forbid: bool = False) -> None:
        super().__init__()
        self.forbid = forbid
        self.calls: list[tuple[str, str, str]] = []  # (op, file name, function)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if _is_sync(func, args):
            frame = next(f for f in reversed(traceback.extract_stack()[:-1])
                         if not f.filename.startswith(TORCH) and f.filename != __file__)
            if self.forbid:
                raise HostSyncError(f"host sync {func} at {frame.filename}:{frame.lineno} ({frame.name})")
            self.calls.append((str(func), Path(frame.filename).name, frame.name))
        return func(*args, **(kwargs or {}))

    def count(self, file: str, function: str) -> int:
        return sum(1 for _, f, name in self.calls if f == file and name == function)
