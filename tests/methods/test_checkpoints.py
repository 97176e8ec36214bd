"""What a run leaves on disk and how it comes back: resume rules, extra modules, LoRA round trips,
kills between renames, truncated files, the model's context during training."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn

from latentreason.config import load_run_config
from latentreason.io import PARTIAL_PREFIX, FolderBusyError
from latentreason.data.base import Example
from latentreason.methods.base import Method
from latentreason.methods.sft import CoTSFT, SFTConfig
from latentreason.methods.trainer import Trainer, apply_lora
from latentreason.models.loading import CheckpointError, load_model
from latentreason.recipes import build_method, run_train
from tests.conftest import folder_held_by_another_process, tiny_run


def _train(run_dict: dict, examples_limit: int = 64) -> Method:
    run = load_run_config(base=run_dict)
    method = build_method(run, model_path=run.train.init_from)
    if run.lora.enabled:
        apply_lora(method, run)
    Trainer(run, method, method.task.load("train", limit=examples_limit)).train()
    return method


def _logits(model: nn.Module, lm_ids: list[int]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([lm_ids])).logits


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


# -- 3: a resume with other settings is refused; safe changes resume ---------------------------------
def test_resume_with_a_changed_learning_rate_is_refused_naming_the_field(tmp_path):
    cfg = tiny_run(tmp_path, train={"max_steps": 3, "save_every": 3, "select_on_valid": False})
    run_train(load_run_config(base=cfg))
    changed = tiny_run(tmp_path, optim={"lr": 1e-4}, train={"max_steps": 5, "save_every": 3, "select_on_valid": False})
    with pytest.raises(CheckpointError, match=r"optim\.lr: 0\.003 -> 0\.0001"):
        run_train(load_run_config(base=changed))
    saved = yaml.safe_load((tmp_path / "run" / "run_config.yaml").read_text())
    assert saved["optim"]["lr"] == 3e-3, "run_config.yaml must hold the config in force, not the refused one"


def test_what_a_resume_may_change_leaves_the_trajectory_and_the_selection_alone(tmp_path):
    from dataclasses import replace

    from latentreason.methods.trainer import resume_safe

    run = load_run_config(base=tiny_run(tmp_path, optim={"scheduler": "constant"}, train={"select_on_valid": False}))
    assert {"train.max_steps", "train.eval_every", "refine."} <= set(resume_safe(run))
    for scheduler in ("cosine", "linear"):  # the rate's curve spans max_steps: more steps would re-shape it
        assert "train.max_steps" not in resume_safe(replace(run, optim=replace(run.optim, scheduler=scheduler)))
    picked = resume_safe(replace(run, train=replace(run.train, select_on_valid=True)))
    assert "train.eval_every" not in picked and "refine." not in picked and "train.max_steps" in picked
    # refused, naming the field, before any training
    run_train(load_run_config(base=tiny_run(tmp_path, train={"max_steps": 3, "save_every": 3, "select_on_valid": False})))
    with pytest.raises(CheckpointError, match=r"train\.max_steps: 3 -> 6"):
        run_train(load_run_config(base=tiny_run(tmp_path, train={"max_steps": 6, "save_every": 3, "select_on_valid": False})))


def test_an_empty_validation_split_is_refused_before_training(tmp_path):
    from latentreason.config import ConfigError

    cfg = tiny_run(tmp_path, data={"task": "arith", "options": {"num_steps": 2, "valid_size": 0, "train_size": 64}},
                   train={"max_steps": 2, "select_on_valid": True})
    with pytest.raises(ConfigError, match="data.valid_split='valid' of task 'arith' holds no examples"):
        run_train(load_run_config(base=cfg))
    assert not (tmp_path / "run" / "checkpoint").exists(), "it trained before refusing"


def test_refinement_during_validation_is_checked_before_training(tmp_path):
    cfg = tiny_run(tmp_path, refine={"residual": True}, train={"max_steps": 2, "select_on_valid": True})
    with pytest.raises(ValueError, match="runs no latent step"):  # cot-sft has no latents to refine
        run_train(load_run_config(base=cfg))
    assert not (tmp_path / "run" / "checkpoint").exists(), "it trained before refusing"


def test_resume_with_more_steps_continues_and_records_the_new_config(tmp_path):
    base = {"optim": {"scheduler": "constant"}}
    run_train(load_run_config(base=tiny_run(tmp_path, **base, train={"max_steps": 3, "save_every": 3, "select_on_valid": False})))
    run_train(load_run_config(base=tiny_run(tmp_path, **base, train={"max_steps": 6, "save_every": 3, "select_on_valid": False})))
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [2, 3, 4, 6]
    assert yaml.safe_load((tmp_path / "run" / "run_config.yaml").read_text())["train"]["max_steps"] == 6
    ref = tmp_path / "ref"
    run_train(load_run_config(base=tiny_run(ref, **base, train={"max_steps": 6, "save_every": 3, "select_on_valid": False})))
    a, b = _weights(tmp_path / "run" / "final"), _weights(ref / "run" / "final")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def test_an_extended_run_killed_before_its_final_save_still_writes_its_end(tmp_path, monkeypatch):
    base = {"optim": {"scheduler": "constant"}}
    run = lambda steps, root=tmp_path: run_train(load_run_config(base=tiny_run(  # noqa: E731
        root, **base, train={"max_steps": steps, "save_every": 3, "select_on_valid": False})))
    run(3)
    save = Trainer.save_model

    def killed(self, name, *args, **kwargs):
        if name == "final":
            raise KeyboardInterrupt  # after the step-6 checkpoint, before final/
        return save(self, name, *args, **kwargs)

    monkeypatch.setattr(Trainer, "save_model", killed)
    with pytest.raises(KeyboardInterrupt):
        run(6)
    monkeypatch.setattr(Trainer, "save_model", save)
    run(6)  # was "already trained": final/ and train_summary.json stayed the 3-step run's
    assert json.loads((tmp_path / "run" / "train_summary.json").read_text())["steps"] == 6
    run(6, tmp_path / "ref")
    a, b = _weights(tmp_path / "run" / "final"), _weights(tmp_path / "ref" / "run" / "final")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def test_a_run_killed_after_its_last_checkpoint_validates_once(tmp_path, monkeypatch):
    """The closing validation runs before the last checkpoint: a kill before final/ neither loses it
    nor logs it twice, and the rerun's log, best/ and summary are an uninterrupted run's."""
    cfg = lambda root: load_run_config(base=tiny_run(  # noqa: E731
        root, train={"max_steps": 4, "save_every": 2, "eval_every": 2, "log_every": 1}))
    save = Trainer.save_model

    def killed(self, name, *args, **kwargs):
        if name == "final":
            raise KeyboardInterrupt  # after the step-4 checkpoint
        return save(self, name, *args, **kwargs)

    monkeypatch.setattr(Trainer, "save_model", killed)
    with pytest.raises(KeyboardInterrupt):
        run_train(cfg(tmp_path))
    monkeypatch.setattr(Trainer, "save_model", save)
    run_train(cfg(tmp_path))
    run_train(cfg(tmp_path / "ref"))
    rows = lambda root: [{k: v for k, v in json.loads(x).items() if k not in ("elapsed_s", "targets_per_s")}  # noqa: E731
                         for x in (root / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows(tmp_path) if "valid_metric" in r] == [2, 4]
    assert rows(tmp_path) == rows(tmp_path / "ref")
    summary = lambda root: json.loads((root / "run" / "train_summary.json").read_text())["best_valid_metric"]  # noqa: E731
    assert summary(tmp_path) == summary(tmp_path / "ref")


def test_a_second_run_into_a_folder_being_written_is_refused(tmp_path):
    """The same command started twice would interleave logs and overwrite checkpoints: the second is
    refused, naming the holder, before it reads or writes anything there."""
    cfg = load_run_config(base=tiny_run(tmp_path, train={"max_steps": 2, "save_every": 2, "select_on_valid": False}))
    out = tmp_path / "run"
    with folder_held_by_another_process(out) as holder:
        with pytest.raises(FolderBusyError, match=rf"pid {holder.pid} .*set another train.output_dir"):
            run_train(cfg)
        assert sorted(p.name for p in out.iterdir()) == [".latentreason.lock"]
    run_train(cfg)
    assert (out / "final").is_dir()


def test_what_a_killed_save_left_is_removed_when_the_next_run_starts(tmp_path):
    """A kill -9 during a save leaves a temporary folder as large as the model (no exception handler
    runs): the next start in that folder deletes it, and nothing else."""
    cfg = load_run_config(base=tiny_run(tmp_path, train={"max_steps": 2, "save_every": 2, "select_on_valid": False}))
    out = tmp_path / "run"
    out.mkdir()
    left = out / f"{PARTIAL_PREFIX}checkpoint-k1ll3d"
    left.mkdir()
    (left / "trainable.safetensors").write_bytes(b"half a tensor")
    (out / ".notes").mkdir()
    run_train(cfg)
    assert not left.exists() and (out / ".notes").is_dir()


# -- 9: every random stream resumes: LoRA dropout gives the uninterrupted weights -----------------------
def test_resume_restores_the_random_state_so_dropout_continues_exactly(tmp_path):
    lora = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.3}
    common = {"lora": lora, "optim": {"scheduler": "constant", "lr": 1e-2}}
    _train(tiny_run(tmp_path, **common, train={"max_steps": 2, "save_every": 2, "select_on_valid": False}))
    resumed = _train(tiny_run(tmp_path, **common, train={"max_steps": 4, "save_every": 2, "select_on_valid": False}))
    ref = _train(tiny_run(tmp_path / "ref", **common, train={"max_steps": 4, "save_every": 2, "select_on_valid": False}))
    a, b = dict(resumed.loaded.model.named_parameters()), dict(ref.loaded.model.named_parameters())
    lora_names = [n for n in a if "lora_" in n]
    assert lora_names
    for name in lora_names:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)


# -- 8: a kill between the two renames; a fresh start keeps the old log apart -------------------------
def test_a_kill_between_the_renames_resumes_from_checkpoint_old(tmp_path):
    cfg = tiny_run(tmp_path, train={"max_steps": 4, "save_every": 2, "log_every": 1, "select_on_valid": False})
    run = load_run_config(base=cfg)
    method = build_method(run)
    trainer = Trainer(run, method, method.task.load("train", limit=64))
    # Stop the first run right after its step-2 checkpoint, as a kill would.
    orig = trainer.save_resumable

    def save_then_stop() -> None:
        orig()
        raise KeyboardInterrupt

    trainer.save_resumable = save_then_stop
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    ckpt = tmp_path / "run" / "checkpoint"
    os.replace(ckpt, ckpt.with_name("checkpoint.old"))  # the state the kill leaves between the renames
    before = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    run_train(load_run_config(base=cfg))
    after = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    assert after[:2] == before and [json.loads(x)["step"] for x in after] == [1, 2, 3, 4], \
        "restarted at step 0 or duplicated the log"
    assert not ckpt.with_name("checkpoint.old").exists()


def test_a_fresh_start_sets_the_previous_run_aside_whole(tmp_path):
    """train.resume=false in a used folder: the earlier log, models (keep-4/ would be a stale refine
    reference), checkpoint and summary move to previous-<time>/; nothing is lost or mixed."""
    cfg = tiny_run(tmp_path, train={"max_steps": 4, "save_every": 2, "log_every": 1, "keep_every": 2,
                                    "eval_every": 2})
    run_train(load_run_config(base=cfg))
    out = tmp_path / "run"
    first = (out / "log.jsonl").read_text()
    assert {"keep-2", "keep-4", "best", "final", "checkpoint"} <= {p.name for p in out.iterdir()}
    again = tiny_run(tmp_path, train={"max_steps": 2, "save_every": 2, "log_every": 1, "select_on_valid": False,
                                      "resume": False})
    run_train(load_run_config(base=again))
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2]
    assert not (out / "keep-4").exists() and not (out / "best").exists(), "the earlier run's models stayed"
    kept = list(out.glob("previous-*"))
    assert len(kept) == 1 and (kept[0] / "log.jsonl").read_text() == first
    assert {"keep-2", "keep-4", "best", "final", "checkpoint", "train_summary.json"} <= {p.name for p in kept[0].iterdir()}


def test_a_fresh_start_sets_aside_a_checkpoint_old_too(tmp_path, monkeypatch):
    """A kill between a save's two renames leaves only checkpoint.old; a fresh start there that is
    killed before its first save must not let the next resume pick up the earlier run's state."""
    cfg = lambda **t: load_run_config(base=tiny_run(tmp_path, train={  # noqa: E731
        "max_steps": 4, "save_every": 4, "log_every": 1, "select_on_valid": False, **t}))
    run_train(cfg())
    out = tmp_path / "run"
    os.replace(out / "checkpoint", out / "checkpoint.old")
    monkeypatch.setattr(Trainer, "save_resumable", lambda self: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        run_train(cfg(resume=False))
    monkeypatch.undo()
    assert not (out / "checkpoint.old").exists() and len(list(out.glob("previous-*/checkpoint.old"))) == 1
    run_train(cfg())  # nothing to resume: a fresh start, which sets the killed one's log aside too
    assert len(list(out.glob("previous-*"))) == 2


# -- 11: truncated files are named ---------------------------------------------------------------------
@pytest.mark.parametrize("name", ["trainable.safetensors", "trainer_state.pt"])
def test_a_truncated_checkpoint_file_is_named(tmp_path, name):
    constant = {"scheduler": "constant"}  # so that more steps may resume the run
    cfg = tiny_run(tmp_path, optim=constant, train={"max_steps": 2, "save_every": 2, "select_on_valid": False})
    run_train(load_run_config(base=cfg))
    path = tmp_path / "run" / "checkpoint" / name
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size // 2)
    more = tiny_run(tmp_path, optim=constant, train={"max_steps": 4, "save_every": 2, "select_on_valid": False})
    with pytest.raises(CheckpointError, match=rf"{name}: unreadable.*train\.resume=false"):
        run_train(load_run_config(base=more))


def test_a_truncated_saved_model_is_named(tmp_path):
    cfg = tiny_run(tmp_path, train={"max_steps": 1, "save_every": 1, "select_on_valid": False})
    run_train(load_run_config(base=cfg))
    path = tmp_path / "run" / "final" / "model.safetensors"
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size // 2)
    with pytest.raises(CheckpointError, match=r"final could not be read"):
        load_model(str(tmp_path / "run" / "final"))


# -- 4: LoRA saves the model it trained, for every configuration -----------------------------------------
@pytest.mark.parametrize("model,targets,train_embeddings", [
    ("tiny-llama-l2-d64", "all-linear", False),
    ("tiny-llama-l2-d64", "q_proj,v_proj,embed_tokens", False),  # the Latent-SFT recipe's targets
    ("tiny-llama-l2-d64", "all-linear", True),
    ("tiny-gpt2-l2-d64", "c_attn,wte", False),
])
def test_lora_final_model_computes_what_was_trained(tmp_path, model, targets, train_embeddings):
    lora = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.1, "target_modules": targets,
            "train_embeddings": train_embeddings}
    method = _train(tiny_run(tmp_path, model={"name_or_path": model}, lora=lora, optim={"lr": 3e-2},
                             train={"max_steps": 3, "save_every": 3, "select_on_valid": False}), 32)
    ids = method.loaded.tokenizer.encode("3*4*5 | 3*4=2")
    trained = _logits(method.loaded.model, ids)
    base = _logits(load_model(replace(method.run.model, name_or_path=model)).model, ids)
    assert (trained - base).abs().max() > 1e-2, "training did not change the model: the test would be vacuous"
    saved = load_model(str(tmp_path / "run" / "final"))
    assert not any("lora" in k for k in _weights(tmp_path / "run" / "final"))
    torch.testing.assert_close(_logits(saved.model, ids), trained, rtol=0, atol=1e-5)


# -- 7: extra modules (projectors, assistants) with buffers save, resume and reload as a whole -----------
class _Adapter(nn.Module):
    """A residual linear map on the input embeddings, and a buffer counting examples seen."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        nn.init.zeros_(self.proj.weight)
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.seen += x.shape[0]
        return x + self.proj(x)


@dataclass
class AdapterConfig(SFTConfig):
    name: str = "tests.methods.test_checkpoints:AdaptedSFT"


class AdaptedSFT(CoTSFT):
    """CoT-SFT through a trained input adapter: stands in for SoftCoT's or DLR's projector."""

    name = "adapted-sft"
    config_cls = AdapterConfig

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        torch.manual_seed(0)
        self.adapter = _Adapter(self.loaded.model.get_input_embeddings().weight.shape[1])

    def extra_modules(self) -> dict[str, nn.Module]:
        return {"adapter": self.adapter}

    def loss(self, modules: nn.ModuleDict, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        embeds = modules["adapter"](modules["lm"].get_input_embeddings()(batch["input_ids"]))
        out = modules["lm"](inputs_embeds=embeds, attention_mask=batch["attention_mask"])
        logits, labels = out.logits[:, :-1].float(), batch["labels"][:, 1:]
        return {"loss_sum": nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                        ignore_index=-100, reduction="sum")}


ADAPTED = "tests.methods.test_checkpoints:AdaptedSFT"


def test_extra_modules_resume_with_their_buffers(tmp_path):
    common = {"optim": {"scheduler": "constant"}}
    _train(tiny_run(tmp_path, ADAPTED, **common, train={"max_steps": 2, "save_every": 2, "select_on_valid": False}))
    resumed = _train(tiny_run(tmp_path, ADAPTED, **common, train={"max_steps": 4, "save_every": 2, "select_on_valid": False}))
    ref = _train(tiny_run(tmp_path / "ref", ADAPTED, **common, train={"max_steps": 4, "save_every": 2, "select_on_valid": False}))
    assert float(ref.adapter.seen) == 4 * 16
    assert float(resumed.adapter.seen) == float(ref.adapter.seen), "buffer lost on resume"
    torch.testing.assert_close(resumed.adapter.proj.weight, ref.adapter.proj.weight, rtol=0, atol=1e-6)


def test_a_saved_method_reloads_whole_through_from_pretrained(tmp_path):
    trained = _train(tiny_run(tmp_path, ADAPTED, train={"max_steps": 2, "save_every": 2, "select_on_valid": False}))
    assert trained.adapter.proj.weight.abs().sum() > 0
    again = Method.from_pretrained(tmp_path / "run" / "final")
    assert isinstance(again, AdaptedSFT)
    assert float(again.adapter.seen) == float(trained.adapter.seen) == 2 * 16
    torch.testing.assert_close(again.adapter.proj.weight, trained.adapter.proj.weight, rtol=0, atol=0)
    batch = trained.collate(trained.task.load("valid", limit=4))
    trained.adapter.eval()
    again.adapter.eval()
    with torch.no_grad():
        a = trained.loss(nn.ModuleDict({"lm": trained.loaded.model, "adapter": trained.adapter}), batch)["loss_sum"]
        b = again.loss(nn.ModuleDict({"lm": again.loaded.model, "adapter": again.adapter}), batch)["loss_sum"]
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # Without its modules file the folder is refused, naming the file.
    (tmp_path / "run" / "final" / "extra_modules.safetensors").unlink()
    with pytest.raises(CheckpointError, match="extra_modules.safetensors: missing"):
        Method.from_pretrained(tmp_path / "run" / "final")


def test_a_save_killed_before_its_config_is_written_leaves_the_old_folder_whole(tmp_path, monkeypatch):
    trained = _train(tiny_run(tmp_path, ADAPTED, train={"max_steps": 2, "save_every": 2, "select_on_valid": False}))
    folder = tmp_path / "run" / "final"
    before = {f.name: f.read_bytes() for f in folder.iterdir()}
    with torch.no_grad():
        trained.adapter.proj.weight.add_(1.0)  # what a later save would write

    def killed() -> dict:
        raise KeyboardInterrupt  # a kill while the folder's config is being written

    monkeypatch.setattr(trained, "saved_config", killed)
    with pytest.raises(KeyboardInterrupt):
        trained.save_pretrained(folder)
    assert {f.name: f.read_bytes() for f in folder.iterdir()} == before, "the folder changed without its config"
    assert sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(PARTIAL_PREFIX)) == [], "temp folder left"
    assert isinstance(Method.from_pretrained(folder), AdaptedSFT)


# -- 6: training respects the model's context ---------------------------------------------------------
def test_training_drops_and_counts_sequences_past_the_model_context(tmp_path):
    cfg = tiny_run(tmp_path, model={"name_or_path": "tiny-gpt2-l2-d64", "max_positions": 40},
                   train={"max_steps": 2, "save_every": 2, "log_every": 1, "select_on_valid": False})
    run = load_run_config(base=cfg)
    method = build_method(run)
    short = method.task.load("train", limit=32)
    long = [Example(f"long-{i}", ex.question, ex.answer, ex.chain + " " + "1*1=1 " * 6) for i, ex in enumerate(short)]
    batch = method.collate(short[:4] + long[:4])
    assert batch["dropped"] == 4 and batch["input_ids"].shape[1] <= 40
    Trainer(run, method, short + long).train()  # a gpt2 indexed past its table raised IndexError here
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    from latentreason.methods.trainer import batch_indices

    drawn = [batch_indices(64, step, 16, run.train.seed) for step in range(2)]
    assert [r["dropped_examples"] for r in log] == [sum(i >= 32 for i in idx) for idx in drawn]  # each window's own
    with pytest.raises(ValueError, match="model context 40"):
        method.collate(long[:4])


def test_a_checkpoint_older_than_a_field_resumes_at_the_fields_old_behaviour(tmp_path):
    """A DLR/GRPO run checkpointed before method.correct_extraction existed was refused on resume
    after an upgrade; it resumes at the field's old behaviour, and is refused at another."""
    from latentreason.methods.trainer import config_changes

    saved = {"method": {"name": "grpo", "group_size": 8}, "train": {"max_steps": 4}}
    now = lambda how: {"method": {"name": "grpo", "group_size": 8, "correct_extraction": how},  # noqa: E731
                       "train": {"max_steps": 4}}
    assert config_changes(saved, now("flexible")) == []
    assert config_changes(saved, now("strict")) == ["method.correct_extraction"]
    assert config_changes({**saved, "method": {**saved["method"], "correct_extraction": "strict"}},
                          now("flexible")) == ["method.correct_extraction"]  # a saved value is compared as saved
