"""Stages in the shared trainer: set_stage at the right steps, stage folders, optimizer resets,
exact resume across a switch (and exactly at one), and a wrong train.max_steps refused early."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from latentreason.config import ConfigError, RunConfig, load_run_config
from latentreason.data.base import Example
from latentreason.methods.base import Method, Stage, stage_index_at, stage_problems
from latentreason.methods.sft import CoTSFT, SFTConfig
from latentreason.methods.coconut import CoconutConfig, coconut_stages
from latentreason.methods.trainer import Trainer, epoch_begins
from latentreason.recipes import build_method
from tests.conftest import cli_args, subprocess_env, tiny_run

STAGED = "tests.methods.test_stages:StagedSFT"


@dataclass
class StagedConfig(SFTConfig):
    name: str = STAGED
    stage_steps: str = field(default="2,2,2", metadata={"help": "optimizer steps of each stage, comma-separated"})
    reset_optimizer: bool = field(default=True, metadata={"help": "stages after the first clear AdamW's state"})
    select_from: int = field(default=0, metadata={"help": "first stage whose checkpoints best/ may pick"})
    frozen_stages: str = field(default="", metadata={"help": "comma-separated stages in which the LM gets no update"})
    restore_best: bool = field(default=False, metadata={"help": "every stage keeps its best checkpoint on validation"})
    reset_each_epoch: bool = field(default=False, metadata={"help": "every stage clears AdamW's state at each epoch"})


def plan(cfg: StagedConfig) -> list[Stage]:
    steps = [int(x) for x in cfg.stage_steps.split(",")]
    frozen = {int(x) for x in cfg.frozen_stages.split(",") if x}
    return [Stage(f"stage-{i}", n, reset_optimizer=cfg.reset_optimizer and i > 0, select=i >= cfg.select_from,
                  frozen=("lm",) if i in frozen else (), restore_best=cfg.restore_best,
                  reset_each_epoch=cfg.reset_each_epoch)
            for i, n in enumerate(steps)]


class StagedSFT(CoTSFT):
    """A curriculum in miniature: stage 0 trains on the answer alone, later stages on chain + answer,
    so a resume that forgot the stage would train other targets (and end at other weights)."""

    name = "staged-sft"
    config_cls = StagedConfig
    cfg: StagedConfig

    @classmethod
    def validate(cls, run: RunConfig) -> list[str]:
        return stage_problems(plan(run.method), run.train.max_steps)

    def stages(self) -> list[Stage]:
        return plan(self.cfg)

    def target_text(self, ex: Example) -> str:
        answer = self.task.answer_text(ex)
        return f"{self.task.chain_text(ex)} {answer}" if self.stage_index > 0 else answer


def _cfg(tmp_path: Path, **method: Any) -> dict:
    train = {"max_steps": 6, "save_every": 100, "log_every": 1, "select_on_valid": False}
    cfg = tiny_run(tmp_path, STAGED, train=train, optim={"scheduler": "constant"})
    cfg["method"].update(method)
    return cfg


def _trainer(cfg: dict, select=None) -> Trainer:
    run = load_run_config(base=cfg)
    method = build_method(run, training=True)
    return Trainer(run, method, method.task.load("train", limit=64), select=select)


def _log(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]


def _record_stages(trainer: Trainer) -> list[dict]:
    """Wrap the method's set_stage to record the trainer's step, the weights and the optimizer state then."""
    calls: list[dict] = []
    original = trainer.method.set_stage

    def set_stage(index: int, stage: Stage) -> None:
        opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
        calls.append({"step": trainer.step, "index": index, "name": stage.name,
                      "weights": {k: v.clone() for k, v in trainer.method.loaded.model.state_dict().items()},
                      "adam": [(float(s["step"]), float(s["exp_avg"].abs().sum())) for s in opt.state.values()]})
        original(index, stage)

    trainer.method.set_stage = set_stage
    return calls


def test_stage_of_a_step_is_a_function_of_the_step():
    stages = [Stage("a", 2), Stage("b", 3), Stage("c", 1)]
    assert [stage_index_at(stages, s) for s in range(6)] == [0, 0, 1, 1, 1, 2]


def test_set_stage_at_each_boundary_folders_reload_and_selection_skips_unselected_stages(tmp_path):
    cfg = _cfg(tmp_path, stage_steps="2,3,1", select_from=1)
    cfg["train"]["eval_every"] = 1
    selected_at: list[int] = []
    trainer = _trainer(cfg, select=lambda m: selected_at.append(trainer.step) or 0.5)
    calls = _record_stages(trainer)
    trainer.train()
    assert [(c["step"], c["index"], c["name"]) for c in calls] == [(0, 0, "stage-0"), (2, 1, "stage-1"), (5, 2, "stage-2")]
    assert selected_at == [3, 4, 5, 6], "best/ was selected from a stage with select=False"
    out = tmp_path / "run"
    log = _log(out)
    assert [(r["stage"], r["step"]) for r in log if set(r) == {"stage", "step"}] == [
        ("stage-0", 0), ("stage-1", 2), ("stage-2", 5)]
    assert [r["stage"] for r in log if "loss" in r] == ["stage-0"] * 2 + ["stage-1"] * 3 + ["stage-2"]
    # stage-1/ holds the weights at its last step, i.e. what stage-2 started from, and reloads whole.
    for name, call in (("stage-0", calls[1]), ("stage-1", calls[2])):
        saved = load_file(str(out / name / "model.safetensors"))
        for key, value in saved.items():
            torch.testing.assert_close(value, call["weights"][key], rtol=0, atol=0, msg=f"{name}: {key}")
    again = Method.from_pretrained(out / "stage-1")
    assert isinstance(again, StagedSFT) and again.cfg.stage_steps == "2,3,1"
    assert (out / "stage-2" / "model.safetensors").exists() and (out / "final").exists()


@pytest.mark.parametrize("reset", [True, False])
def test_optimizer_state_is_cleared_when_a_resetting_stage_begins(tmp_path, reset):
    trainer = _trainer(_cfg(tmp_path, reset_optimizer=reset))
    calls = _record_stages(trainer)
    trainer.train()
    at_stage_1 = calls[1]["adam"]
    if reset:
        assert at_stage_1 == [], "AdamW state survived the switch to a resetting stage"
    else:
        assert at_stage_1 and all(step == 2 and moment > 0 for step, moment in at_stage_1)
    final = torch.load(tmp_path / "run" / "checkpoint" / "trainer_state.pt", weights_only=False)
    steps = {s["step"].item() for s in final["optimizer"]["state"].values()}
    assert steps == ({2} if reset else {6}), "AdamW step counts should restart at each reset"
    assert final["scheduler"]["last_epoch"] == 6, "the LR schedule stays global across stages"


def test_epoch_begins_in_the_step_that_holds_its_first_example():
    # 10 examples, batches of 4 run across epoch ends: epochs begin at examples 10, 20, 30, 40
    assert [s for s in range(12) if epoch_begins(s, 4, 10)] == [2, 5, 7, 10]
    assert [s for s in range(6) if epoch_begins(s, 16, 32)] == [2, 4]


def test_optimizer_state_is_cleared_at_each_epoch_when_asked(tmp_path):
    # 64 examples in batches of 16: an epoch begins at steps 4 and 8; one stage, no switch resets
    cfg = _cfg(tmp_path, stage_steps="10", reset_optimizer=False, reset_each_epoch=True)
    cfg["train"]["max_steps"] = 10
    trainer = _trainer(cfg)
    seen: list[int] = []
    original = trainer._enter_stage

    def enter() -> None:
        original()
        opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
        seen.append(max((int(s["step"]) for s in opt.state.values()), default=0))

    trainer._enter_stage = enter
    trainer.train()
    # AdamW's step count just before each update: it restarts where an epoch begins
    assert seen == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    coconut = coconut_stages(CoconutConfig(max_stage=2, reset_every_epoch=True), 6)
    assert all(s.reset_each_epoch for s in coconut) and not any(
        s.reset_each_epoch for s in coconut_stages(CoconutConfig(max_stage=2), 6))


def _interrupt_after_checkpoint(trainer: Trainer, at_step: int) -> None:
    original = trainer.save_resumable

    def save_then_stop() -> None:
        original()
        if trainer.step == at_step:
            raise KeyboardInterrupt  # what a kill right after this checkpoint leaves

    trainer.save_resumable = save_then_stop


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("staged-ref")
    _trainer(_cfg(out)).train()
    return out / "run"


@pytest.mark.parametrize("stop_at", [2, 3], ids=["at-a-boundary", "mid-stage"])
def test_a_resume_across_a_stage_switch_reaches_the_uninterrupted_weights(tmp_path, uninterrupted, stop_at):
    cfg = _cfg(tmp_path)
    cfg["train"]["save_every"] = 3  # checkpoints at 2 and 4 (stage ends), 3 and 6
    first = _trainer(cfg)
    _interrupt_after_checkpoint(first, stop_at)
    with pytest.raises(KeyboardInterrupt):
        first.train()
    assert not (tmp_path / "run" / "final").exists()
    second = _trainer(cfg)
    calls = _record_stages(second)
    second.train()
    assert calls[0]["step"] == stop_at and calls[0]["index"] == 1, "the resumed run was not told its stage"
    a, b = load_file(str(tmp_path / "run" / "final" / "model.safetensors")), load_file(str(uninterrupted / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    strip = ("elapsed_s", "targets_per_s")
    rows = [{k: v for k, v in r.items() if k not in strip} for r in _log(tmp_path / "run")]
    assert rows == [{k: v for k, v in r.items() if k not in strip} for r in _log(uninterrupted)], \
        "log rows lost or repeated across the resume"


def test_a_wrong_max_steps_is_refused_before_weights_load_and_by_the_trainer(tmp_path):
    cfg = _cfg(tmp_path)
    cfg["train"]["max_steps"] = 7
    with pytest.raises(ConfigError, match=r"train\.max_steps=7, but the method's stages sum to 6 steps "
                                          r"\(stage-0: 2, stage-1: 2, stage-2: 2\); set train\.max_steps=6"):
        load_run_config(base=cfg)
    run = load_run_config(base=_cfg(tmp_path))
    method = build_method(run)
    with pytest.raises(ConfigError, match=r"train\.max_steps=7, but the method's stages sum to 6"):
        Trainer(replace(run, train=replace(run.train, max_steps=7)), method, method.task.load("train", limit=16))


def test_stage_fields_are_checked():
    with pytest.raises(ValueError, match=r"Stage 'a': steps=0, must be >= 1"):
        Stage("a", 0)
    for bad in ("final", "a/b", ""):
        with pytest.raises(ValueError, match="Stage.name"):
            Stage(bad, 1)
    assert "repeat" in stage_problems([Stage("a", 1), Stage("a", 1)], 2)[0]


@pytest.mark.slow
def test_sigkill_after_a_stage_switch_resumes_to_the_same_weights(tmp_path):
    """The real kill: a CLI run SIGKILLed in its second stage, restarted, against an uninterrupted one."""
    def cfg(root: Path) -> dict:
        c = _cfg(root, stage_steps="8,8,8")
        c["train"].update(max_steps=24, save_every=4)
        return c

    cmd = [sys.executable, "-m", "latentreason.cli", "train", *cli_args(cfg(tmp_path))]
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "run" / "checkpoint" / "trainer_state.pt"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if state.exists() and torch.load(state, weights_only=False)["step"] >= 12:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed; make the run longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(state, weights_only=False)["step"]
    assert 8 < killed_at < 24 and (tmp_path / "run" / "stage-0").exists()
    subprocess.run(cmd, env=subprocess_env(), check=True, capture_output=True)
    ref = [sys.executable, "-m", "latentreason.cli", "train", *cli_args(cfg(tmp_path / "ref"))]
    subprocess.run(ref, env=subprocess_env(), check=True, capture_output=True)
    a = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "ref" / "run" / "final" / "model.safetensors"))
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    switches = [r for r in _log(tmp_path / "run") if set(r) == {"stage", "step"}]
    assert [(r["stage"], r["step"]) for r in switches] == [("stage-0", 0), ("stage-1", 8), ("stage-2", 16)]


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.method.loaded.model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_frozen_part_gets_no_update_in_its_stage(tmp_path):
    trainer = _trainer(_cfg(tmp_path, stage_steps="2,2,2", frozen_stages="1", reset_optimizer=False))
    calls = _record_stages(trainer)
    trainer.train()
    final = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    assert not _same(calls[0]["weights"], calls[1]["weights"]), "stage 0 should train the LM"
    assert _same(calls[1]["weights"], calls[2]["weights"]), "the LM changed in the stage that freezes it"
    assert any(not torch.equal(final[k], calls[2]["weights"][k]) for k in final), "stage 2 should train the LM"
    run = load_run_config(base=_cfg(tmp_path / "bad"))
    method = build_method(run, training=True)
    method.stages = lambda: [Stage("stage-0", 6, frozen=("encoder",))]  # type: ignore[method-assign]
    with pytest.raises(ConfigError, match=r"freezes \['encoder'\], but the trained parts are \['lm'\]"):
        Trainer(run, method, method.task.load("train", limit=16))


#: Validation metric by step: stage 0 (steps 1-3) peaks at step 2, stage 1 (steps 4-6) at step 4.
METRIC = {1: 0.1, 2: 0.9, 3: 0.2, 4: 0.5, 5: 0.3, 6: 0.4}


def _selecting(cfg: dict) -> tuple[Trainer, dict[int, dict[str, torch.Tensor]]]:
    seen: dict[int, dict[str, torch.Tensor]] = {}
    holder: list[Trainer] = []

    def select(method: Method) -> float:
        seen[holder[0].step] = _weights(holder[0])
        return METRIC[holder[0].step]

    holder.append(_trainer(cfg, select=select))
    return holder[0], seen


def _restore_cfg(tmp_path: Path) -> dict:
    cfg = _cfg(tmp_path, stage_steps="3,3", restore_best=True, reset_optimizer=False)
    cfg["train"].update(select_on_valid=True, eval_every=1)
    return cfg


def test_a_restore_best_stage_hands_its_best_checkpoint_to_the_next_stage(tmp_path):
    trainer, seen = _selecting(_restore_cfg(tmp_path))
    calls = _record_stages(trainer)
    trainer.train()
    assert sorted(seen) == [1, 2, 3, 4, 5, 6], "validation must run at each step once, stage ends included"
    assert _same(calls[1]["weights"], seen[2]), "stage 1 did not start from stage 0's best (step 2)"
    out = tmp_path / "run"
    for name, step in (("stage-0", 2), ("stage-1", 4)):
        saved = load_file(str(out / name / "model.safetensors"))
        assert all(torch.equal(v, seen[step][k]) for k, v in saved.items()), f"{name}/ is not its best step {step}"
    assert _same(_weights(trainer), seen[4]), "the run should end on the last stage's best"
    restored = [r for r in _log(out) if "restored_best_valid_metric" in r]
    assert [(r["step"], r["restored_best_valid_metric"]) for r in restored] == [(3, 0.9), (6, 0.5)]


def test_a_resume_inside_a_restore_best_stage_reaches_the_uninterrupted_weights(tmp_path):
    ref, _ = _selecting(_restore_cfg(tmp_path / "ref"))
    ref.train()
    cfg = _restore_cfg(tmp_path)
    cfg["train"]["save_every"] = 1
    first, _ = _selecting(cfg)
    _interrupt_after_checkpoint(first, 5)  # stage 1's best (step 4) exists only in the checkpoint now
    with pytest.raises(KeyboardInterrupt):
        first.train()
    second, _ = _selecting(cfg)
    second.train()
    a = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "ref" / "run" / "final" / "model.safetensors"))
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_restore_best_without_validation_is_refused(tmp_path):
    cfg = _cfg(tmp_path, restore_best=True)
    with pytest.raises(ConfigError, match="keeps its best checkpoint on validation; set train.select_on_valid=true"):
        _trainer(cfg)
