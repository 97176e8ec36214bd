"""Soft Thinking as a method: its config checks, prompt, rollout settings, and an evaluation end to end."""
from __future__ import annotations

import json

import pytest

from latentreason.cli import main
from latentreason.config import ConfigError, load_run_config
from latentreason.models.steps import SoftThinkingStep
from latentreason.recipes import build_method
from tests.conftest import cli_args, tiny_run


def _config(tmp_path, method: dict | None = None, **sections) -> dict:
    base = tiny_run(tmp_path, "soft-thinking", **sections)
    base["method"].update(method or {})  # tiny_run's ``method`` argument is the name
    return base


def _run(tmp_path, method: dict | None = None, **sections):
    return load_run_config(base=_config(tmp_path, method, **sections))


@pytest.mark.parametrize("method, sections, message", [
    ({"temperature": 0}, {}, r"method.temperature=0.0, must be > 0 \(T=0 is plain greedy decoding"),
    ({"max_topk": 0}, {}, "method.max_topk=0, must be >= 1"),
    ({"cold_stop_steps": 0}, {}, "method.cold_stop_steps=0, must be >= 1"),
    ({"num_latent_steps": 8}, {"rollout": {"num_latent_steps": 5}},
     "rollout.num_latent_steps=5 but method.num_latent_steps=8"),
    ({"append_bot": True}, {"model": {"add_latent_tokens": False}},
     "method.append_bot=true needs <bot>, but model.add_latent_tokens=false"),
])
def test_config_errors_name_the_field(tmp_path, method, sections, message):
    with pytest.raises(ConfigError, match=message):
        _run(tmp_path, method, **sections)


def test_prompt_rollout_and_step_follow_the_config(tmp_path):
    plain = build_method(_run(tmp_path, {"num_latent_steps": 7, "cold_stop_steps": 3}))
    examples = plain.task.load("valid", limit=2)
    cot = build_method(load_run_config(base=tiny_run(tmp_path, "cot-sft")))
    # A CoT-SFT model starts its chain right after the prompt it was trained on: no <bot> by default.
    assert plain.prompt_ids(examples) == cot.prompt_ids(examples)
    cfg = plain.rollout_config()
    assert cfg.num_latent_steps == 7 and not cfg.feed_eot
    step = plain.latent_step(examples)
    assert isinstance(step, SoftThinkingStep) and step.cold_stop_steps == 3 and step.max_topk == 10
    # <eot>, then the answer delimiter's first token (a character here): the CoT model's </think>.
    tok = plain.loaded.tokenizer
    assert step.stop_token_id == [plain.loaded.eot_id, tok.convert_tokens_to_ids("#")]
    assert build_method(_run(tmp_path, {"stop_at_answer": False})).latent_step(examples).stop_token_id == [plain.loaded.eot_id]
    bot = build_method(_run(tmp_path, {"append_bot": True}))
    assert bot.prompt_ids(examples) == [p + [bot.loaded.bot_id] for p in cot.prompt_ids(examples)]
    assert bot.rollout_config().feed_eot


def test_eval_through_the_cli_reports_latent_steps(tmp_path, capsys):
    def evaluate(name: str, **method) -> tuple[dict, list[dict]]:
        cfg = _config(tmp_path, {"num_latent_steps": 4, **method}, rollout={"max_new_tokens": 8},
                      eval={"limit": 6, "batch_size": 4, "output_dir": str(tmp_path / name)})
        assert main(["eval", *cli_args(cfg)]) == 0
        printed = json.loads(capsys.readouterr().out)
        rows = [json.loads(x) for x in (tmp_path / name / "predictions.jsonl").read_text().splitlines()]
        assert printed["method"] == "soft-thinking" and printed["n"] == len(rows) == 6
        assert printed["mean_latent_steps"] == sum(r["latent_steps"] for r in rows) / 6
        assert all(r["reasoning_positions"] >= r["latent_steps"] for r in rows)
        return printed, rows

    # An untrained model is far from confident: every row reasons up to the bound.
    summary, rows = evaluate("bound")
    assert [r["latent_steps"] for r in rows] == [4] * 6 and summary["probe"] == "none"
    # Every step "confident" (tau above any entropy): each row stops at its second step, one fed.
    summary, rows = evaluate("cold", entropy_threshold=1e6, cold_stop_steps=2)
    assert [r["latent_steps"] for r in rows] == [1] * 6 and summary["mean_latent_steps"] == 1.0


def test_reasoning_stops_at_the_answer_delimiter_so_the_answer_is_written(tmp_path, trained_arith_model, capsys):
    """A CoT model that writes "chain #### answer": without the delimiter stop, its (confident) mixtures
    run on through the answer line, which is then never written; with it, thinking hands over at "####"."""
    def evaluate(stop: bool) -> list[dict]:
        out = tmp_path / f"stop-{stop}"
        args = [f"model.name_or_path={trained_arith_model}", "method.name=soft-thinking", "method.num_latent_steps=30",
                "method.entropy_threshold=0", f"method.stop_at_answer={str(stop).lower()}", "rollout.max_new_tokens=12",
                "eval.split=test", "eval.limit=16", f"eval.output_dir={out}"]
        assert main(["eval", *args]) == 0
        capsys.readouterr()
        return [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]

    stopped, unstopped = evaluate(True), evaluate(False)
    assert all(r["output"].startswith("####") and r["prediction"] is not None for r in stopped)
    assert all(r["latent_steps"] < 30 for r in stopped)
    assert all(r["latent_steps"] == 30 for r in unstopped)  # cold stop off: nothing else ends reasoning
    assert sum(r["prediction"] is not None for r in unstopped) < len(unstopped) // 2
    assert sum(r["correct"] for r in stopped) > sum(r["correct"] for r in unstopped)
