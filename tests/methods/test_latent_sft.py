"""Latent-SFT: the sequences, both masks and the dual-track positions against hand-built ones, the
stage-2 loss against a hand computation, soft-label export and resume, the two stages end to end."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from latentreason.config import ConfigError, load_run_config
from latentreason.methods.latent_sft import (
    FINAL,
    LATENT,
    PROMPT,
    SEGMENT,
    LatentSFT,
    LatentSFTConfig,
    SoftLabels,
    additive,
    decoder_sequence,
    dual_positions,
    encoder_sequence,
    induction_mask,
    latent_bags,
    latent_sft_stages,
    segment,
    supervision_mask,
)
from latentreason.models.latent_forward import IGNORE
from latentreason.recipes import build_method
from tests.conftest import tiny_run

BOT, EOT, LAT, EOS = 100, 101, 102, 1
PROMPT_IDS = [10, 11, BOT]
SEGMENTS = [[20, 21], [22, 23], [24]]
ANSWER = [30, EOS]


def _allowed(rows: dict[int, set[int]], n: int) -> torch.Tensor:
    m = torch.zeros(n, n, dtype=torch.bool)
    for q, keys in rows.items():
        m[q, sorted(keys)] = True
    return m


def test_segmentation_keeps_a_last_partial_segment():
    assert segment([1, 2, 3, 4, 5], 2) == [[1, 2], [3, 4], [5]]
    assert segment([1, 2, 3, 4], 4) == [[1, 2, 3, 4]]
    assert segment([], 3) == []


def test_encoder_sequence_and_induction_mask_by_hand():
    ids, slots = encoder_sequence(PROMPT_IDS, SEGMENTS, LAT, EOT)
    assert ids == [10, 11, BOT, 20, 21, LAT, 22, 23, LAT, 24, LAT, EOT] and slots == [5, 8, 10]
    is_latent = torch.zeros(1, 12, dtype=torch.bool)
    is_latent[0, slots] = True
    causal = {q: set(range(q + 1)) for q in range(12)}
    # no position sees an earlier <latent>: 5 is hidden from 6.., 8 from 9.., 10 from 11
    expected = {q: {k for k in keys if not (k in slots and k < q)} for q, keys in causal.items()}
    got = induction_mask(is_latent, torch.tensor([12]))[0]
    assert torch.equal(got, _allowed(expected, 12))
    assert torch.equal(induction_mask(is_latent, torch.tensor([12]), enabled=False)[0], _allowed(causal, 12))


def test_decoder_sequence_labels_supervision_mask_and_dual_positions_by_hand():
    ids, group, index, labels = decoder_sequence(PROMPT_IDS, SEGMENTS, ANSWER, LAT, EOT)
    P, L, S, F = PROMPT, LATENT, SEGMENT, FINAL
    #        10  11  bot Z1  22  23  Z2  24  Z3  eot 30  eos
    assert ids == [10, 11, BOT, LAT, 22, 23, LAT, 24, LAT, EOT, 30, EOS]
    assert group == [P, P, P, L, S, S, L, S, L, F, F, F]
    assert index == [0, 0, 0, 0, 0, 0, 1, 1, 2, 0, 0, 0]
    I = IGNORE
    assert labels == [I, I, I, 22, 23, I, 24, I, EOT, 30, EOS, I]
    expected = {0: {0}, 1: {0, 1}, 2: {0, 1, 2},
                3: {0, 1, 2, 3},                 # Z1: prompt + itself
                4: {3, 4}, 5: {3, 4, 5},         # S2: its latent Z1 + itself
                6: {0, 1, 2, 3, 6},              # Z2: prompt, Z1, Z2
                7: {6, 7},                       # S3: Z2 + itself
                8: {0, 1, 2, 3, 6, 8},           # Z3
                9: {0, 1, 2, 3, 6, 8, 9}, 10: {0, 1, 2, 3, 6, 8, 9, 10}, 11: {0, 1, 2, 3, 6, 8, 9, 10, 11}}
    g, x, n = torch.tensor([group]), torch.tensor([index]), torch.tensor([12])
    assert torch.equal(supervision_mask(g, x, n)[0], _allowed(expected, 12))
    assert torch.equal(supervision_mask(g, x, n, enabled=False)[0], _allowed({q: set(range(q + 1)) for q in range(12)}, 12))
    # dual track: latents continue the prompt (3, 4, 5), segments continue from their latent
    assert dual_positions(g, n)[0].tolist() == [0, 1, 2, 3, 4, 5, 4, 5, 5, 6, 7, 8]
    # batched with a shorter row (one long segment, right-padded): each row as if alone, pads at 0
    _, g2, _, _ = decoder_sequence([10, BOT], [[20, 21], [22, 23, 24]], [30, EOS], LAT, EOT)
    both = torch.tensor([group, g2 + [-1] * (12 - len(g2))])
    assert dual_positions(both, torch.tensor([12, len(g2)])).tolist() == [
        [0, 1, 2, 3, 4, 5, 4, 5, 5, 6, 7, 8],
        [0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 0, 0]]


def test_padding_is_masked_by_length_and_pad_rows_see_only_themselves():
    ids, group, index, _ = decoder_sequence(PROMPT_IDS, SEGMENTS[:1], ANSWER, LAT, EOT)
    width = len(ids) + 3
    g = torch.tensor([group + [-1] * 3])
    x = torch.tensor([index + [0] * 3])
    m = supervision_mask(g, x, torch.tensor([len(ids)]))[0]
    assert not m[: len(ids), len(ids):].any(), "a real position attends to padding"
    assert torch.equal(m[len(ids):, :], torch.eye(width, dtype=torch.bool)[len(ids):])
    add = additive(m[None])
    assert add.shape == (1, 1, width, width) and add.min() == torch.finfo(torch.float32).min and add.max() == 0
    assert torch.isfinite(add).all()


def _method(tmp_path: Path, **method) -> LatentSFT:
    cfg = tiny_run(tmp_path, "latent-sft", train={"select_on_valid": True, "max_steps": 3})
    cfg["method"].update(method)
    return build_method(load_run_config(base=cfg), training=True)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_stage_two_loss_equals_a_hand_computation(tmp_path, tau):
    """KL(teacher || softmax(logits / τ)) on the latents (inference feeds softmax(logits / τ), so that
    is the distribution the teacher's α must become) + CE at τ = 1 on <eot>, the answer and EOS."""
    method = _method(tmp_path, stage=2, soft_labels=str(tmp_path / "unused"), temperature=tau)
    lm = method.loaded
    torch.manual_seed(0)
    k, v = 3, lm.model.get_input_embeddings().weight.shape[0]
    probs = torch.tensor([[[0.5, 0.3, 0.2], [0.6, 0.4, 0.0]], [[0.9, 0.05, 0.05], [0.0, 0.0, 0.0]]])
    ids = torch.tensor([[[5, 6, 7], [8, 9, 10]], [[11, 12, 13], [0, 0, 0]]])
    prompts, targets = [[3, 4, lm.bot_id], [4, lm.bot_id]], [[40, 41, EOS], [42, EOS]]
    batch = {"prompts": prompts, "targets": targets, "probs": probs, "ids": ids, "counts": [2, 1], "ce_tokens": 3 + 2 + 2}
    got = method.loss(torch.nn.ModuleDict({"lm": lm.model}), batch)["loss_sum"]
    # by hand: one plain forward per row over [prompt, z1..zn, <eot>, targets]
    E = lm.model.get_input_embeddings().weight.detach()
    kl_rows, ce = [], 0.0
    for r in range(2):
        n = batch["counts"][r]
        z = [(probs[r, t, :, None] * E[ids[r, t]]).sum(0) for t in range(n)]
        seq = torch.cat([E[prompts[r]], torch.stack(z), E[[lm.eot_id] + targets[r][:-1]]])
        with torch.no_grad():
            logits = lm.model(inputs_embeds=seq[None]).logits[0]
        logp, latent_logp = logits.log_softmax(-1), (logits / tau).log_softmax(-1)
        p0 = len(prompts[r]) - 1
        kls = []
        for t in range(n):
            teacher = probs[r, t] / probs[r, t].sum()
            kls.append(sum(float(teacher[j]) * (math.log(float(teacher[j]) + 1e-12) - float(latent_logp[p0 + t, ids[r, t, j]]))
                           for j in range(k)))
        kl_rows.append(sum(kls) / n)
        after = [lm.eot_id] + targets[r]
        ce -= sum(float(logp[p0 + n + j, after[j]]) for j in range(len(after)))
    expected = (sum(kl_rows) / 2) * batch["ce_tokens"] + ce
    assert abs(got.item() - expected) < 1e-3 * max(1.0, abs(expected))
    assert v > 13


def _stage1_run(root: Path, steps: int = 2, top_k: int = 10) -> Path:
    """A few-step stage-1 run on the 2-layer tiny model; returns its output folder."""
    cfg = tiny_run(root, "latent-sft", train={"select_on_valid": True, "max_steps": 3 * steps, "eval_every": steps,
                                              "save_every": steps, "eval_limit": 8},
                   rollout={"max_new_tokens": 8})
    cfg["method"].update(compression=4, steps_per_step=steps, max_latent_steps=8, top_k=top_k)
    from latentreason.recipes import run_train

    run_train(load_run_config(base=cfg))
    return root / "run"


@pytest.fixture(scope="module")
def stage1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _stage1_run(tmp_path_factory.mktemp("lsft-stage1"))


@pytest.fixture(scope="module")
def stage1_full(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Stage 1 over the whole vocabulary (top_k=0): a stage 2 exports the labels its stage 1 made."""
    return _stage1_run(tmp_path_factory.mktemp("lsft-stage1-full"), top_k=0)


@pytest.mark.slow
def test_stage_one_with_its_warm_up_on_two_processes_matches_one_process(tmp_path):
    """The warm-up leaves every LM layer out of the loss: DDP waited for their gradients and failed."""
    from safetensors.torch import load_file

    from tests.conftest import train_on_one_and_two_processes

    def cfg(folder: Path) -> dict:
        c = tiny_run(folder, "latent-sft", train={"select_on_valid": True, "eval_limit": 8, "max_steps": 2, "save_every": 2},
                     rollout={"max_new_tokens": 8})
        c["method"].update(compression=4, steps="warmup,both", steps_per_step=1, max_latent_steps=8)
        return c

    runs = train_on_one_and_two_processes(cfg, tmp_path)
    for name in ("model.safetensors", "extra_modules.safetensors"):
        a, b = (load_file(str(run / "final" / name)) for run in runs)
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)


def test_stage_one_trains_encoder_then_decoder_then_both_each_from_the_best(stage1):
    from safetensors.torch import load_file

    out = stage1
    assert all((out / name / "extra_modules.safetensors").exists() for name in ("encoder", "decoder", "both", "best"))
    lm = {s: load_file(str(out / s / "model.safetensors")) for s in ("encoder", "decoder", "both")}
    enc = {s: load_file(str(out / s / "extra_modules.safetensors")) for s in ("encoder", "decoder", "both")}
    same = lambda a, b: all(torch.equal(a[k], b[k]) for k in a)  # noqa: E731
    assert same(enc["encoder"], enc["decoder"]), "the encoder changed in the decoder step"
    assert not same(lm["encoder"], lm["decoder"]), "the decoder step did not train the LLM"
    assert not same(enc["decoder"], enc["both"]) and not same(lm["decoder"], lm["both"]), "the both step froze a part"
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in log if set(r) == {"stage", "step"}] == ["encoder", "decoder", "both"]
    assert len([r for r in log if "restored_best_valid_metric" in r]) == 3
    trained = [r for r in log if "loss" in r]
    assert trained and all(0 < r["latent_top1_weight"] <= 1 and 0 < r["latent_distinct_top1"] <= 1 for r in trained)


def test_stage_two_under_lora_exports_the_stage_one_labels(stage1, tmp_path):
    """Under LoRA the LLM is peft-wrapped when stage 2 exports its labels: the encoder built from it
    took the adapter layers' names and refused the saved (merged) encoder weights."""
    from latentreason.recipes import run_train

    def run(out: str, lora: bool) -> SoftLabels:
        cfg = tiny_run(tmp_path / out, "latent-sft", train={"init_from": str(stage1 / "best"), "max_steps": 2,
                                                            "select_on_valid": False}, data={"train_limit": 6},
                       **({"lora": {"enabled": True, "r": 4, "alpha": 8, "target_modules": "q_proj,v_proj,embed_tokens"}}
                          if lora else {}))
        cfg["method"].update(stage=2, compression=4, max_latent_steps=8)
        run_train(load_run_config(base=cfg))
        return SoftLabels(tmp_path / out / "run" / "soft_labels")

    plain, adapted = run("full", False), run("lora", True)
    assert plain.rows.keys() == adapted.rows.keys() and len(plain.rows) == 6
    for key, (p, i) in plain.rows.items():
        assert torch.allclose(adapted.rows[key][0], p) and torch.equal(adapted.rows[key][1], i)
    assert (tmp_path / "lora" / "run" / "final" / "model.safetensors").exists()


@pytest.mark.parametrize("field,value", [("compression", 2), ("induction_mask", False), ("top_k", 5),
                                         ("temperature", 0.5)])
def test_stage_two_refuses_soft_label_settings_other_than_its_stage_ones(stage1, tmp_path, field, value):
    """A stage 2 left at a default after a stage 1 of another setting exported labels the encoder was
    never trained to make (bench_latent_sft.py's no-LTIM ablation exported its labels with the mask on)."""
    from latentreason.recipes import run_train

    cfg = tiny_run(tmp_path, "latent-sft", train={"init_from": str(stage1 / "best"), "max_steps": 2,
                                                  "select_on_valid": False}, data={"train_limit": 6})
    cfg["method"].update({"stage": 2, "compression": 4, "max_latent_steps": 8, field: value})
    from latentreason.models.loading import CheckpointError

    with pytest.raises(CheckpointError, match=rf"stage 1 ran with method.{field}=.*\(this stage 2: {value!r}\)"):
        run_train(load_run_config(base=cfg))
    assert not (tmp_path / "run" / "soft_labels").exists()


def test_stage_two_exports_soft_labels_once_and_resumes_them_without_duplicates(stage1, tmp_path, monkeypatch):
    from latentreason.methods import latent_sft

    def method(folder: Path) -> LatentSFT:
        cfg = tiny_run(tmp_path, "latent-sft", train={"init_from": str(stage1 / "best"), "max_steps": 2},
                       data={"train_limit": 10})
        cfg["method"].update(stage=2, compression=4, export_shard_size=4, soft_labels=str(folder))
        return build_method(load_run_config(base=cfg), model_path=str(stage1 / "best"), training=True)

    whole = method(tmp_path / "whole").soft_labels()
    assert len(whole.rows) == 10 and len(list((tmp_path / "whole").glob("shard-*"))) == 3
    writes = {"n": 0}
    real = latent_sft.save_file

    def dying(*args, **kwargs):
        writes["n"] += 1
        if writes["n"] == 2:
            raise KeyboardInterrupt  # killed while writing the second shard
        return real(*args, **kwargs)

    monkeypatch.setattr(latent_sft, "save_file", dying)
    with pytest.raises(KeyboardInterrupt):
        method(tmp_path / "killed").soft_labels()
    assert len(list((tmp_path / "killed").glob("shard-*"))) == 1 and not (tmp_path / "killed" / "complete.json").exists()
    monkeypatch.setattr(latent_sft, "save_file", real)
    resumed = method(tmp_path / "killed").soft_labels()
    assert resumed.rows.keys() == whole.rows.keys()
    for key, (p, i) in whole.rows.items():
        assert torch.equal(resumed.rows[key][0], p) and torch.equal(resumed.rows[key][1], i)
    # another compression is refused, not mixed into the same folder
    bad = method(tmp_path / "killed")
    bad.cfg.compression = 2
    with pytest.raises(Exception, match=r"soft labels of other settings \(compression: 4 -> 2\)"):
        latent_sft.export_soft_labels(bad, bad.task.load("train", limit=10), tmp_path / "killed", stage1 / "best")


@pytest.mark.parametrize("top_k", [10, 0], ids=["top-10", "full-vocabulary"])
def test_what_stage_two_trains_on_is_what_inference_computes(request, tmp_path, top_k):
    """Soft labels equal to the model's own latent distributions at inference: teacher forcing
    feeds the very vectors the rollout fed and predicts, at each latent position, the very
    distribution inference had there."""
    stage1 = request.getfixturevalue("stage1" if top_k else "stage1_full")
    from latentreason.models.rollout import RolloutConfig, rollout

    cfg = tiny_run(tmp_path, "latent-sft", rollout={"max_new_tokens": 6})
    cfg["method"].update(stage=2, compression=4, max_latent_steps=5, soft_labels=str(tmp_path / "x"), top_k=top_k)
    method = build_method(load_run_config(base=cfg), model_path=str(stage1 / "best"))
    lm = method.loaded
    examples = method.task.load("valid", limit=6)
    prompts = method.prompt_ids(examples)
    rc = RolloutConfig(num_latent_steps=5, max_new_tokens=6, keep_distributions="full")
    with torch.no_grad():
        out = rollout(lm.model, prompts, method.latent_step(examples), rc, eos_ids=lm.eos_ids, pad_id=lm.pad_id,
                      eot_id=lm.eot_id)
    counts = out.num_latent_steps.tolist()
    assert any(c > 0 for c in counts)
    probs, ids = [], []
    for r, n in enumerate(counts):
        p, i = method.mixture_weights(out.dist_probs[r, :max(n, 1)].log())  # the step's own top-k weights
        probs.append(p)
        ids.append(i)
    probs, ids = torch.stack(probs), (torch.stack(ids) if top_k else None)
    vectors = method.mix(probs, ids, lm.model.get_input_embeddings().weight.detach())
    for r, n in enumerate(counts):
        torch.testing.assert_close(vectors[r, :n], out.latents[r, :n], atol=1e-5, rtol=1e-5)
    targets = [t + [lm.eos_ids[0]] for t in out.tokens]
    batch = {"prompts": prompts, "targets": targets, "probs": probs, "ids": ids, "counts": [max(c, 0) for c in counts],
             "ce_tokens": sum(len(t) for t in targets) + len(targets)}
    keep = [r for r, c in enumerate(counts) if c > 0]
    batch = {"prompts": [prompts[r] for r in keep], "targets": [targets[r] for r in keep], "probs": probs[keep],
             "ids": ids[keep] if top_k else None, "counts": [counts[r] for r in keep], "ce_tokens": batch["ce_tokens"]}
    with torch.no_grad():
        loss = method.loss(torch.nn.ModuleDict({"lm": lm.model}), batch)
    # A student equal to inference's distribution p has KL(top-k renormalised p ‖ p) = -log(top-k mass of p).
    # (full vocabulary: the teacher is p itself, KL 0)
    mass = [float(out.dist_probs[r, t].topk(top_k or out.dist_probs.shape[-1]).values.sum())
            for r in keep for t in range(counts[r])]
    expected = sum(-math.log(m) for m in mass) / len(mass)
    assert abs(float(loss["kl"]) - expected) < 1e-4, "teacher-forced latent positions differ from what inference computed"


@pytest.mark.parametrize("top_k", [10, 0], ids=["top-10", "full-vocabulary"])
def test_stage_two_end_to_end_trains_saves_loads_and_reports_superposition(request, tmp_path, top_k):
    stage1 = request.getfixturevalue("stage1" if top_k else "stage1_full")
    import latentreason
    from latentreason.recipes import run_eval, run_train

    cfg = tiny_run(tmp_path, "latent-sft", train={"init_from": str(stage1 / "best"), "max_steps": 2, "eval_limit": 8},
                   data={"train_limit": 32}, rollout={"max_new_tokens": 8})
    cfg["method"].update(stage=2, compression=4, max_latent_steps=6, gumbel=True, top_k=top_k)
    run_train(load_run_config(base=cfg))
    out = tmp_path / "run"
    assert (out / "soft_labels" / "complete.json").exists()
    assert not (out / "best" / "extra_modules.safetensors").exists(), "stage 2 carries no encoder"
    method = latentreason.load(out / "best")
    assert isinstance(method, LatentSFT) and method.cfg.stage == 2
    assert len(method.generate(["1+2*3\n"])) == 1
    summary = run_eval(load_run_config(overrides=[f"model.name_or_path={out / 'best'}", "eval.limit=8",
                                                  f"eval.output_dir={tmp_path / 'ev'}"], saved_base=True))
    assert {"ecr@1", "ecr@5", "ecr@10", "pass_at_1_over_latent_steps"} <= set(summary)
    assert summary["n_eff_questions"] == 0 and summary["n_eff"] is None  # arith has one solution per question
    assert summary["ecr@1"] <= summary["ecr@5"] <= summary["ecr@10"]
    rows = [json.loads(line) for line in (tmp_path / "ev" / "predictions.jsonl").read_text().splitlines()]
    assert set(rows[0]["superposition"]) >= {"ecr@1", "n_eff", "top2"}
    # further solutions from a file (GSM8K's case: chains sampled from a CoT model) make N_eff measurable
    sols = tmp_path / "solutions.jsonl"
    sols.write_text("".join(json.dumps({"id": r["id"], "solutions": ["1+1=2 2*2=4", "3*3=9"]}) + "\n" for r in rows[:5]))
    more = run_eval(load_run_config(overrides=[f"model.name_or_path={out / 'best'}", "eval.limit=8", f"eval.solutions={sols}",
                                               f"eval.output_dir={tmp_path / 'ev-sols'}"], saved_base=True))
    assert more["n_eff_questions"] == 5 and 1.0 <= more["n_eff"] <= 3.0
    assert more["accuracy"] == summary["accuracy"] and more["ecr@1"] == summary["ecr@1"]
    sols.write_text(json.dumps({"id": rows[0]["id"], "solutions": ["4*4=6"]}) + "\n")  # rewritten in place
    with pytest.raises(ValueError, match="other settings"):
        run_eval(load_run_config(overrides=[f"model.name_or_path={out / 'best'}", "eval.limit=8", f"eval.solutions={sols}",
                                            f"eval.output_dir={tmp_path / 'ev-sols'}"], saved_base=True))
    # the superposition made visible: one line per latent step, top-5 tokens and the entropy; a figure
    from latentreason.cli import main

    main(["inspect", "latents", f"model.name_or_path={out / 'best'}", "-n", "2", "--out", str(tmp_path / "insp")])
    text = next((tmp_path / "insp").glob("latents-*.txt")).read_text().splitlines()
    steps = [line for line in text[3:] if line.strip()]
    assert steps and all(len(line.split("  ")) >= 3 for line in steps)
    assert int(steps[-1].split()[0]) == len(steps)
    assert next((tmp_path / "insp").glob("latents-*.png")).stat().st_size > 1000
    # a position outside the split is an error naming it, not an empty print
    for n, says in (("0", "must be >= 1"), ("100000", "has only")):
        with pytest.raises(SystemExit, match=says):
            main(["inspect", "latents", f"model.name_or_path={out / 'best'}", "-n", n])


def test_n_eff_encoder_alignment_reads_the_stage_one_encoders_latents(stage1, tmp_path, monkeypatch):
    import latentreason
    from latentreason.methods.base import Method
    from latentreason.models.loading import CheckpointError
    from latentreason.models.steps import input_embedding_table
    from latentreason.recipes import run_eval, run_train

    cfg = tiny_run(tmp_path, "latent-sft", train={"init_from": str(stage1 / "best"), "max_steps": 2, "eval_limit": 8},
                   data={"train_limit": 32}, rollout={"max_new_tokens": 8})
    cfg["method"].update(stage=2, compression=4, max_latent_steps=6)
    run_train(load_run_config(base=cfg))
    out = tmp_path / "run"
    method = latentreason.load(out / "best")
    # a solution's reference latents are what the stage-1 encoder exported for it as a soft label
    ex = method.task.load("train", limit=32)[3]
    gold = method.loaded.tokenizer(method.task.chain_text(ex), add_special_tokens=False)["input_ids"]
    ((got,),) = method.solution_latents([ex], [[segment(gold, 4)]])
    probs, ids = SoftLabels(out / "soft_labels").get(ex.id)
    stage_one = Method.from_pretrained(stage1 / "best")
    want = LatentSFT.mix(probs, ids, input_embedding_table(stage_one.loaded.model)).float()
    assert got.shape == (len(segment(gold, 4)), want.shape[-1])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # batched in chunks across examples, each solution read after its own example's prompt
    other = method.task.load("train", limit=32)[7]
    short, full = segment(gold[:5], 4), segment(gold, 4)
    whole = method.solution_latents([other, ex], [[short, full], [full, short]])
    chunked = method.solution_latents([other, ex], [[short, full], [full, short]], chunk=3)
    assert [len(x) for x in whole] == [2, 2] and len(whole[1][1]) == 2  # 5 tokens at r = 4: two latents
    for a, b in zip(sum(whole, []), sum(chunked, [])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(whole[1][0], want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(whole[0][1], want, atol=1e-4), "the latents ignored the question they were read after"

    def evaluate(name: str, *more: str) -> dict:
        return run_eval(load_run_config(overrides=[f"model.name_or_path={out / 'best'}", "eval.limit=8",
                                                   f"eval.solutions={sols}", f"eval.output_dir={tmp_path / name}", *more],
                                        saved_base=True))

    sols = tmp_path / "solutions.jsonl"
    rows = method.task.load("valid", limit=5)
    sols.write_text("".join(json.dumps({"id": r.id, "solutions": ["1+1=2 2*2=4", "3*3=9 9-1=8"]}) + "\n" for r in rows))
    asked: list[int] = []
    original = LatentSFT.solution_latents

    def counted(self, examples, solutions):
        asked.append([len(s) for s in solutions])
        for sols in solutions:  # each cut as N_eff scores it: min(#L, ceil(len / r)) near-equal segments
            for segs in sols:
                sizes = [len(s) for s in segs]
                assert max(sizes) - min(sizes) <= 1 and len(segs) <= 6, sizes
        return original(self, examples, solutions)

    monkeypatch.setattr(LatentSFT, "solution_latents", counted)
    by_encoder = evaluate("ev-enc", "eval.n_eff_alignment=encoder")  # the encoder found from train.init_from
    assert asked == [[3] * 5], "one encoder call per batch: each question's gold chain and the two given, once"
    by_position = evaluate("ev-pos")
    assert by_encoder["n_eff_questions"] == by_position["n_eff_questions"] == 5
    assert by_encoder["accuracy"] == by_position["accuracy"] and by_encoder["ecr@1"] == by_position["ecr@1"]
    with pytest.raises(ValueError, match="other settings"):  # rows of one alignment never resume into the other
        evaluate("ev-enc")
    with pytest.raises(CheckpointError, match="stage-1 latent-sft folder"):
        evaluate("ev-bad", "eval.n_eff_alignment=encoder", f"eval.encoder={out / 'best'}")
    # a method without an encoder refuses before generating anything
    cot = build_method(load_run_config(base=tiny_run(tmp_path / "cot", "cot-sft", eval={"n_eff_alignment": "encoder"})))
    from latentreason.eval.harness import accuracy, predict

    with pytest.raises(ValueError, match="no encoder latents"):
        predict(cot, cot.task.load("valid", limit=2), 2)
    accuracy(cot, cot.task.load("valid", limit=2), 2)  # does not raise: selection while training needs no N_eff


def test_warmup_targets_are_what_the_decoder_writes_after_each_latent():
    segments = [[1, 2, 3, 4], [5, 6, 6, 7], [8]]
    assert latent_bags(segments, [20, 21]) == [[5, 6, 6, 7], [8], [20, 21]]
    assert latent_bags(segments, []) == [[5, 6, 6, 7], [8], [8]]  # no answer tokens: the last segment again
    stages = latent_sft_stages(LatentSFTConfig(steps="warmup,decoder,both", steps_per_step=5), 15)
    assert [(s.name, s.frozen, s.restore_best) for s in stages] == [
        ("warmup", ("lm",), False), ("decoder", ("encoder",), True), ("both", (), True)]


def test_warmup_loss_equals_a_hand_computation_and_leaves_the_decoder_alone(tmp_path):
    method = _method(tmp_path, steps="warmup,decoder,both", steps_per_step=1, compression=3, temperature=2.0)
    method.set_stage(0, method.stages()[0])
    examples = method.task.load("train", limit=4)
    batch = method.collate(examples)
    modules = torch.nn.ModuleDict({"lm": method.loaded.model, "encoder": method.encoder})
    out = method.loss(modules, batch)
    out["loss_sum"].backward()
    assert all(p.grad is None for p in method.loaded.model.parameters()), "the warm-up trained the decoder"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.encoder.parameters())
    with torch.no_grad():
        scores, valid = method.encoder_scores(method.encoder, method.loaded.model, batch)
    segments, answers = method._chain_segments(examples), method._answers(examples)
    ces = []
    for r, (segs, answer) in enumerate(zip(segments, answers)):
        for i, bag in enumerate(latent_bags(segs, answer[:-1])):
            logp = (scores[r, i] / 2.0).log_softmax(-1)
            ces.append(-sum(float(logp[t]) for t in bag) / len(bag))
    assert int(valid.sum()) == len(ces) == sum(len(s) for s in segments)
    expected = sum(ces) / len(ces) * batch["num_targets"]
    assert out["loss_sum"].item() == pytest.approx(expected, rel=1e-5)
    method.set_stage(1, method.stages()[1])  # after the warm-up: the paper's decoder loss again
    assert "bag_ce" not in method.loss(modules, batch)


def test_warmup_teaches_the_encoder_to_put_the_next_segment_in_its_latents(tmp_path):
    """The point of the warm-up: after a few dozen steps each latent's α holds the tokens that
    follow it, where the untrained encoder's α holds almost none of them. (τ = 0.05: a freshly
    initialised table has tiny norms, so the logits need the scale a trained model's have.)"""
    method = _method(tmp_path, steps="warmup,decoder,both", steps_per_step=1, compression=2, top_k=0, temperature=0.05)
    method.set_stage(0, method.stages()[0])
    modules = torch.nn.ModuleDict({"lm": method.loaded.model, "encoder": method.encoder})
    held_out = method.collate(method.task.load("valid", limit=32))

    def mass_on_next() -> float:
        with torch.no_grad():
            probs, _, valid = method.encoder_weights(method.encoder, method.loaded.model, held_out)
        on = probs.gather(-1, held_out["bag_ids"]) * (held_out["bag_weights"] > 0)
        first = held_out["bag_ids"].unsqueeze(-1) == held_out["bag_ids"].unsqueeze(-2)  # count a repeated token once
        keep = torch.triu(first.int(), diagonal=1).sum(-2) == 0
        return float(((on * keep).sum(-1) * valid).sum() / valid.sum())

    before = mass_on_next()
    train = method.task.load("train", limit=256)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(method.encoder.parameters(), lr=3e-3)
    for step in range(100):
        batch = method.collate([train[(16 * step + j) % len(train)] for j in range(16)])
        loss = method.loss(modules, batch)["loss_sum"] / batch["num_targets"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = mass_on_next()
    assert before < 0.05 and after > 0.5, (before, after)


def test_hidden_state_ablation_feeds_the_encoders_raw_hidden_state(tmp_path):
    method = _method(tmp_path, latent="hidden")
    batch = method.collate(method.task.load("train", limit=3))
    z, _, _, valid = method.stage1_latents(method.encoder, method.loaded.model, batch)
    h, _ = method.encoder_hidden(method.encoder, batch, torch.float32)
    assert torch.equal(z, h)
    method.cfg.latent = "superposition"
    z, probs, top, _ = method.stage1_latents(method.encoder, method.loaded.model, batch)
    assert torch.allclose(z, method.mix(probs, top, method._table(method.loaded.model)))
    assert not torch.allclose(z[valid], h[valid])
    cfg = tiny_run(tmp_path, "latent-sft")
    cfg["method"].update(stage=2, latent="hidden", soft_labels="x", gumbel=True)
    with pytest.raises(ConfigError, match="method.gumbel=true perturbs superposition soft labels"):
        load_run_config(base=cfg)


def test_hidden_stage_two_loss_equals_a_hand_computation(tmp_path):
    """latent=hidden: the LLM's last hidden state before latent t is regressed on the exported z_t
    (relative squared error, averaged like the KL), plus the same CE on <eot>, answer and eos."""
    method = _method(tmp_path, stage=2, latent="hidden", soft_labels=str(tmp_path / "unused"))
    lm = method.loaded
    d = lm.model.get_input_embeddings().weight.shape[1]
    torch.manual_seed(0)
    vectors = torch.randn(2, 2, d)
    vectors[1, 1] = 0.0
    prompts, targets = [[3, 4, lm.bot_id], [4, lm.bot_id]], [[40, 41, EOS], [42, EOS]]
    batch = {"prompts": prompts, "targets": targets, "probs": vectors, "ids": None, "counts": [2, 1], "ce_tokens": 7}
    out = method.loss(torch.nn.ModuleDict({"lm": lm.model}), batch)
    E = lm.model.get_input_embeddings().weight.detach()
    err_rows, ce = [], 0.0
    for r in range(2):
        n = batch["counts"][r]
        seq = torch.cat([E[prompts[r]], vectors[r, :n], E[[lm.eot_id] + targets[r][:-1]]])
        with torch.no_grad():
            o = lm.model(inputs_embeds=seq[None], output_hidden_states=True)
        h, logp = o.hidden_states[-1][0], o.logits[0].log_softmax(-1)
        p0 = len(prompts[r]) - 1
        errs = [float((h[p0 + t] - vectors[r, t]).pow(2).sum() / vectors[r, t].pow(2).sum()) for t in range(n)]
        err_rows.append(sum(errs) / n)
        after = [lm.eot_id] + targets[r]
        ce -= sum(float(logp[p0 + n + j, after[j]]) for j in range(len(after)))
    expected = (sum(err_rows) / 2) * batch["ce_tokens"] + ce
    assert abs(out["loss_sum"].item() - expected) < 1e-3 * max(1.0, abs(expected))
    assert "latent_err" in out and "kl" not in out


def test_hidden_stage_two_trains_on_what_the_hidden_state_step_feeds(tmp_path):
    """Targets equal to the states the rollout's hidden-state step fed: the regression term is 0,
    so the position a latent is predicted at is the position inference reads it from."""
    from latentreason.models.rollout import RolloutConfig, rollout
    from latentreason.models.steps import HiddenStateStep

    cfg = tiny_run(tmp_path, "latent-sft", rollout={"max_new_tokens": 6})
    cfg["method"].update(stage=2, latent="hidden", compression=4, max_latent_steps=4, soft_labels=str(tmp_path / "x"))
    method = build_method(load_run_config(base=cfg))
    step = method.latent_step([])
    assert isinstance(step, HiddenStateStep) and step.stop_token_id == method.loaded.eot_id
    assert method.superposition_rate() is False and method.rollout_config().distribution_topk == method.run.rollout.distribution_topk
    lm = method.loaded
    examples = method.task.load("valid", limit=5)
    prompts = method.prompt_ids(examples)
    with torch.no_grad():  # a fixed count (no stop), so that every row has latents
        out = rollout(lm.model, prompts, HiddenStateStep(), RolloutConfig(num_latent_steps=3, max_new_tokens=6),
                      eos_ids=lm.eos_ids, pad_id=lm.pad_id, eot_id=lm.eot_id)
    targets = [t + [lm.eos_ids[0]] for t in out.tokens]
    batch = {"prompts": prompts, "targets": targets, "probs": out.latents[:, :3].clone(), "ids": None,
             "counts": [3] * len(prompts), "ce_tokens": sum(len(t) for t in targets) + len(targets)}
    with torch.no_grad():
        loss = method.loss(torch.nn.ModuleDict({"lm": lm.model}), batch)
    assert float(loss["latent_err"]) < 1e-8
    batch["probs"] = torch.roll(batch["probs"], 1, dims=1)  # one position off: far from zero
    with torch.no_grad():
        assert float(method.loss(torch.nn.ModuleDict({"lm": lm.model}), batch)["latent_err"]) > 1e-5  # random weights: thoughts change little


def test_hidden_latents_end_to_end_export_states_train_reload_and_refuse_mixing(stage1, tmp_path):
    import latentreason
    from latentreason.methods.base import CheckpointError
    from latentreason.recipes import run_eval, run_train

    cfg = tiny_run(tmp_path / "s1", "latent-sft", train={"select_on_valid": True, "max_steps": 3, "eval_every": 1,
                                                         "save_every": 1, "eval_limit": 4}, rollout={"max_new_tokens": 8})
    cfg["method"].update(compression=4, steps_per_step=1, max_latent_steps=8, latent="hidden")
    run_train(load_run_config(base=cfg))
    hidden_stage1 = tmp_path / "s1" / "run" / "best"
    cfg = tiny_run(tmp_path, "latent-sft", train={"init_from": str(hidden_stage1), "max_steps": 2, "eval_limit": 4},
                   data={"train_limit": 8}, rollout={"max_new_tokens": 8})
    cfg["method"].update(stage=2, compression=4, max_latent_steps=6, latent="hidden")
    run_train(load_run_config(base=cfg))
    labels = SoftLabels(tmp_path / "run" / "soft_labels")
    assert labels.kind == "vectors" and len(labels.rows) == 8
    # the exported states are the stage-1 encoder's hidden states at the latent slots
    teacher = latentreason.load(hidden_stage1)
    examples = teacher.task.load("train", limit=2)
    batch = teacher.encode_batch(teacher.bot_prompt_ids(examples), teacher._chain_segments(examples))
    with torch.no_grad():
        h, valid = teacher.encoder_hidden(teacher.encoder, batch, torch.float32)
    vec, ids = labels.get(examples[0].id)
    assert ids.shape[1] == 0 and torch.allclose(vec, h[0, :int(valid[0].sum())], atol=1e-5)
    method = latentreason.load(tmp_path / "run" / "best")
    assert method.cfg.latent == "hidden" and len(method.generate(["1+2*3\n"])) == 1
    summary = run_eval(load_run_config(overrides=[f"model.name_or_path={tmp_path / 'run' / 'best'}", "eval.limit=4",
                                                  f"eval.output_dir={tmp_path / 'ev'}"], saved_base=True))
    assert summary["n"] == 4 and not {"ecr@1", "n_eff", "top2"} & set(summary)
    # a superposition stage 1 under a hidden stage 2 (or the reverse) is refused, not silently projected
    cfg["method"]["latent"] = "superposition"
    cfg["train"]["output_dir"] = str(tmp_path / "other")
    with pytest.raises(CheckpointError, match="stage 1 ran with method.latent='hidden'"):
        run_train(load_run_config(base=cfg))
    cfg["method"]["soft_labels"] = str(tmp_path / "run" / "soft_labels")
    cfg["train"]["init_from"] = None
    with pytest.raises(CheckpointError, match="exported vectors, but method.latent='superposition'"):
        run_train(load_run_config(base=cfg))


def test_latent_statistics_flag_a_collapsed_encoder():
    from latentreason.methods.latent_sft import latent_statistics

    valid = torch.ones(2, 3, dtype=torch.bool)
    collapsed = latent_statistics(torch.tensor([[[1.0, 0.0]] * 3] * 2), torch.tensor([[[7, 8]] * 3] * 2), valid)
    assert float(collapsed["latent_top1_weight"]) == 1.0
    assert float(collapsed["latent_distinct_top1"]) == pytest.approx(1 / 6)
    ids = torch.arange(12).reshape(2, 3, 2)
    varied = latent_statistics(torch.tensor([[[0.6, 0.4]] * 3] * 2), ids, valid)
    assert float(varied["latent_top1_weight"]) == pytest.approx(0.6) and float(varied["latent_distinct_top1"]) == 1.0
    valid[1] = False  # rows past a sequence's latents do not count
    assert float(latent_statistics(torch.tensor([[[0.6, 0.4]] * 3] * 2), ids, valid)["latent_distinct_top1"]) == 1.0


@pytest.mark.parametrize("targets", ["all-linear", "q_proj,v_proj,embed_tokens"])
def test_lora_stage_one_saves_a_model_that_computes_what_was_trained(tmp_path, targets):
    """LoRA on the decoder and the encoder (the official recipe adapts the embedding too): the saved
    folder, merged and loaded without peft, gives the trained method's loss on a fixed batch."""
    from latentreason.methods.base import Method
    from latentreason.methods.trainer import Trainer, apply_lora

    cfg = tiny_run(tmp_path, "latent-sft", train={"select_on_valid": True, "max_steps": 3, "save_every": 3, "eval_every": 0},
                   lora={"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": targets},
                   optim={"lr": 3e-2})
    cfg["method"].update(compression=4, steps="both", max_latent_steps=8)
    run = load_run_config(base=cfg)
    method = build_method(run, training=True)
    apply_lora(method, run)
    assert any("lora" in n for n, _ in method.encoder.named_parameters()), "the encoder got no adapters"
    Trainer(run, method, method.task.load("train", limit=32), select=lambda m: 0.0).train()
    batch = method.collate(method.task.load("valid", limit=8))
    saved = Method.from_pretrained(tmp_path / "run" / "final")
    assert not any("lora" in n for n, _ in saved.encoder.named_parameters())
    with torch.no_grad():
        method.loaded.model.eval()
        method.encoder.eval()
        trained = method.loss(torch.nn.ModuleDict({"lm": method.loaded.model, "encoder": method.encoder}), batch)
        again = saved.loss(torch.nn.ModuleDict({"lm": saved.loaded.model, "encoder": saved.encoder}), batch)
    base = build_method(load_run_config(base=tiny_run(tmp_path, "latent-sft", train={"select_on_valid": True})))
    with torch.no_grad():
        untrained = base.loss(torch.nn.ModuleDict({"lm": base.loaded.model, "encoder": base.encoder}), batch)
    assert abs(float(trained["loss_sum"]) - float(untrained["loss_sum"])) > 1e-3, "LoRA trained nothing"
    assert float(again["loss_sum"]) == pytest.approx(float(trained["loss_sum"]), rel=1e-5)


def test_stage_one_gradients_reach_the_encoder_and_equal_finite_differences(tmp_path):
    """The encoder learns only through α (top-k softmax of its hidden state on the LLM's table) and
    the decoder reading z = αᵀE: the analytic gradient of both parts equals a finite difference."""
    # top_k=0 (the full vocabulary): with top-10 the near-flat logits of an untrained model put
    # near-ties at the 10th place, and a finite step may swap which tokens are kept
    method = _method(tmp_path, top_k=0)
    method.loaded.model.double()
    method.encoder.double()
    batch = method.collate(method.task.load("train", limit=4))
    modules = torch.nn.ModuleDict({"lm": method.loaded.model, "encoder": method.encoder})
    method.loss(modules, batch)["loss_sum"].backward()
    for part, name in (("encoder", "body.layers.1.mlp.down_proj.weight"), ("lm", "model.layers.0.self_attn.q_proj.weight")):
        p = dict(modules[part].named_parameters())[name]
        direction = p.grad / p.grad.norm()
        eps = 1e-3  # below ~1e-4 the float64 forward's own rounding dominates the difference (measured)
        with torch.no_grad():
            p.add_(eps * direction)
            up = float(method.loss(modules, batch)["loss_sum"])
            p.sub_(2 * eps * direction)
            down = float(method.loss(modules, batch)["loss_sum"])
            p.add_(eps * direction)
        assert float(p.grad.norm()) > 0, f"no gradient reaches {part}"
        assert (up - down) / (2 * eps) == pytest.approx(float(p.grad.norm()), rel=1e-3), part
