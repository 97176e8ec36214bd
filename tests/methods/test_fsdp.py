"""Training under FSDP2: two CPU processes over gloo (tests/fsdp_launch.py), the GPU path's logic."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from latentreason.cli import main
from tests.conftest import ROOT, cli_args, subprocess_env, tiny_run

pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 needs torch >= 2.6")


def _launch(cfg: dict, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "fsdp_launch.py"), *extra, *cli_args(cfg)]
    return subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)


def test_fsdp_training_saves_whole_weights_resumes_and_matches_one_process(tmp_path, capsys):
    train = {"max_steps": 6, "save_every": 3, "eval_every": 3, "global_batch_size": 16, "micro_batch_size": 8,
             "select_on_valid": True}
    one = tiny_run(tmp_path / "one", train=train)
    assert main(["train", *cli_args(one)]) == 0
    two = tiny_run(tmp_path / "two", train=train)
    out = tmp_path / "two" / "run"
    # Stopped right after step 3's checkpoint (gathered onto the main process), then resumed from
    # it (scattered back): the 6 steps end where one process without FSDP ends.
    first = _launch(two, "--stop-at", "3")
    assert first.returncode != 0 and not (out / "final").exists(), first.stderr[-3000:]
    state = torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 3 and state["sharded"] is True
    second = _launch(two)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stderr
    reference = load_file(str(tmp_path / "one" / "run" / "final" / "model.safetensors"))
    for folder in ("final", "best"):
        weights = load_file(str(out / folder / "model.safetensors"))
        assert weights.keys() == reference.keys(), folder
        assert all(not isinstance(t, torch.distributed.tensor.DTensor) for t in weights.values())
    sharded = load_file(str(out / "final" / "model.safetensors"))
    for key in reference:
        torch.testing.assert_close(sharded[key], reference[key], rtol=1e-4, atol=1e-5, msg=key)
    # Validation ran with the weights gathered, and chose best/ as one process does.
    import json

    def valid(run):
        return [r["valid_metric"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())
                if "valid_metric" in r]
    assert valid(out) == valid(tmp_path / "one" / "run") and len(valid(out)) == 2
    # The optimizer state is laid out per name under FSDP: resuming without it is refused.
    capsys.readouterr()
    assert main(["train", *cli_args(two)]) != 0
    assert "written under FSDP, resumed without FSDP" in capsys.readouterr().err
