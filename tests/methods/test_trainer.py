"""The shared trainer: parameters move, exact resume after SIGKILL, same result on 2 processes."""
from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from latentreason.recipes import build_method
from latentreason.config import load_run_config
from latentreason.methods import METHODS
from latentreason.methods.trainer import Trainer, batch_indices
from tests.conftest import ROOT, cli_args, subprocess_env, tiny_run

TRAINABLE = [name for name in METHODS.names() if METHODS.get(name).trainable]


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final" / "model.safetensors"))


def _env() -> dict[str, str]:
    return subprocess_env()


@pytest.mark.parametrize("name", TRAINABLE)
def test_every_trainable_method_moves_every_trainable_parameter(name, tmp_path):
    # 6 steps: a staged method (Coconut: 5 curriculum stages here) gets at least one step per stage.
    # DLR: 3 warm-start steps, then 3 RL steps (its default warm start is longer than the whole run)
    method_cfg = {"dlr": {"warm_start_steps": 3, "group_size": 4}, "grpo": {"group_size": 4}}.get(name, {})
    cfg = tiny_run(tmp_path, name, train={"max_steps": 6, "save_every": 6})
    cfg["method"].update(method_cfg)
    run = load_run_config(base=cfg)
    method = build_method(run)
    params = lambda: [(f"lm.{n}", p) for n, p in method.loaded.model.named_parameters()] + [  # noqa: E731
        (f"{k}.{n}", p) for k, m in method.extra_modules().items() for n, p in m.named_parameters()]
    before = {n: p.detach().clone() for n, p in params() if p.requires_grad}
    assert before, f"{name}: nothing to train"
    examples = method.task.load("train", limit=64)
    # a constant validation metric: stages that keep their best checkpoint (Latent-SFT) need one
    Trainer(run, method, examples, select=lambda m: 0.0).train()
    after = dict(params())
    unchanged = [n for n, p in before.items() if torch.equal(p, after[n].detach())]
    assert not unchanged, f"{name}: parameters did not move: {unchanged[:5]}"
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert [r for r in log if "loss" in r][-1]["step"] == 6
    # a supervised loss is positive; an RL surrogate (advantages of either sign) only finite
    assert all(v > 0 if not method.on_policy else math.isfinite(v) for v in losses)


def test_loss_falls_and_best_keeps_the_weights_of_the_best_validation_metric(tmp_path):
    """The metric rises then falls: best/ must hold the weights of the peak, not the last ones."""
    run = load_run_config(base=tiny_run(tmp_path, train={"max_steps": 45, "save_every": 15, "eval_every": 15}))
    method = build_method(run)
    metrics, snapshots = iter([0.5, 0.9, 0.3]), []

    def select(m):
        snapshots.append({n: p.detach().clone() for n, p in m.loaded.model.state_dict().items()})
        return next(metrics)

    result = Trainer(run, method, method.task.load("train"), select=select).train()
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[-1] < 0.7 * losses[0]
    assert [(r["step"], r["valid_metric"]) for r in log if "valid_metric" in r] == [(15, 0.5), (30, 0.9), (45, 0.3)]
    assert result.best_metric == 0.9
    best = _saved_weights(tmp_path / "run" / "best")
    for name, value in best.items():
        torch.testing.assert_close(value, snapshots[1][name], rtol=0, atol=0, msg=name)
    final = _saved_weights(tmp_path / "run" / "final")
    assert any(not torch.equal(final[k], best[k]) for k in best), "final/ should hold the last weights"


def _saved_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("name", ["grpo", "cot-sft"])
def test_on_policy_losses_run_without_dropout(name, tmp_path):
    """GRPO/DLR sample in eval mode; scoring the samples in train mode (dropout on) would make the
    first update's importance ratios differ from 1 and the clip drop them. SFT keeps dropout."""
    cfg = tiny_run(tmp_path, name, train={"max_steps": 2, "save_every": 2, "select_on_valid": False})
    if name == "grpo":
        cfg["method"].update(group_size=2)
    run = load_run_config(base=cfg)
    method = build_method(run)
    seen, real = [], method.loss

    def loss(modules, batch):
        seen.append(any(m.training for m in modules.modules()))
        return real(modules, batch)

    method.loss = loss
    Trainer(run, method, method.task.load("train", limit=16)).train()
    assert seen and all(flag == (name == "cot-sft") for flag in seen), seen


@pytest.mark.parametrize("global_batch,micro,world,hint", [
    (64, 64, 3, "train.global_batch_size=66 and train.micro_batch_size=22"),  # 3 processes cannot share 64
    (10, 4, 3, "train.global_batch_size=12"),  # the old hint (micro 3) was itself invalid
    (2, 1, 3, "train.global_batch_size=3"),  # fewer examples than processes
    (48, 5, 3, "train.micro_batch_size=4"),  # 16 each: the largest divisor up to 5
    (48, 32, 2, "train.micro_batch_size=24"),
])
def test_an_uneven_batch_gets_settings_that_divide(global_batch, micro, world, hint):
    from latentreason.methods.trainer import batch_hint

    text = batch_hint(global_batch, micro, world)
    assert text == f"e.g. set {hint}"
    fields = dict(part.split("=") for part in text.removeprefix("e.g. set ").split(" and "))
    g = int(fields.get("train.global_batch_size", global_batch))
    m = int(fields.get("train.micro_batch_size", micro))
    assert g % (world * m) == 0 and m <= micro  # what the trainer then accepts


def test_batch_indices_are_a_pure_function_of_the_step():
    a = [batch_indices(10, s, 4, seed=3) for s in range(6)]
    assert a == [batch_indices(10, s, 4, seed=3) for s in range(6)]
    flat = [i for b in a for i in b]
    assert sorted(flat[:10]) == list(range(10))  # the first epoch covers every example once
    assert all(len(b) == 4 for b in a)


def test_lora_trains_only_the_adapters(tmp_path):
    """What LoRA trains; that the saved model computes what was trained: test_checkpoints.py."""
    run = load_run_config(base=tiny_run(tmp_path, lora={"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0},
                                        train={"max_steps": 2, "save_every": 2}))
    from latentreason.methods.trainer import apply_lora

    method = build_method(run)
    apply_lora(method, run)
    trainable = [n for n, p in method.loaded.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_resume_after_sigkill_reaches_the_same_weights(tmp_path):
    cfg = tiny_run(tmp_path, train={"max_steps": 24, "save_every": 4, "log_every": 1})
    cmd = [sys.executable, "-m", "latentreason.cli", "train", *cli_args(cfg)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "run" / "checkpoint" / "trainer_state.pt"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if state.exists() and torch.load(state, weights_only=False)["step"] >= 8:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed; make the run longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(state, weights_only=False)["step"]
    assert 8 <= killed_at < 24 and not (tmp_path / "run" / "final").exists()
    subprocess.run(cmd, env=_env(), check=True, capture_output=True)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in log if "loss" in r]
    assert steps == list(range(1, 25)), "log lines lost or repeated across the kill"

    ref_cfg = tiny_run(tmp_path / "ref", train={"max_steps": 24, "save_every": 4, "log_every": 1})
    subprocess.run([sys.executable, "-m", "latentreason.cli", "train", *cli_args(ref_cfg)],
                   env=_env(), check=True, capture_output=True)
    resumed, reference = _final_weights(tmp_path / "run"), _final_weights(tmp_path / "ref" / "run")
    assert resumed.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(resumed[key], reference[key], rtol=0, atol=1e-6, msg=key)


def test_the_same_command_again_changes_nothing_and_a_shorter_run_is_refused(tmp_path):
    """A finished run rerun as it was: no validation again, best/ final/ and the log untouched (an
    evaluation of best/ keyed on its files stays valid). Killed after its last checkpoint but before
    final/: the rerun finishes it with the logged loss (it was NaN, written as invalid JSON).
    Asked for fewer steps than its checkpoint holds: refused, not silently trained further."""
    from latentreason.models.loading import CheckpointError

    # a constant rate: under a decaying one another max_steps is refused as another run anyway
    cfg = tiny_run(tmp_path, optim={"scheduler": "constant"}, train={"max_steps": 4, "save_every": 2, "eval_every": 2})

    def train(**over):
        run = load_run_config(base={**cfg, "train": {**cfg["train"], **over}})
        method = build_method(run)
        return Trainer(run, method, method.task.load("train"), select=lambda m: 0.5).train()

    first = train()
    out = tmp_path / "run"
    stamps = {p: p.stat().st_mtime_ns for p in [out / "log.jsonl", *out.glob("*/model.safetensors")]}
    again = train()
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert (again.steps, again.final_loss, again.best_metric) == (4, first.final_loss, 0.5)
    with pytest.raises(CheckpointError, match="past train.max_steps=3"):
        train(max_steps=3)
    import shutil

    shutil.rmtree(out / "final")
    (out / "train_summary.json").unlink()
    train()
    summary = json.loads((out / "train_summary.json").read_text())  # strict JSON: no NaN
    assert summary["final_loss"] == pytest.approx([json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()
                                                   if "loss" in json.loads(x)][-1]["loss"])


def test_accelerate_two_processes_match_one_process(tmp_path):
    """`accelerate launch --num_processes 2` sees the same global batch and gradient."""
    cfg = tiny_run(tmp_path, train={"max_steps": 4, "save_every": 4, "global_batch_size": 16, "micro_batch_size": 4})
    one = subprocess.run([sys.executable, "-m", "latentreason.cli", "train", *cli_args(cfg)],
                         env=_env(), capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    cfg2 = tiny_run(tmp_path / "two", train={"max_steps": 4, "save_every": 4, "global_batch_size": 16, "micro_batch_size": 4})
    # The documented command: the shipped DDP config (CPU processes over gloo on this machine).
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs" / "accelerate" / "ddp.yaml"),
              "--num_processes", "2", "-m", "latentreason.cli", "train", *cli_args(cfg2)]
    two = subprocess.run(launch, env=_env(), capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    summary = json.loads((tmp_path / "two" / "run" / "train_summary.json").read_text())
    assert summary["processes"] == 2 and summary["global_batch_size"] == 16
    assert summary["distributed_type"] == "MULTI_CPU"
    # Each rank's random stream is its own (seeded per rank) and is saved for an exact resume.
    rngs = torch.load(tmp_path / "two" / "run" / "checkpoint" / "trainer_state.pt", weights_only=False)["rng"]
    assert len(rngs) == 2 and not torch.equal(rngs[0]["torch"], rngs[1]["torch"])
    a, b = _final_weights(tmp_path / "run"), _final_weights(tmp_path / "two" / "run")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)


def test_an_fsdp_or_deepspeed_launch_that_falls_back_to_data_parallel_is_named():
    from latentreason.methods.trainer import sharding_fallback

    assert "asks for FSDP" in sharding_fallback("DistributedType.MULTI_CPU", {"ACCELERATE_USE_FSDP": "true"})
    assert "asks for DeepSpeed" in sharding_fallback("MULTI_CPU", {"ACCELERATE_USE_DEEPSPEED": "true"})
    assert sharding_fallback("DistributedType.FSDP", {"ACCELERATE_USE_FSDP": "true"}) is None
    assert sharding_fallback("DistributedType.MULTI_CPU", {}) is None


class _FakeDeepSpeed:
    """What the trainer reads of an Accelerator before ``prepare`` under a DeepSpeed config (no
    DeepSpeed here: ``prepare`` stops the test)."""

    distributed_type = "DistributedType.DEEPSPEED"
    num_processes, process_index, is_main_process = 2, 0, True

    def __init__(self) -> None:
        from types import SimpleNamespace

        self.config: dict = {"train_micro_batch_size_per_gpu": "auto", "gradient_clipping": "auto"}
        self.state = SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=self.config))

    def prepare(self, *args: object) -> None:
        raise StopIteration("prepared")


@pytest.mark.parametrize("case", ["accumulates", "freezes", "fits"])
def test_deepspeed_takes_its_batch_from_the_recipe_and_refuses_what_it_cannot_run(tmp_path, case: str):
    from latentreason.config import ConfigError

    micro = 4 if case == "accumulates" else 8  # 16 over 2 processes: 8 each
    train = {"global_batch_size": 16, "micro_batch_size": micro, "max_steps": 6, "select_on_valid": True}
    # Latent-SFT stage 1 freezes the LM, then the encoder
    run = load_run_config(base=tiny_run(tmp_path, method="latent-sft" if case == "freezes" else "cot-sft", train=train,
                                        optim={"max_grad_norm": 0.5}))
    method = build_method(run, training=True)
    acc = _FakeDeepSpeed()
    with pytest.raises(ConfigError if case != "fits" else StopIteration) as err:
        Trainer(run, method, method.task.load("train", limit=32), accelerator=acc)
    if case == "accumulates":
        assert "train.micro_batch_size=8" in str(err.value)
    elif case == "freezes":
        assert "freezes parts" in str(err.value)
    elif case == "fits":
        assert acc.config["train_micro_batch_size_per_gpu"] == 8 and acc.config["train_batch_size"] == 16
        assert acc.config["gradient_accumulation_steps"] == 1
        assert acc.config["gradient_clipping"] == 0.5  # the recipe's optim.max_grad_norm
