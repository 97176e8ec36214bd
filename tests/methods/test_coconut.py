"""Coconut, the pause control and SoftCoT on the shared engine: curriculum, stage folders, what is
frozen, what is saved, and that evaluation runs what was trained."""
from __future__ import annotations

import pytest
import torch

import latentreason
from latentreason.config import load_run_config
from latentreason.eval.harness import predict
from latentreason.methods.base import build_method
from latentreason.methods.trainer import Trainer
from tests.conftest import tiny_run


def _method(tmp_path, name: str, steps: int = 4, **method):
    cfg = tiny_run(tmp_path, name, data={"task": "arith", "options": {
        "num_steps": steps, "train_size": 256, "valid_size": 32, "test_size": 32}})
    cfg["method"].update(method)
    run = load_run_config(base=cfg)
    return run, build_method(run)


def _decode(method, ids):
    return method.loaded.tokenizer.decode(ids, skip_special_tokens=False)


def test_curriculum_replaces_steps_by_thoughts_stage_by_stage(tmp_path) -> None:
    run, m = _method(tmp_path, "coconut", thoughts_per_step=2, max_stage=3)
    ex = m.task.load("train", limit=1)[0]
    steps, answer, eos = m.task.chain_steps(ex), m.task.answer_text(ex), m.loaded.tokenizer.eos_token
    assert len(steps) == 4
    stages = m.stages()
    assert [s.name for s in stages] == ["stage-0", "stage-1", "stage-2", "stage-3", "stage-final"]
    assert [s.select for s in stages] == [False] * 4 + [True]
    assert sum(s.steps for s in stages) == run.train.max_steps
    for index, k in enumerate([0, 1, 2, 3, None]):
        m.set_stage(index, stages[index])
        batch = m.collate([ex])
        kept = [] if k is None else steps[k:]
        assert _decode(m, batch["targets"][0]) == " ".join(kept + [answer]) + eos
        assert batch["counts"] == [6 if k is None else 2 * k]
        assert batch["prompts"][0][-1] == m.loaded.bot_id and batch["num_targets"] == len(batch["targets"][0])
    m.cfg.pad_thoughts = False  # a 4-step chain past max_stage 3: 3 steps' worth of thoughts, padded or not
    assert m.collate([ex])["counts"] == [6]
    # a chain shorter than the stage: every step replaced by k·c thoughts (it got min(k, steps)·c, while a
    # stage-k model is evaluated with k·c)
    m.set_stage(3, stages[3])
    assert m.thoughts(2) == 6 and m.eval_thoughts() == 6


def test_a_stage_zero_model_is_evaluated_on_the_sequence_it_trained_on(tmp_path) -> None:
    """Stage 0 trains on [Q, <bot>, <eot>, chain, answer]: its evaluation prompt must end <bot> <eot>
    (it decoded right after <bot>, where it never learned to write)."""
    _, m = _method(tmp_path, "coconut", thoughts_per_step=2, max_stage=3)
    m.set_stage(0, m.stages()[0])
    ex = m.task.load("valid", limit=1)[0]
    assert m.eval_thoughts() == 0 and m.latent_step([ex]) is None
    assert m.prompt_ids([ex])[0][-2:] == [m.loaded.bot_id, m.loaded.eot_id]
    m.set_stage(1, m.stages()[1])
    assert m.prompt_ids([ex])[0][-1] == m.loaded.bot_id  # with thoughts the rollout feeds <eot> after them


def test_final_stage_without_padding_gives_short_chains_fewer_thoughts(tmp_path) -> None:
    _, m = _method(tmp_path, "coconut", steps=2, thoughts_per_step=2, max_stage=3, pad_thoughts=False)
    m.set_stage(len(m.stages()) - 1, m.stages()[-1])
    ex = m.task.load("train", limit=1)[0]
    assert m.collate([ex])["counts"] == [4]
    m.cfg.pad_thoughts = True
    assert m.collate([ex])["counts"] == [6]


def test_a_wrong_step_budget_is_refused_before_training_but_not_for_evaluation(tmp_path, monkeypatch) -> None:
    import latentreason.recipes as recipes

    cfg = tiny_run(tmp_path, "coconut", train={"max_steps": 6})
    cfg["method"]["steps_per_stage"] = 1
    run = load_run_config(base=cfg)  # evaluating such a config (a saved stage folder) is fine
    monkeypatch.setattr(recipes, "build_method", lambda *a, **k: pytest.fail("weights loaded before the check"))
    with pytest.raises(latentreason.config.ConfigError, match="stages sum to 5 steps"):
        recipes.run_train(run)


def test_a_cot_stage_on_top_of_a_cot_model_is_flagged(tmp_path, caplog) -> None:
    """The defaults are the GSM8K recipe's (c = 2, 3 stages) but start at the CoT stage 0: from a
    CoT-SFT model (train.init_from) a fifth of the budget went to CoT again, unsaid."""
    from latentreason.methods.coconut import Coconut

    for first, init, flagged in [(0, "runs/cot/best", True), (1, "runs/cot/best", False), (0, None, False)]:
        cfg = tiny_run(tmp_path, "coconut", train={"max_steps": 8, "init_from": init})
        cfg["method"]["first_stage"] = first
        caplog.clear()
        with caplog.at_level("WARNING", logger="latentreason"):
            Coconut.train_problems(load_run_config(base=cfg))
        assert ("set method.first_stage=1" in caplog.text) == flagged, (first, init)


@pytest.fixture(scope="module")
def trained_coconut(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("coconut")
    run, m = _method(tmp, "coconut", thoughts_per_step=1, max_stage=2, final_stage_steps=0)
    run.train.max_steps = 3  # stages 0, 1, 2: one step each
    Trainer(run, m, m.task.load("train")).train()
    return run, m


def test_every_stage_folder_runs_with_its_own_thoughts(trained_coconut) -> None:
    run, m = trained_coconut
    out = m.run.train.output_dir
    for k in range(3):
        loaded = latentreason.load(f"{out}/stage-{k}")
        assert loaded.rollout_config().num_latent_steps == k, k
        preds = predict(loaded, loaded.task.load("valid", limit=4), batch_size=4)
        assert [p.latent_steps for p in preds] == [k] * 4
    final = latentreason.load(f"{out}/final")
    assert final.rollout_config().num_latent_steps == 2
    with torch.no_grad():  # the final folder holds the trained weights
        for (n, a), b in zip(m.loaded.model.state_dict().items(), final.loaded.model.state_dict().values()):
            assert torch.equal(a, b), n


def test_pause_control_feeds_its_learned_vectors_to_every_question(tmp_path) -> None:
    run, m = _method(tmp_path, "pause", thoughts_per_step=1, max_stage=2, final_stage_steps=0)
    run.train.max_steps = 3
    start = m.pause.vectors.detach().clone()
    Trainer(run, m, m.task.load("train")).train()
    assert not torch.equal(start, m.pause.vectors)
    examples = m.task.load("valid", limit=3)
    step = m.latent_step(examples)
    assert torch.equal(step.vectors, m.pause.vectors[None].expand(3, -1, -1))
    loaded = latentreason.load(f"{run.train.output_dir}/final")
    assert torch.equal(loaded.pause.vectors, m.pause.vectors)
    assert [p.latent_steps for p in predict(loaded, examples, 3)] == [2, 2, 2]


@pytest.mark.parametrize("mode", ["answer", "chain"])
def test_softcot_trains_only_the_projection_and_reloads_it(tmp_path, mode: str) -> None:
    run, m = _method(tmp_path, "softcot", mode=mode, num_thoughts=3)
    main = {n: p.detach().clone() for n, p in m.loaded.model.named_parameters()}
    proj = m.assistant.projection.weight.detach().clone()
    helper = {n: p.detach().clone() for n, p in m.assistant.lm[0].model.named_parameters()}
    ex = m.task.load("train", limit=1)[0]
    target = _decode(m, m.collate([ex])["targets"][0])
    assert (m.task.chain_text(ex) in target) == (mode == "chain") and target.endswith(m.task.answer_text(ex) + "<eos>")
    run.train.max_steps = 3
    Trainer(run, m, m.task.load("train")).train()
    assert all(torch.equal(p, main[n]) for n, p in m.loaded.model.named_parameters()), "main model moved"
    assert all(torch.equal(p, helper[n]) for n, p in m.assistant.lm[0].model.named_parameters()), "assistant moved"
    assert not torch.equal(proj, m.assistant.projection.weight)
    loaded = latentreason.load(f"{run.train.output_dir}/final")
    examples = m.task.load("valid", limit=2)
    with torch.no_grad():
        assert torch.allclose(loaded.latent_step(examples).vectors, m.latent_step(examples).vectors, atol=1e-6)


def test_eval_of_a_stage_folder_needs_no_restated_settings(trained_coconut, tmp_path) -> None:
    """``latentreason eval model.name_or_path=<stage folder>``: method, task and thoughts come from
    the folder; the training budget (train.max_steps) is not checked at evaluation."""
    import json

    from latentreason.cli import main

    out = trained_coconut[0].train.output_dir
    assert main(["eval", f"model.name_or_path={out}/stage-1", "eval.limit=4", f"eval.output_dir={tmp_path}/ev"]) == 0
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["method"] == "coconut" and summary["task"] == "arith" and summary["mean_latent_steps"] == 1


def test_resume_with_other_max_steps_is_refused_when_the_stages_derive_from_it(trained_coconut) -> None:
    """Automatic stage lengths split train.max_steps: another value would move every boundary."""
    from dataclasses import replace

    from latentreason.methods.trainer import resumable_checkpoint, resume_safe
    from latentreason.models.loading import CheckpointError

    run = trained_coconut[0]
    assert resumable_checkpoint(run) is not None
    with pytest.raises(CheckpointError, match="train.max_steps"):
        resumable_checkpoint(replace(run, train=replace(run.train, max_steps=9)))
    assert "train.max_steps" not in resume_safe(run)
    constant = replace(run.optim, scheduler="constant")  # a decaying rate spans max_steps: see test_checkpoints
    assert "train.max_steps" in resume_safe(replace(run, method=replace(run.method, steps_per_stage=1), optim=constant))


def test_softcot_thoughts_do_not_depend_on_the_batch_on_an_absolute_position_model(tmp_path) -> None:
    """GPT-2 adds a position embedding per slot: without positions taken from the mask, a row's soft
    thoughts moved with how much left padding its batch gave it (training and evaluation batches differ)."""
    cfg = tiny_run(tmp_path, "softcot", model={"name_or_path": "tiny-gpt2-l2-d64"},
                   data={"task": "arith", "options": {"num_steps": 2, "valid_size": 8, "modulus": 1000, "max_operand": 999}})
    cfg["method"].update(num_thoughts=3)
    m = build_method(load_run_config(base=cfg))
    with torch.no_grad():
        m.assistant.projection.weight.normal_()  # its 0.1-scaled start would make any gap small
    examples = m.task.load("valid", limit=8)
    long = max(examples, key=lambda ex: len(ex.question))
    short = min(examples, key=lambda ex: len(ex.question))
    assert len(long.question) > len(short.question), "one prompt length: no padding to test"
    with torch.no_grad():
        together = m.latent_step([long, short]).vectors[1]
        alone = m.latent_step([short]).vectors[0]
    assert torch.allclose(together, alone, atol=1e-5), (together - alone).abs().max()


def test_softcot_refuses_lora_on_its_frozen_main_model(tmp_path) -> None:
    from latentreason.config import ConfigError

    cfg = tiny_run(tmp_path, "softcot", lora={"enabled": True})
    with pytest.raises(ConfigError, match="frozen main model"):
        load_run_config(base=cfg)
    cfg["method"]["train_main"] = True
    load_run_config(base=cfg)
