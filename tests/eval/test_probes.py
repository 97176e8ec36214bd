"""eval.probe: the causal probes wired into the harness, its fingerprint and its summary."""
from __future__ import annotations

import json
import zlib

import pytest
import torch

from latentreason.config import ConfigError, load_run_config, to_dict
from latentreason.eval.harness import eval_fingerprint, predict
from latentreason.models.steps import ExternalStep
from latentreason.recipes import build_method, run_eval
from tests.conftest import tiny_run

STEPS = 3


def _external_method(tmp_path, model):
    """A trained tiny model whose latents matter: each question is fed its own large vectors (ExternalStep)."""
    run = load_run_config(base=tiny_run(tmp_path, model={"name_or_path": str(model)},
                                        rollout={"num_latent_steps": STEPS, "max_new_tokens": 12}))
    method = build_method(run)
    dim = method.loaded.model.get_input_embeddings().weight.shape[1]

    def latent_step(examples):
        vectors = [torch.randn(STEPS, dim, generator=torch.Generator().manual_seed(zlib.crc32(ex.id.encode()))) * 4
                   for ex in examples]
        return ExternalStep(torch.stack(vectors))

    method.latent_step = latent_step
    return method


def test_probes_change_predictions_and_none_changes_nothing(tmp_path, trained_arith_model):
    method = _external_method(tmp_path, trained_arith_model)
    examples = method.task.load("valid", limit=8)
    real = [p.output for p in predict(method, examples, batch_size=4)]
    assert len(set(real)) > 1, "rows alike: the comparisons below could not fail"
    assert [p.output for p in predict(method, examples, batch_size=4, probe="none")] == real
    for probe in ("zero", "noise", "shuffle"):
        probed = predict(method, examples, batch_size=4, probe=probe)
        changed = sum(a != b.output for a, b in zip(real, probed))
        assert changed >= 2, f"probe={probe} changed {changed} of 8 rows"
        assert all(p.latent_steps == STEPS for p in probed), "stops must follow the real step"
    noise = [p.output for p in predict(method, examples, batch_size=4, probe="noise")]
    assert [p.output for p in predict(method, examples, batch_size=8, probe="noise")] == noise, "noise not per row"
    assert [p.output for p in predict(method, examples, batch_size=4, probe="noise", probe_seed=1)] != noise


def test_shuffle_never_leaves_a_question_alone_in_its_batch(tmp_path, trained_arith_model):
    method = _external_method(tmp_path, trained_arith_model)
    examples = method.task.load("valid", limit=5)
    preds = predict(method, examples, batch_size=2, probe="shuffle")  # 2 + 3, not 2 + 2 + 1
    assert [p.id for p in preds] == [ex.id for ex in examples]
    with pytest.raises(ValueError, match="eval.probe=shuffle: a batch of 1 question"):
        predict(method, examples[:1], batch_size=2, probe="shuffle")


def test_a_probe_without_latents_is_refused(tmp_path):
    method = build_method(load_run_config(base=tiny_run(tmp_path)))
    with pytest.raises(ValueError, match="eval.probe=zero: method 'cot-sft' runs no latent step"):
        predict(method, method.task.load("valid", limit=2), batch_size=2, probe="zero")
    with pytest.raises(ConfigError, match="eval.probe='noize', must be none, zero, noise or shuffle"):
        load_run_config(base=tiny_run(tmp_path, eval={"probe": "noize"}))
    with pytest.raises(ConfigError, match="eval.probe=shuffle .* eval.batch_size=1 leaves none"):
        load_run_config(base=tiny_run(tmp_path, eval={"probe": "shuffle", "batch_size": 1}))


def test_probe_is_in_the_fingerprint_and_the_summary(tmp_path):
    def fingerprint(**ev):
        return eval_fingerprint(to_dict(load_run_config(base=tiny_run(tmp_path, eval=ev))))

    assert fingerprint()["eval.probe"] == "none" and "eval.batch_size" not in fingerprint()
    assert fingerprint(probe="zero")["eval.probe"] == "zero"
    assert fingerprint(probe="shuffle", batch_size=4)["eval.batch_size"] == 4  # rows depend on batching
    assert "eval.probe_seed" in fingerprint(probe="noise") and "eval.probe_seed" not in fingerprint(probe="zero")

    out = tmp_path / "ev"
    cfg = tiny_run(tmp_path, "soft-thinking", eval={"limit": 4, "output_dir": str(out), "probe": "noise"},
                   rollout={"max_new_tokens": 4})
    cfg["method"]["num_latent_steps"] = 2
    summary = run_eval(load_run_config(base=cfg))
    assert summary["probe"] == "noise" == json.loads((out / "summary.json").read_text())["probe"]
    cfg["eval"]["probe"] = "zero"
    with pytest.raises(ValueError, match=r"differs in eval.probe \(saved \"noise\", now \"zero\"\)"):
        run_eval(load_run_config(base=cfg))
