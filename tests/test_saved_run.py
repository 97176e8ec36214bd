"""A saved run is the method: ``latentreason.load(folder).generate`` and ``latentreason eval`` on a
folder, with no method or task restated."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import latentreason
from latentreason.cli import main
from latentreason.config import load_run_config
from latentreason.data.base import build_task
from latentreason.recipes import build_method
from tests.conftest import tiny_run


def test_load_generate_gives_the_eval_predictions(tmp_path, trained_arith_model, capsys):
    out = tmp_path / "eval"
    # Operands of 1 to 3 digits: prompts of several lengths, so batches are sorted and padded.
    mixed = ["data.options.modulus=1000", "data.options.max_operand=999"]
    assert main(["eval", f"model.name_or_path={trained_arith_model}", *mixed, f"eval.output_dir={out}",
                 "eval.limit=8"]) == 0
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and len({r["output"] for r in rows}) > 1, "every row alike: the comparison would be vacuous"
    assert len({len(r["question"]) for r in rows}) > 1, "one prompt length: the order would not be tested"
    method = latentreason.load(trained_arith_model)
    texts = method.generate([r["question"] for r in rows], batch_size=3)
    assert texts == [r["output"] for r in rows]


def test_eval_of_a_saved_folder_uses_its_settings_and_overrides_win(tmp_path, caplog):
    # A folder saved with settings unlike the defaults (method, task options, rollout); untrained is enough.
    saved = tiny_run(tmp_path, "nocot-sft", data={"options": {"num_steps": 3, "valid_size": 16}},
                     rollout={"max_new_tokens": 8})
    folder = tmp_path / "saved"
    build_method(load_run_config(base=saved)).save_pretrained(folder)
    out = tmp_path / "eval"
    with caplog.at_level(logging.INFO, logger="latentreason"):
        assert main(["eval", f"model.name_or_path={folder}", "rollout.max_new_tokens=5",
                     f"eval.output_dir={out}", "eval.limit=4"]) == 0
    assert any("settings saved in" in r.getMessage() for r in caplog.records)
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["method"], summary["task"], summary["model"]) == ("nocot-sft", "arith", str(folder))
    assert summary["method_config"]["with_chain"] is False
    assert summary["rollout"]["max_new_tokens"] == 5, "the user's override must win over the saved rollout"
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    expected = build_task("arith", num_steps=3, valid_size=16).load("valid", limit=4)
    assert [r["question"] for r in rows] == [ex.question for ex in expected], "the saved data options were not used"
    assert all(r["generated_tokens"] <= 5 for r in rows)


def test_eval_of_saved_folders_without_an_output_dir_writes_beside_each(tmp_path, monkeypatch):
    """Both went to one runs/default/eval-<split>, where the second model was refused."""
    monkeypatch.chdir(tmp_path)
    method = build_method(load_run_config(base=tiny_run(tmp_path, rollout={"max_new_tokens": 4})))
    for name in ("best", "final"):
        method.save_pretrained(tmp_path / "run" / name)
        assert main(["eval", f"model.name_or_path=run/{name}", "eval.limit=2"]) == 0
    assert (tmp_path / "run" / "eval-valid" / "summary.json").exists()
    assert (tmp_path / "run" / "eval-valid-final" / "summary.json").exists()
    assert not (tmp_path / "runs").exists()
    # a refinement sweep's folder too (it went to runs/default/refine for every model)
    from latentreason.recipes import default_eval_dir

    for name, kind in (("best", "refine"), ("final", "refine-final")):
        run = load_run_config(overrides=[f"model.name_or_path=run/{name}"], saved_base=True)
        assert Path(default_eval_dir(run, "refine")) == (tmp_path / "run" / kind).resolve()


def test_naming_another_method_or_task_drops_the_saved_section(tmp_path):
    saved = tiny_run(tmp_path, "nocot-sft", data={"options": {"num_steps": 3}})
    folder = tmp_path / "saved"
    build_method(load_run_config(base=saved)).save_pretrained(folder)
    run = load_run_config(overrides=[f"model.name_or_path={folder}", "method.name=zero-shot"], saved_base=True)
    assert run.method.name == "zero-shot" and run.data.options["num_steps"] == 3
    # another task: the saved task's options (arith's num_steps) would be refused as unknown there
    other = load_run_config(overrides=[f"model.name_or_path={folder}", "data.task=gsm8k"], saved_base=True)
    assert other.data.task == "gsm8k" and "num_steps" not in other.data.options
    plain = load_run_config(overrides=[f"model.name_or_path={folder}"])
    assert plain.method.name == "cot-sft", "without saved_base the saved settings must not apply"


def test_an_empty_split_is_an_error_not_accuracy_zero(tmp_path):
    """gsm8k's valid split keeps only the GSM8K-Aug valid questions of the file given: another file
    gave n = 0 and a summary of accuracy 0.0, silently."""
    import pytest

    from latentreason.recipes import run_eval

    rows = tmp_path / "other.jsonl"
    rows.write_text(json.dumps({"question": "What is 1 + 1?", "answer": "1 + 1 = 2\n#### 2"}) + "\n")
    cfg = tiny_run(tmp_path, eval={"output_dir": str(tmp_path / "ev")})
    cfg["data"] = {"task": "gsm8k", "path": str(rows)}
    run = load_run_config(base=cfg)
    with pytest.raises(ValueError, match=r"eval.split=valid of task gsm8k holds no examples \(data.path="):
        run_eval(run)
