"""The evaluation harness: rows, summary, resume after SIGKILL without redoing or losing work."""
from __future__ import annotations

import json
import logging
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from latentreason.recipes import build_method, run_eval
from latentreason.config import load_run_config
from latentreason.eval.harness import evaluate, predict, row_seeds
from latentreason.eval.metrics import wilson_interval
from latentreason.io import PARTIAL_PREFIX, FolderBusyError, read_jsonl
from latentreason.models.rollout import RolloutConfig
from tests.conftest import cli_args, folder_held_by_another_process, tiny_run
from tests.methods.test_trainer import _env

ROW_FIELDS = {"id", "question", "gold", "prediction", "prediction_flexible", "correct", "correct_flexible",
              "reasoning_positions", "latent_steps", "generated_tokens", "seconds", "output"}


def test_wilson_interval():
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)
    assert wilson_interval(0, 10)[1] == pytest.approx(0.2775, abs=1e-3)
    # the interval holds the proportion exactly (10/10 once rounded to 0.9999999999999999, so a
    # plot's error bar got a negative length and the demo's figure raised)
    for n in range(1, 1001):
        assert wilson_interval(n, n)[1] == 1.0 and wilson_interval(0, n)[0] == 0.0
        lo, hi = wilson_interval(n // 3, n)
        assert lo <= (n // 3) / n <= hi


def _options(**extra) -> dict:
    return {**tiny_run(Path())["data"]["options"], **extra}


def _rows(folder) -> dict[str, dict]:
    return {r["id"]: r for r in read_jsonl(folder / "predictions.jsonl")}


# 3-digit operands take two tokens, shorter ones one: prompts of several lengths, so batches pad
# and sorting by length reorders (arith's single digits give one length: neither ever happens).
MIXED_LENGTHS = {"options": _options(num_steps=3, modulus=1000, max_operand=999)}


def test_predictions_do_not_depend_on_batch_size(tmp_path, trained_arith_model):
    run = load_run_config(base=tiny_run(tmp_path, model={"name_or_path": str(trained_arith_model)}, data=MIXED_LENGTHS))
    method = build_method(run)
    examples = method.task.load("valid", limit=16)
    assert len({len(p) for p in method.prompt_ids(examples)}) > 1, "one prompt length: nothing padded"
    alone = predict(method, examples, batch_size=1)
    assert len({p.output for p in alone}) >= len(examples) // 2, "rows alike: this test could not fail"
    for size in (5, len(examples)):  # uneven batches; one batch padded to the longest prompt
        batched = predict(method, examples, batch_size=size)
        assert [p.output for p in batched] == [p.output for p in alone], f"batch size {size}"
        assert [p.id for p in batched] == [ex.id for ex in examples]


def test_sampled_evaluation_does_not_depend_on_batch_size(tmp_path, trained_arith_model):
    rows = {}
    for size in (4, 16):
        cfg = tiny_run(tmp_path, model={"name_or_path": str(trained_arith_model)},
                       rollout={"temperature": 1.0, "seed": 7},
                       eval={"batch_size": size, "limit": 16, "output_dir": str(tmp_path / f"bs{size}")})
        run_eval(load_run_config(base=cfg))
        rows[size] = {i: r["output"] for i, r in _rows(tmp_path / f"bs{size}").items()}
    assert len(rows[4]) == 16 and rows[4] == rows[16]
    run = load_run_config(base=tiny_run(tmp_path, model={"name_or_path": str(trained_arith_model)}))
    method = build_method(run)
    greedy = {p.id: p.output for p in predict(method, method.task.load("valid", limit=16), batch_size=16)}
    assert greedy != rows[16], "sampling changed no row: this test could not fail"


def test_row_seeds_are_keyed_by_example_and_default_to_seed_0(tmp_path):
    run = load_run_config(base=tiny_run(tmp_path))
    examples = build_method(run).task.load("valid", limit=4)
    assert row_seeds(RolloutConfig(temperature=0.0, seed=3), examples) is None
    seeds = row_seeds(RolloutConfig(temperature=1.0, seed=3), examples)
    assert len(set(seeds)) == 4 and row_seeds(RolloutConfig(temperature=1.0, seed=3), examples[2:])[0] == seeds[2]
    assert row_seeds(RolloutConfig(temperature=1.0), examples) == row_seeds(RolloutConfig(temperature=1.0, seed=0), examples)
    assert row_seeds(RolloutConfig(temperature=1.0, seed=4), examples) != seeds


def test_resume_refuses_rows_of_other_settings_and_continues_the_same_ones(tmp_path, caplog):
    out = tmp_path / "ev"

    def run(**sections):
        ev = {"output_dir": str(out), "limit": 8, **sections.pop("eval", {})}
        return run_eval(load_run_config(base=tiny_run(tmp_path, eval=ev, **sections)))

    run()
    first = (out / "predictions.jsonl").read_text()
    for field, change in [("data.options", {"data": {"options": _options(num_steps=5)}}),
                          ("model.seed", {"model": {"seed": 1}}),
                          ("model.use_chat_template", {"model": {"use_chat_template": False}})]:
        with pytest.raises(ValueError, match="other settings") as err:
            run(**change)
        assert re.findall(r"(?:differs in |; )([\w.]+) \(saved", str(err.value)) == [field]
    assert (out / "predictions.jsonl").read_text() == first
    # Neither the limit, the batch size nor training settings change a row: these continue.
    with caplog.at_level(logging.INFO, logger="latentreason"):
        summary = run(eval={"limit": 16, "batch_size": 3}, train={"max_steps": 99}, optim={"lr": 1.0})
    assert "8 of 16 examples already done" in caplog.text
    text = (out / "predictions.jsonl").read_text()
    assert text.startswith(first) and len(text.splitlines()) == 16 and summary["n"] == 16
    assert "rows_beyond_this_evaluation" not in summary
    shorter = run(eval={"limit": 5})  # the file keeps all 16 rows; the summary says it covers 5
    assert shorter["n"] == 5 and shorter["rows_beyond_this_evaluation"] == 11
    assert (out / "predictions.jsonl").read_text() == text


def test_rows_written_before_a_field_existed_resume_only_at_its_old_behaviour(tmp_path):
    """A field added later (model.tiny_words) is absent from older fingerprints: they resume when
    the field keeps the value that behaves as before, and are refused otherwise."""
    out = tmp_path / "ev"
    cfg = {"eval": {"output_dir": str(out), "limit": 4}}
    run_eval(load_run_config(base=tiny_run(tmp_path, **cfg)))
    meta = out / "eval_config.json"
    saved = json.loads(meta.read_text())
    assert saved.pop("model.tiny_words") == ""
    meta.write_text(json.dumps(saved))  # as an evaluation from before the field was written
    assert run_eval(load_run_config(base=tiny_run(tmp_path, **cfg)))["n"] == 4
    with pytest.raises(ValueError, match=r"differs in model.tiny_words \(saved \"\", now \"a,b\"\)"):
        run_eval(load_run_config(base=tiny_run(tmp_path, model={"tiny_words": "a,b"}, **cfg)))


def test_resume_refuses_rows_of_a_model_retrained_into_the_same_folder(tmp_path):
    from latentreason.recipes import run_train

    train = {"max_steps": 2, "save_every": 2, "select_on_valid": False}
    cfg = tiny_run(tmp_path, train=train)
    run_train(load_run_config(base=cfg))
    final = str(tmp_path / "run" / "final")
    evaluation = {"model": {"name_or_path": final}, "eval": {"output_dir": str(tmp_path / "ev"), "limit": 4}}
    run_eval(load_run_config(base=tiny_run(tmp_path, **evaluation)))
    run_train(load_run_config(base=tiny_run(tmp_path, train={**train, "resume": False})))  # same path, new weights
    with pytest.raises(ValueError, match=r"differs in model.weight_files"):
        run_eval(load_run_config(base=tiny_run(tmp_path, **evaluation)))


def test_rows_and_summary(tmp_path, trained_arith_model):
    run = load_run_config(base=tiny_run(tmp_path, model={"name_or_path": str(trained_arith_model)}))
    method = build_method(run)
    examples = method.task.load("valid", limit=16)
    summary = evaluate(method, examples, tmp_path / "ev", batch_size=4, info={"model": "m", "task": "arith", "method": "cot-sft", "split": "valid"}, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "ev" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and ROW_FIELDS <= set(rows[0])
    correct = sum(r["correct"] for r in rows)
    assert 0 < correct < 16, "all right or all wrong: the counts below could not fail"
    assert summary["n"] == 16 and summary["accuracy"] == correct / 16
    assert summary["accuracy_ci95"] == pytest.approx(list(wilson_interval(correct, 16)))
    for r in rows:  # the chain is part of what was generated
        assert r["reasoning_positions"] <= r["generated_tokens"] + r["latent_steps"]
    # the phases split each batch's wall-clock (4 rows per batch share it); a CoT model has no references
    phases = summary["seconds_by_phase"]
    assert set(phases) == {"prefill", "latent", "decode"}
    assert phases["decode"] > phases["latent"]  # no latent step ran: the decode loop is the work
    batches: dict[float, list[dict]] = {}
    for r in rows:
        batches.setdefault(r["seconds"], []).append(r)
    assert sorted(len(b) for b in batches.values()) == [4, 4, 4, 4]
    for seconds, batch in batches.items():
        assert len({json.dumps(r["phase_seconds"]) for r in batch}) == 1
        assert sum(batch[0]["phase_seconds"].values()) <= seconds
    assert sum(phases.values()) == pytest.approx(sum(sum(r["phase_seconds"].values()) for r in rows), abs=1e-3)
    # each batch's decode loop computed at least each row's answer and eos, at most the longest one's
    # for every row; no latent loop ran
    for batch in batches.values():
        assert len({json.dumps(r["row_steps"]) for r in batch}) == 1
        ends = [r["generated_tokens"] + int(r["finished"]) for r in batch]
        assert batch[0]["row_steps"]["latent"] == 0
        assert sum(ends) / len(batch) <= batch[0]["row_steps"]["decode"] <= max(ends)
    used = sum(r["generated_tokens"] + int(r["finished"]) for r in rows)
    assert summary["batch_step_use"] == {"decode": round(used / sum(r["row_steps"]["decode"] for r in rows), 4)}
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


def test_an_evaluation_in_progress_has_no_summary(tmp_path, trained_arith_model, monkeypatch):
    from latentreason.eval import harness
    from latentreason.recipes import run_eval

    out = tmp_path / "ev"
    run = load_run_config(base=tiny_run(tmp_path, model={"name_or_path": str(trained_arith_model)},
                                        eval={"batch_size": 4, "limit": 8, "output_dir": str(out)}))
    assert run_eval(run)["n"] == 8 and (out / "summary.json").exists()
    whole = harness.predict

    def killed(method, examples, batch_size, on_batch=None, **kw):
        whole(method, examples[:4], batch_size, on_batch=on_batch, **kw)
        raise KeyboardInterrupt  # killed after its first batch

    monkeypatch.setattr(harness, "predict", killed)
    for change in ({"overwrite": True}, {"overwrite": False, "limit": 16}):  # redone from scratch; extended
        for key, value in change.items():
            setattr(run.eval, key, value)
        with pytest.raises(KeyboardInterrupt):
            run_eval(run)
        assert not (out / "summary.json").exists(), f"{change}: the old summary stayed beside unfinished rows"
    monkeypatch.setattr(harness, "predict", whole)
    assert run_eval(run)["n"] == 16


def test_a_second_evaluation_into_a_folder_being_written_is_refused(tmp_path, trained_arith_model):
    """Two evaluations appending to one predictions.jsonl (a merge rewriting it under the other's
    appends) would lose or mix rows: the second is refused while the first runs, whole, after it;
    what a killed write left (a temporary file of the merge) goes when the next one starts."""
    out = tmp_path / "ev"
    run = load_run_config(base=tiny_run(tmp_path, model={"name_or_path": str(trained_arith_model)},
                                        eval={"batch_size": 4, "limit": 8, "output_dir": str(out)}))
    with folder_held_by_another_process(out) as holder:
        with pytest.raises(FolderBusyError, match=rf"pid {holder.pid} .*set another eval.output_dir"):
            run_eval(run)
        assert not (out / "predictions.jsonl").exists()
    (out / f"{PARTIAL_PREFIX}predictions.jsonl-x1y2").write_text('{"id": "half')
    assert run_eval(run)["n"] == 8
    assert not list(out.glob(f"{PARTIAL_PREFIX}*"))


def test_eval_killed_and_restarted_loses_and_redoes_nothing(tmp_path, trained_arith_model):
    model = {"name_or_path": str(trained_arith_model)}
    cfg = tiny_run(tmp_path, model=model, data=MIXED_LENGTHS,
                   eval={"batch_size": 2, "limit": 64, "output_dir": str(tmp_path / "ev")}, rollout={"max_new_tokens": 48})
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
    assert len({r["output"] for r in after}) > 8, "rows alike: this test could not fail"
    by_id = {r["id"]: r for r in after}
    assert all(by_id[r["id"]] == r for r in before), "finished rows were redone or changed"
    assert f"{len(before)} of 64 examples already done" in done.stderr
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["n"] == 64
    # The same evaluation uninterrupted gives the same predictions.
    ref = tiny_run(tmp_path, model=model, data=MIXED_LENGTHS,
                   eval={"batch_size": 2, "limit": 64, "output_dir": str(tmp_path / "ref")}, rollout={"max_new_tokens": 48})
    subprocess.run([sys.executable, "-m", "latentreason.cli", "eval", *cli_args(ref)], env=_env(), check=True, capture_output=True)
    ref_rows = [json.loads(x) for x in (tmp_path / "ref" / "predictions.jsonl").read_text().splitlines()]
    assert [(r["id"], r["output"]) for r in after] == [(r["id"], r["output"]) for r in ref_rows]
    # Both files are in question order, not in the length-sorted order the batches ran in.
    from latentreason.data.base import build_task

    task = build_task("arith", **MIXED_LENGTHS["options"])
    assert [r["id"] for r in after] == [ex.id for ex in task.load("valid", limit=64)]


def test_rows_left_by_killed_processes_are_merged_in_question_order_and_not_redone(tmp_path, trained_arith_model):
    """A multi-process run killed mid-way leaves predictions.rank<i>.jsonl files (torn tails too)."""
    cfg = tiny_run(tmp_path, model={"name_or_path": str(trained_arith_model)}, data=MIXED_LENGTHS,
                   eval={"batch_size": 4, "limit": 12, "output_dir": str(tmp_path / "ev")})
    ref = run_eval(load_run_config(base={**cfg, "eval": {**cfg["eval"], "output_dir": str(tmp_path / "ref")}}))
    ref_rows = [json.loads(x) for x in (tmp_path / "ref" / "predictions.jsonl").read_text().splitlines()]
    ev = tmp_path / "ev"
    ev.mkdir()
    (ev / "eval_config.json").write_text((tmp_path / "ref" / "eval_config.json").read_text())
    planted = {r["id"]: {**r, "seconds": -1.0} for r in ref_rows[1::3]}  # marked: must survive unchanged
    rank0 = [planted[r["id"]] for r in ref_rows[1::6]]
    rank1 = [planted[r["id"]] for r in ref_rows[4::6]]
    (ev / "predictions.rank0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rank0))
    (ev / "predictions.rank1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rank1) + '{"id": "torn')
    summary = run_eval(load_run_config(base=cfg))
    rows = [json.loads(x) for x in (ev / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [r["id"] for r in ref_rows], "not in question order"
    assert [r["id"] for r in rows if r["seconds"] == -1.0] == list(planted), "planted rows redone or lost"
    assert [r["output"] for r in rows] == [r["output"] for r in ref_rows]
    assert not list(ev.glob("predictions.rank*.jsonl"))
    assert summary["n"] == ref["n"] == 12 and summary["accuracy"] == ref["accuracy"]


def test_accelerate_launch_splits_the_questions_and_writes_one_file_in_order(tmp_path, trained_arith_model):
    """`accelerate launch --num_processes 2 -m latentreason.cli eval`: the rows of one process."""
    from tests.conftest import ROOT

    model = {"name_or_path": str(trained_arith_model)}
    one = tiny_run(tmp_path, model=model, data=MIXED_LENGTHS,
                   eval={"batch_size": 4, "limit": 24, "output_dir": str(tmp_path / "one")})
    run_eval(load_run_config(base=one))
    # Resume across process counts: one process did the first 10, two processes finish 24.
    two = tiny_run(tmp_path, model=model, data=MIXED_LENGTHS,
                   eval={"batch_size": 4, "limit": 24, "output_dir": str(tmp_path / "two")})
    run_eval(load_run_config(base={**two, "eval": {**two["eval"], "limit": 10}}))
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(ROOT / "configs" / "accelerate" / "ddp.yaml"), "--num_processes", "2",
              "-m", "latentreason.cli", "eval", *cli_args(two)]
    proc = subprocess.run(launch, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "10 of 24 examples already done" in proc.stderr
    a = [json.loads(x) for x in (tmp_path / "one" / "predictions.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "two" / "predictions.jsonl").read_text().splitlines()]
    assert [(r["id"], r["output"]) for r in b] == [(r["id"], r["output"]) for r in a]
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["n"] == 24 and summary["processes"] == 2
