"""The evaluation harness: rows, summary, resume after SIGKILL without redoing or losing work."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from latentreason.recipes import build_method
from latentreason.config import load_run_config
from latentreason.eval.harness import evaluate, predict
from latentreason.eval.metrics import wilson_interval
from tests.conftest import cli_args, tiny_run
from tests.methods.test_trainer import _env

ROW_FIELDS = {"id", "question", "gold", "prediction", "prediction_flexible", "correct", "correct_flexible",
              "reasoning_positions", "latent_steps", "generated_tokens", "seconds", "output"}


def test_wilson_interval():
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)
    assert wilson_interval(0, 10)[1] == pytest.approx(0.2775, abs=1e-3)


def test_predictions_do_not_depend_on_batch_size(tmp_path):
    run = load_run_config(base=tiny_run(tmp_path))
    method = build_method(run)
    examples = method.task.load("valid", limit=12)
    one = predict(method, examples, batch_size=1)
    many = predict(method, examples, batch_size=5)
    assert [p.output for p in one] == [p.output for p in many]
    assert [p.id for p in many] == [ex.id for ex in examples]


def test_rows_and_summary(tmp_path):
    run = load_run_config(base=tiny_run(tmp_path))
    method = build_method(run)
    examples = method.task.load("valid", limit=10)
    summary = evaluate(method, examples, tmp_path / "ev", batch_size=4, info={"model": "m", "task": "arith", "method": "cot-sft", "split": "valid"}, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "ev" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and ROW_FIELDS <= set(rows[0])
    assert summary["n"] == 10 and summary["accuracy"] == sum(r["correct"] for r in rows) / 10
    lo, hi = summary["accuracy_ci95"]
    assert lo <= summary["accuracy"] <= hi
    for r in rows:  # an untrained model writes no answer line: chain tokens = everything generated
        assert r["reasoning_positions"] <= r["generated_tokens"] + r["latent_steps"]
    with pytest.raises(ValueError, match="other settings"):
        evaluate(method, examples, tmp_path / "ev", batch_size=4, info={"model": "other"}, progress=False)


def test_scoring_of_a_perfect_output(tmp_path):
    """A model output equal to the gold chain and answer scores strict and flexible."""
    run = load_run_config(base=tiny_run(tmp_path))
    method = build_method(run)
    ex = method.task.load("valid", limit=1)[0]
    text = method.task.chain_text(ex) + " " + method.task.answer_text(ex)
    score = method.task.score(text, ex)
    assert score.correct and score.correct_flexible


def test_eval_killed_and_restarted_loses_and_redoes_nothing(tmp_path):
    cfg = tiny_run(tmp_path, eval={"batch_size": 2, "limit": 64, "output_dir": str(tmp_path / "ev")},
                   rollout={"max_new_tokens": 48})
    cmd = [sys.executable, "-m", "latentreason.cli", "eval", *cli_args(cfg)]
    rows_path = tmp_path / "ev" / "predictions.jsonl"
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if rows_path.exists() and rows_path.read_text().count("\n") >= 6:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "evaluation finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = [json.loads(line) for line in rows_path.read_text().splitlines() if line.strip().endswith("}")]
    assert 6 <= len(before) < 64
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    after = [json.loads(line) for line in rows_path.read_text().splitlines()]
    assert len(after) == 64 and len({r["id"] for r in after}) == 64, "rows lost or duplicated"
    assert after[: len(before)] == before, "finished rows were redone or changed"
    assert f"{len(before)} of 64 examples already done" in done.stderr
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["n"] == 64
    # The same evaluation uninterrupted gives the same predictions.
    ref = tiny_run(tmp_path, eval={"batch_size": 2, "limit": 64, "output_dir": str(tmp_path / "ref")},
                   rollout={"max_new_tokens": 48})
    subprocess.run([sys.executable, "-m", "latentreason.cli", "eval", *cli_args(ref)], env=_env(), check=True, capture_output=True)
    ref_rows = {r["id"]: r["output"] for r in map(json.loads, (tmp_path / "ref" / "predictions.jsonl").read_text().splitlines())}
    assert {r["id"]: r["output"] for r in after} == ref_rows
