"""Shared fixtures: small run configs on tiny models built in code (no downloads)."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# This checkout's package, not whichever one the environment has installed (an editable install of
# another worktree): in-process tests and the subprocesses of subprocess_env() import the same code.
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# model.device=auto means the CPU in the default suite, on a GPU machine too (subprocesses inherit
# it): its tolerances are float32 CPU ones. GPU checks live in benchmarks/ (bench_rollout_gpu.py).
os.environ.setdefault("LATENTREASON_DEVICE", "cpu")
# Tiny models gain nothing from a second thread, and on a shared 2-core machine two threads per
# process make OpenMP spin-wait against every other process.
torch.set_num_threads(1)


def tiny_run(tmp_path: Path, method: str = "cot-sft", **sections: dict) -> dict:
    """A nested config dict for a seconds-long run on arith with a 2-layer model."""
    base = {
        "method": {"name": method},
        "model": {"name_or_path": "tiny-llama-l2-d64", "max_positions": 128},
        "data": {"task": "arith", "options": {"num_steps": 2, "train_size": 512, "valid_size": 64, "test_size": 64}},
        "optim": {"lr": 3e-3},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 6, "global_batch_size": 16,
                  "micro_batch_size": 8, "save_every": 3, "log_every": 2, "eval_limit": 16},
        "rollout": {"max_new_tokens": 24},
        "eval": {"batch_size": 16, "limit": 32},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return base


def cli_args(config: dict) -> list[str]:
    """Flatten a nested config dict into section.field=value overrides."""
    import json

    out = []
    for section, fields in config.items():
        for key, value in fields.items():
            out.append(f"{section}.{key}={json.dumps(value) if not isinstance(value, str) else value}")
    return out


PYTHON = sys.executable


def subprocess_env() -> dict[str, str]:
    """Environment for a CLI subprocess: this checkout's src/ (and tests/) first, one thread, CPU.

    GPUs are hidden unless the suite was asked to run on one: ``accelerate launch`` of two
    processes would otherwise place them on cuda:0 and cuda:1 of a one-GPU machine."""
    path = os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    if env.get("LATENTREASON_DEVICE", "cpu") == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def train_on_one_and_two_processes(cfg: Callable[[Path], dict], root: Path) -> tuple[Path, Path]:
    """``latentreason train`` of ``cfg(root / "one")`` in one process and of ``cfg(root / "two")`` under
    ``accelerate launch`` with two DDP processes; returns both output folders."""
    one = subprocess.run([sys.executable, "-m", "latentreason.cli", "train", *cli_args(cfg(root / "one"))],
                         env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(ROOT / "configs" / "accelerate" / "ddp.yaml"), "--num_processes", "2", "-m", "latentreason.cli",
              "train", *cli_args(cfg(root / "two"))]
    two = subprocess.run(launch, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    return root / "one" / "run", root / "two" / "run"

@contextlib.contextmanager
def folder_held_by_another_process(folder: Path) -> Iterator[subprocess.Popen]:
    """A second Python process holding ``folder`` through ``one_writer`` while the block runs (a lock
    taken in this process would be this process's own, which ``one_writer`` lets nested code share)."""
    code = ("import sys, time; from latentreason.io import one_writer\n"
            "with one_writer(sys.argv[1], 'x'):\n    print('held', flush=True); time.sleep(300)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder)], env=subprocess_env(),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.kill()
        holder.wait()


# Tests on the real data in ../shared/data skip on a machine without it, but never in CI (CI=true),
# where a missing folder must fail loudly instead of passing with the checks skipped.
from latentreason.data.base import SHARED_DATA  # noqa: E402

needs_data = pytest.mark.skipif(
    not SHARED_DATA.is_dir() and not os.environ.get("CI"), reason=f"{SHARED_DATA} not present (outside CI)"
)


@pytest.fixture(scope="session")
def trained_arith_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``final/`` of a cot-sft model trained ~8 s on tiny_run's arith, shared by the session.

    Why: an untrained model writes the same text for every question, so a test comparing rows
    (batch sizes, resume) passes whatever the code does; this one answers each row differently.
    """
    from latentreason.config import load_run_config
    from latentreason.recipes import run_train

    tmp = tmp_path_factory.mktemp("trained-arith")
    cfg = tiny_run(tmp, train={"max_steps": 200, "save_every": 200, "log_every": 50, "select_on_valid": False})
    return Path(run_train(load_run_config(base=cfg))) / "final"
