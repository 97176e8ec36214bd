"""On-policy training (DLR and token-level GRPO) on the shared rollout and trainer: the reward and
surrogate, the frozen main model, samples that do not depend on batching, exact resume."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from latentreason.config import ConfigError, load_run_config
from latentreason.data.base import Example, build_task
from latentreason.methods.base import build_method
from latentreason.methods.dlr import DLR, contrastive_loss, gaussian_logp
from latentreason.methods.grpo import GRPO
from latentreason.methods.rl import clipped_surrogate, group_advantages, score_samples, top_k_mask
from latentreason.recipes import run_train
from tests.conftest import tiny_run

DLR_SMALL = {"warm_start_steps": 3, "group_size": 4, "num_latents": 3, "latent_dim": 16, "sigma": 1.0,
             "keep_fraction": 0.5}


def _cfg(tmp_path: Path, name: str, init: Path, steps: int = 6, **method) -> dict:
    cfg = tiny_run(tmp_path, name, train={"max_steps": steps, "log_every": 1, "save_every": 2, "init_from": str(init),
                                          "select_on_valid": False, "global_batch_size": 8, "micro_batch_size": 4})
    cfg["method"].update(method)
    return cfg


# -- the shared pieces -----------------------------------------------------------------------------
def test_group_advantages_compare_samples_within_their_own_question_only() -> None:
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.2, 0.2, 0.2, 0.2], [5.0, 1.0, 1.0, 1.0]])
    a = group_advantages(r)
    assert torch.allclose(a[0], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-3)
    assert torch.equal(a[1], torch.zeros(4))  # no signal in a uniform group
    assert a[2, 0] > 0 and torch.allclose(a[2, 1:], a[2, 1:2].expand(3)) and a[2, 1] < 0
    assert torch.allclose(a.mean(-1), torch.zeros(3), atol=1e-6)


def test_top_k_keeps_the_highest_rewards_and_breaks_ties_by_index() -> None:
    r = torch.tensor([[0.0, 1.0, 0.5, 1.0], [2.0, 2.0, 2.0, 2.0]])
    assert top_k_mask(r, 2).tolist() == [[False, True, False, True], [True, True, False, False]]
    assert top_k_mask(r, 1).tolist() == [[False, True, False, False], [True, False, False, False]]
    assert top_k_mask(r, 4).all()


def test_clipped_surrogate_stops_the_gain_outside_the_trust_region() -> None:
    logp = torch.tensor([0.0, 0.5, -0.5, 0.5, -0.5], requires_grad=True)
    old = torch.zeros(5)
    adv = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0])
    loss = clipped_surrogate(logp, old, adv, 0.2)
    assert torch.allclose(loss[:3], torch.tensor([-1.0, -1.2, -math.exp(-0.5)]), atol=1e-6)
    loss.sum().backward()
    # ratio e^0.5 > 1.2 with A > 0: clipped, no gradient; ratio e^-0.5 < 0.8 with A < 0: clipped too
    assert logp.grad[1] == 0 and logp.grad[4] == 0
    assert logp.grad[0] == -1 and logp.grad[2] < 0 and logp.grad[3] > 0


def test_reward_is_correctness_plus_weighted_format() -> None:
    task = build_task("arith", num_steps=2)
    ex = Example(id="q", question="1+2*3", answer="9")
    texts = ["1+2=3 3*3=9 #### 9", "1+2=3 3*3=9 #### 8", "the answer is 9", "nothing"]
    r = score_samples(task, texts, [ex], 4, format_weight=0.25)
    assert r.correct.tolist() == [[1.0, 0.0, 1.0, 0.0]]
    assert r.format.tolist() == [[1.0, 1.0, 0.0, 0.0]]
    assert r.total.tolist() == [[1.25, 0.25, 1.0, 0.0]]


def test_the_correctness_reward_can_check_what_accuracy_checks() -> None:
    """flexible (default) takes the last number anywhere; strict the answer after ####, as accuracy does."""
    task = build_task("arith", num_steps=2)
    ex = Example(id="q", question="1+2*3", answer="9")
    texts = ["#### 5 so 9", "1+2=3 3*3=9", "#### 9 then 3"]
    assert score_samples(task, texts, [ex], 3, 0.2).correct.tolist() == [[1.0, 1.0, 0.0]]
    assert score_samples(task, texts, [ex], 3, 0.2, "strict").correct.tolist() == [[0.0, 0.0, 1.0]]
    cfg = tiny_run(Path("/tmp"), "grpo")
    cfg["method"]["correct_extraction"] = "last"
    with pytest.raises(ValueError, match="correct_extraction"):
        load_run_config(base=cfg)


def test_gaussian_log_density_is_exact() -> None:
    z, mu = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    expected = torch.distributions.Normal(mu, 0.7).log_prob(z).sum((-1, -2))
    torch.testing.assert_close(gaussian_logp(z, mu, 0.7), expected)


def test_contrastive_term_pulls_high_reward_chains_together_and_away_from_low_ones() -> None:
    rewards = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    apart = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0]]])
    together = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [-0.1, 1.0]]])
    loss_apart, groups = contrastive_loss(apart, rewards, 0.1)
    loss_together, _ = contrastive_loss(together, rewards, 0.1)
    assert groups == 1 and loss_together < loss_apart
    # no low-reward chain (or fewer than two high ones): nothing to contrast
    assert contrastive_loss(apart, torch.ones(1, 4), 0.1)[1] == 0
    assert contrastive_loss(apart, torch.tensor([[1.0, 0.0, 0.0, 0.0]]), 0.1)[1] == 0


def test_mix_task_interleaves_parts_and_scores_each_by_its_own_rules() -> None:
    mix = build_task("mix", parts="arith:num_steps=4;arith:num_steps=2:modulus=7:seed=1")
    rows = mix.load("valid", limit=6)
    assert [ex.meta["part"] for ex in rows] == [0, 1, 0, 1, 0, 1]
    assert len({ex.id for ex in mix.load("valid")}) == len(mix.load("valid"))
    part_b = build_task("arith", num_steps=2, modulus=7, seed=1).load("valid", limit=3)
    assert [ex.question for ex in rows[1::2]] == [ex.question for ex in part_b]
    assert mix.prompt(rows[1]) == part_b[0].question
    assert mix.score(f"#### {part_b[0].answer}", rows[1]).correct
    with pytest.raises(ValueError, match="two or more"):
        build_task("mix", parts="arith")
    with pytest.raises(ValueError, match="key=value"):
        build_task("mix", parts="arith:num_steps;arith")


def test_mix_train_holds_no_question_of_any_parts_held_out_splits() -> None:
    """Two parts of one format (3-step arith mod 10 and mod 7) share questions: each part kept only its
    own valid questions out of its train, so the other part's leaked in (74 of 1,000 here)."""
    mix = build_task("mix", parts="arith:num_steps=3:train_size=4000;arith:num_steps=3:modulus=7:seed=1:train_size=4000")
    held = {ex.question for s in ("valid", "test") for ex in mix.load(s)}
    train = mix.load("train")
    assert len(train) > 7000 and not held & {ex.question for ex in train}


def test_mix_held_out_splits_hold_each_question_once_and_apart() -> None:
    """Two parts of one format drew the same small question space: valid held duplicates and shared
    questions with test (a score counted twice, a test question also used to select on)."""
    small = "arith:num_steps=2:max_operand=3:modulus=5:valid_size=30:test_size=30:train_size=10"
    mix = build_task("mix", parts=f"{small};{small}:seed=1")
    valid, test = ([ex.question for ex in mix.load(s)] for s in ("valid", "test"))
    parts = [build_task("arith", num_steps=2, max_operand=3, modulus=5, valid_size=30, test_size=30, train_size=10,
                        seed=s) for s in (0, 1)]
    drawn = [ex.question for p in parts for ex in p.load("valid")]
    assert len(set(drawn)) < len(drawn), "no shared questions: the test would show nothing"
    assert len(valid) == len(set(valid)) == len(set(drawn)) and not set(valid) & set(test)
    assert len(test) == len(set(test)) > 0


def test_decoder_body_keeps_the_first_layers_of_the_deep_model() -> None:
    from latentreason.models.loading import decoder_body
    from latentreason.models.tiny import tiny_model

    import copy

    deep = tiny_model("tiny-llama-l4-d64", vocab_size=40).eval()
    shallow = decoder_body(copy.deepcopy(deep), 2)
    assert len(shallow.layers) == 2 and shallow.config.num_hidden_layers == 2
    ids = torch.randint(0, 40, (2, 7))
    with torch.no_grad():
        full = deep(input_ids=ids, output_hidden_states=True)
        expected = deep.model.norm(full.hidden_states[2])
        got = shallow(input_ids=ids).last_hidden_state
    torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="has 4 layers"):
        decoder_body(copy.deepcopy(deep), 5)


def test_rl_configs_are_checked_before_weights_load(tmp_path, trained_arith_model) -> None:
    with pytest.raises(ConfigError, match="group_size"):
        load_run_config(base=_cfg(tmp_path, "grpo", trained_arith_model, group_size=1))
    with pytest.raises(ConfigError, match="keep_fraction"):
        load_run_config(base=_cfg(tmp_path, "dlr", trained_arith_model, keep_fraction=0.0))
    with pytest.raises(ConfigError, match="lora.enabled=true would train adapters"):
        load_run_config(base={**_cfg(tmp_path, "dlr", trained_arith_model), "lora": {"enabled": True}})
    run = load_run_config(base=_cfg(tmp_path, "dlr", trained_arith_model, warm_start_steps=10))
    with pytest.raises(ConfigError, match="warm_start_steps=10 exceeds"):
        run_train(run)


# -- DLR -------------------------------------------------------------------------------------------
def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(next(folder.glob("*.safetensors"))))


def test_dlr_trains_only_the_assistant_and_the_main_model_stays_bit_identical(tmp_path, trained_arith_model) -> None:
    run = load_run_config(base=_cfg(tmp_path, "dlr", trained_arith_model, **DLR_SMALL))
    out = run_train(run)
    start, final = _weights(trained_arith_model), _weights(out / "final")
    assert start.keys() <= final.keys()
    for key, value in start.items():
        assert torch.equal(value, final[key]), f"main model weight {key} changed"
    warm = load_file(str(out / "warm-start" / "extra_modules.safetensors"))
    done = load_file(str(out / "final" / "extra_modules.safetensors"))
    assert any(not torch.equal(warm[k], done[k]) for k in warm), "RL did not move the policy"
    assert any(k.startswith("policy.body.") for k in done), "the assistant body is part of the policy"
    state = torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=False)
    trainable = load_file(str(out / "checkpoint" / "trainable.safetensors"))
    assert all(".parts.lm." not in k and not k.startswith("parts.lm.") for k in trainable)
    n_policy = sum(1 for k in trainable if k.startswith("parts.policy.") and "rotary" not in k)
    # optimizer state for the policy only, less the projector: the RL loss lives in latent space
    # (the reward does not differentiate through the main model), so after the warm start's
    # optimizer reset the projector gets no gradient
    assert len(state["optimizer"]["state"]) == n_policy - 2
    assert torch.equal(warm["policy.projector.weight"], done["policy.projector.weight"])
    log = [r for r in map(__import__("json").loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]
    rl_rows = [r for r in log if r.get("stage") == "rl"]
    assert len(rl_rows) == 3 and all("reward" in r and "reward_kept" in r for r in rl_rows)
    assert all("reward" not in r for r in log if r.get("stage") == "warm-start")


def _dlr(tmp_path, init, **method) -> DLR:
    run = load_run_config(base=_cfg(tmp_path, "dlr", init, **{**DLR_SMALL, **method}))
    m = build_method(run, model_path=str(init), training=True)
    m.set_stage(1, m.stages()[1])
    return m


def test_dlr_samples_depend_on_the_question_and_step_not_on_the_batch(tmp_path, trained_arith_model) -> None:
    m = _dlr(tmp_path, trained_arith_model)
    parts = torch.nn.ModuleDict({"lm": m.loaded.model, "policy": m.policy})
    ex = m.task.load("train", limit=4)
    with torch.no_grad():
        alone = m.sample(parts, m.collate(ex[2:3]), step=5)
        batch = m.sample(parts, m.collate(ex), step=5)
        later = m.sample(parts, m.collate(ex[2:3]), step=6)
    G = m.cfg.group_size
    with torch.no_grad():  # μ has unit scale, so σ is the noise relative to the latent
        mu = m.policy.mean(m.collate(ex)["helper_prompts"], m.cfg.num_latents, m.helper_pad)
    torch.testing.assert_close(mu.pow(2).mean(-1), torch.ones(4, m.cfg.num_latents), rtol=0, atol=1e-3)
    torch.testing.assert_close(alone["z"], batch["z"][2 * G: 3 * G], rtol=0, atol=1e-5)
    assert not torch.allclose(alone["z"], later["z"])
    assert batch["num_targets"] == 4 * m.cfg.keep_top and batch["kept"].view(4, G).sum(-1).eq(m.cfg.keep_top).all()
    # the kept chains are the best of their group
    r = batch["rewards"]
    kept = batch["kept"].view(4, G)
    assert all(r[b][kept[b]].min() >= r[b][~kept[b]].max() for b in range(4) if (~kept[b]).any())


def test_dlr_update_moves_the_mean_toward_the_high_reward_chains(tmp_path, trained_arith_model) -> None:
    """One surrogate step with advantages set by hand: the chains with positive advantage gain log-density
    relative to the others."""
    m = _dlr(tmp_path, trained_arith_model, contrastive_weight=0.0, keep_fraction=1.0)
    parts = torch.nn.ModuleDict({"lm": m.loaded.model, "policy": m.policy})
    ex = m.task.load("train", limit=2)
    with torch.no_grad():
        batch = m.sample(parts, m.collate(ex), step=0)
    G = m.cfg.group_size
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0] * 2)[: 2 * G]
    batch["advantages"] = adv
    opt = torch.optim.SGD(m.policy.parameters(), lr=1e-6)  # a small step: first order holds

    def logp() -> torch.Tensor:
        mu = m.policy.mean(batch["helper_prompts"], m.cfg.num_latents, m.helper_pad).repeat_interleave(G, 0)
        return gaussian_logp(batch["z"], mu, m.cfg.sigma)

    with torch.no_grad():
        before = logp()
    m.loss(parts, batch)["loss_sum"].backward()
    opt.step()
    with torch.no_grad():
        change = logp() - before
    assert (adv * change).sum() > 0 and change[adv > 0].mean() > change[adv < 0].mean()


def test_evaluation_builds_the_assistants_latents_without_an_autograd_graph(tmp_path, trained_arith_model,
                                                                            monkeypatch) -> None:
    """The assistant's parameters require grad (it trains): its latents for a validation or eval batch
    kept every activation of its body alive through the whole rollout."""
    from latentreason.methods import base

    m = _dlr(tmp_path, trained_arith_model)
    fed = []
    real = base.rollout

    def spy(model, prompts, step, *args, **kwargs):
        fed.append(step.vectors)
        return real(model, prompts, step, *args, **kwargs)

    monkeypatch.setattr(base, "rollout", spy)
    list(base.generate_batches(m, m.task.load("valid", limit=4), 4))  # what predict, eval and validation run
    assert fed and not fed[0].requires_grad and fed[0].grad_fn is None
    assert any(p.requires_grad for p in m.policy.parameters())  # still trainable: only evaluation ran without


def test_a_dlr_assistant_named_by_path_loads_at_training_precision(tmp_path, trained_arith_model, monkeypatch) -> None:
    """model.dtype=auto loads bfloat16 weights on a GPU unless training: the trainable assistant then
    started from rounded weights (cast back up to float32), unlike the main model and a copied assistant."""
    from latentreason.methods import dlr

    calls = []
    real = dlr.load_model
    monkeypatch.setattr(dlr, "load_model", lambda cfg, **kw: calls.append(kw) or real(cfg, **kw))
    _dlr(tmp_path, trained_arith_model, assistant=str(trained_arith_model))
    assert calls == [{"training": True}]


def test_dlr_evaluation_feeds_the_mean_latents_and_reloads(tmp_path, trained_arith_model) -> None:
    run = load_run_config(base=_cfg(tmp_path, "dlr", trained_arith_model, **DLR_SMALL))
    out = run_train(run)
    from latentreason.methods.base import Method

    saved = Method.from_pretrained(out / "final")
    assert isinstance(saved, DLR)
    ex = saved.task.load("valid", limit=6)
    first = saved.generate(ex, batch_size=6)
    again = [saved.generate([e], batch_size=1)[0] for e in ex]
    assert first == again  # no noise at evaluation, no dependence on the batch
    step = saved.latent_step(ex[:2])
    assert step.vectors.shape == (2, 3, saved.loaded.model.get_input_embeddings().weight.shape[1])


# -- GRPO ------------------------------------------------------------------------------------------
def test_grpo_sampled_log_probabilities_match_the_training_forward(tmp_path, trained_arith_model) -> None:
    run = load_run_config(base=_cfg(tmp_path, "grpo", trained_arith_model, group_size=4))
    m = build_method(run, model_path=str(trained_arith_model), training=True)
    assert isinstance(m, GRPO)
    parts = torch.nn.ModuleDict({"lm": m.loaded.model})
    ex = m.task.load("train", limit=3)
    with torch.no_grad():
        batch = m.sample(parts, m.collate(ex), step=0)
        again = m.sample(parts, m.collate(ex[1:2]), step=0)
        out = m.loss(parts, batch)
    assert out["max_logratio_at_sampling"] < 1e-4
    labels = batch["labels"]
    assert batch["num_targets"] == int((labels[:, 1:] != -100).sum()) > 0
    assert torch.equal(again["input_ids"][:, : labels.shape[1]].ne(m.loaded.pad_id).sum(-1),
                       batch["input_ids"][4:8, : again["input_ids"].shape[1]].ne(m.loaded.pad_id).sum(-1))
    # a row that ended sampled its eos too: it is a target (the model learns when to stop)
    eos, cap = m.loaded.eos_ids[0], m.run.rollout.max_new_tokens
    for row_ids, row_labels in zip(batch["input_ids"], labels):
        completion = row_labels[row_labels != -100].tolist()
        assert completion[-1] == eos or len(completion) == cap
    assert any(row[row != -100].tolist()[-1] == eos for row in labels)
    texts = m.loaded.tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
    assert len(set(texts)) > 3, "sampled chains should differ"


def test_grpo_sequence_aggregation_is_the_mean_of_per_sample_means(tmp_path, trained_arith_model) -> None:
    """token (default): every sampled token of the batch weighs alike; sequence (the GRPO paper): each
    sample's mean over its tokens, then the mean over samples, what the trainer's division gives."""
    losses = {}
    for how in ("token", "sequence"):
        run = load_run_config(base=_cfg(tmp_path, "grpo", trained_arith_model, group_size=4, loss_aggregation=how,
                                        temperature=4.0))  # hot: samples of many lengths
        m = build_method(run, model_path=str(trained_arith_model), training=True)
        parts = torch.nn.ModuleDict({"lm": m.loaded.model})
        with torch.no_grad():
            batch = m.sample(parts, m.collate(m.task.load("train", limit=2)), step=0)
            out = m.loss(parts, batch)
        valid = batch["labels"][:, 1:] != -100
        lengths = valid.sum(-1)
        assert lengths.unique().numel() > 1, "samples of one length: the two aggregations would agree"
        losses[how] = float(out["loss_sum"]) / batch["num_targets"]
        if how == "sequence":
            assert batch["num_targets"] == 8
        else:
            assert batch["num_targets"] == int(lengths.sum())
    # ratio 1 at sampling: each token's surrogate is -advantage of its sample
    adv = batch["advantages"]
    assert losses["sequence"] == pytest.approx(float(-adv.mean()), abs=1e-5)
    assert losses["token"] == pytest.approx(float(-(adv * lengths).sum() / lengths.sum()), abs=1e-5)


def test_grpo_changes_the_model_and_its_kl_reference_does_not(tmp_path, trained_arith_model) -> None:
    run = load_run_config(base=_cfg(tmp_path, "grpo", trained_arith_model, steps=4, group_size=4, kl_coef=0.1))
    out = run_train(run)
    start, final = _weights(trained_arith_model), _weights(out / "final")
    assert any(not torch.equal(start[k], final[k]) for k in start)
    log = [r for r in map(__import__("json").loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert all("kl" in r and r["kl"] >= 0 for r in log) and len(log) == 4


@pytest.mark.parametrize("name", ["dlr", "grpo"])
def test_on_policy_runs_resume_exactly(tmp_path, trained_arith_model, monkeypatch, name) -> None:
    extra = DLR_SMALL if name == "dlr" else {"group_size": 4}
    ref = run_train(load_run_config(base=_cfg(tmp_path / "ref", name, trained_arith_model, **extra)))
    cls = DLR if name == "dlr" else GRPO
    original = cls.sample

    def crash(self, modules, batch, step):  # the process dies in step 5, after the checkpoint of step 4
        if step == 4:
            raise KeyboardInterrupt
        return original(self, modules, batch, step)

    cfg = _cfg(tmp_path / "cut", name, trained_arith_model, **extra)
    monkeypatch.setattr(cls, "sample", crash)
    with pytest.raises(KeyboardInterrupt):
        run_train(load_run_config(base=cfg))
    monkeypatch.setattr(cls, "sample", original)
    out = run_train(load_run_config(base=cfg))
    a, b = _weights(ref / "final"), _weights(out / "final")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    if name == "dlr":
        a = load_file(str(ref / "final" / "extra_modules.safetensors"))
        b = load_file(str(out / "final" / "extra_modules.safetensors"))
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    rows = lambda p: [r["reward"] for r in map(__import__("json").loads, (p / "log.jsonl").read_text().splitlines()) if "reward" in r]  # noqa: E731
    assert rows(ref) == rows(out)


def test_grpo_on_two_processes_matches_one_process(tmp_path, trained_arith_model) -> None:
    """The normaliser (sampled tokens) is summed over processes after sampling: one global batch."""
    import json

    from tests.conftest import train_on_one_and_two_processes

    def cfg(folder: Path) -> dict:
        c = _cfg(folder, "grpo", trained_arith_model, steps=2, group_size=4)
        c["train"].update(save_every=2)
        return c

    one, two = train_on_one_and_two_processes(cfg, tmp_path)
    assert json.loads((two / "train_summary.json").read_text())["processes"] == 2
    a, b = _weights(one / "final"), _weights(two / "final")
    start = _weights(trained_arith_model)
    assert any(not torch.equal(a[k], start[k]) for k in a)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)


def test_dlr_with_chain_trains_the_main_model_to_write_the_chain_after_the_latents(tmp_path, trained_arith_model) -> None:
    ex = build_task("arith", num_steps=2).load("train", limit=1)
    for with_chain in (False, True):
        m = _dlr(tmp_path, trained_arith_model, with_chain=with_chain)
        text = m.loaded.tokenizer.decode(m.collate(ex)["targets"][0], skip_special_tokens=True)
        answer = m.task.answer_text(ex[0])
        assert text == (f"{m.task.chain_text(ex[0])} {answer}" if with_chain else answer)
