"""latentreason compare: tables and the figure from finished evaluation folders (written by hand here)."""
from __future__ import annotations

import json

import pytest

from latentreason.cli import main
from latentreason.eval.report import compare


def _fake_eval(folder, method: str, correct: int, n: int, positions: float, qps: float, task: str = "arith",
               split: str = "valid", probe: str | None = None, phases: dict | None = None,
               settings: dict | None = None, question: str = "q") -> str:
    """A folder as ``latentreason eval`` leaves it, with known numbers."""
    from latentreason.eval.metrics import wilson_interval

    folder.mkdir(parents=True)
    rows = [{"id": str(i), "question": f"{question}{i}", "correct": i < correct, "reasoning_positions": positions,
             "latent_steps": 0} for i in range(n)]
    (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"model": f"runs/{method}/best", "task": task, "task_version": 1, "method": method, "split": split,
               "n": n, "accuracy": correct / n, "accuracy_ci95": list(wilson_interval(correct, n)),
               "accuracy_flexible": correct / n, "mean_reasoning_positions": positions, "mean_latent_steps": 0.0,
               "questions_per_second": qps}
    if probe is not None:
        summary["probe"] = probe
    if phases is not None:
        summary["seconds_by_phase"] = phases
    (folder / "summary.json").write_text(json.dumps(summary))
    if settings is not None:  # the evaluation's fingerprint, as eval writes it
        (folder / "eval_config.json").write_text(json.dumps(settings))
    return str(folder)


def test_compare_writes_the_expected_rows_table_and_figure(tmp_path, capsys):
    a = _fake_eval(tmp_path / "a", "cot-sft", correct=30, n=40, positions=12.5, qps=4.0)
    b = _fake_eval(tmp_path / "b", "soft-thinking", correct=10, n=40, positions=8.0, qps=2.0, probe="zero")
    out = tmp_path / "cmp"
    assert main(["compare", a, f"{b}=soft (zero)", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    table = (out / "compare.md").read_text()
    assert table.strip() in printed
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert lines[0] == "| label | method | model | accuracy | 95% CI | n | reasoning positions | s / question | probe |"
    assert lines[1] == ("| cot-sft | cot-sft | runs/cot-sft/best | 0.750 | [0.598, 0.858] | 40 | 12.5 | 0.2500 | none |")
    assert lines[2] == ("| soft (zero) | soft-thinking | runs/soft-thinking/best | 0.250 | [0.142, 0.402] | 40 | 8.0 "
                        "| 0.5000 | zero |")
    data = json.loads((out / "compare.json").read_text())
    assert data["task"] == "arith" and data["split"] == "valid"
    assert [(r["label"], r["seconds_per_question"], r["n"]) for r in data["rows"]] == [
        ("cot-sft", 0.25, 40), ("soft (zero)", 0.5, 40)]
    png = out / "compare.png"
    assert png.read_bytes()[:4] == b"\x89PNG"
    # No probe anywhere: no probe column; default labels are method names.
    result = compare([a], tmp_path / "one")
    assert "probe" not in result.markdown and result.rows[0]["label"] == "cot-sft"
    assert "prefill share" not in result.markdown  # no row was split by phase


def test_compare_shows_the_prefill_share_where_an_evaluation_split_its_time(tmp_path):
    """The prompts' prefill (the references' too) over the rollout's time: what fewer positions cannot save."""
    a = _fake_eval(tmp_path / "a", "cot-sft", 30, 40, 12.5, 4.0, phases={"prefill": 3.0, "latent": 0.0, "decode": 9.0})
    b = _fake_eval(tmp_path / "b", "coconut", 30, 40, 6.0, 4.0,
                   phases={"prefill": 3.0, "reference_prefill": 5.0, "latent": 1.0, "decode": 1.0})
    c = _fake_eval(tmp_path / "c", "pause", 30, 40, 6.0, 4.0)  # written before the split existed
    result = compare([a, b, c], tmp_path / "cmp")
    lines = [line for line in result.markdown.splitlines() if line.startswith("| ")]
    assert lines[0].endswith("| s / question | prefill share |")
    assert [line.rsplit("|", 2)[1].strip() for line in lines[1:]] == ["25%", "80%", "-"]
    assert [r["prefill_share"] for r in result.rows] == [0.25, 0.8, None]


@pytest.mark.parametrize("change", [{"task": "gsm8k"}, {"split": "test"}])
def test_compare_refuses_mixed_tasks_or_splits_naming_the_folders(tmp_path, capsys, change):
    a = _fake_eval(tmp_path / "a", "cot-sft", 30, 40, 12.5, 4.0)
    b = _fake_eval(tmp_path / "b", "nocot-sft", 20, 40, 0.0, 8.0, **change)
    with pytest.raises(ValueError, match="different tasks or splits") as err:
        compare([a, b], tmp_path / "cmp")
    assert a in str(err.value) and b in str(err.value)
    assert not (tmp_path / "cmp" / "compare.md").exists()
    assert main(["compare", a, b, "--out", str(tmp_path / "cmp")]) == 2
    assert "different tasks or splits" in capsys.readouterr().err


def test_compare_refuses_other_questions_of_one_task_and_labels_refinement(tmp_path):
    same = {"data.path": None, "data.options": {"num_steps": 6}}
    a = _fake_eval(tmp_path / "a", "coconut", 30, 40, 10, 4.0, settings=same)
    b = _fake_eval(tmp_path / "b", "coconut", 20, 40, 10, 4.0, settings={**same, "data.options": {"seed": 7}},
                   question="other ")
    with pytest.raises(ValueError, match="different questions") as err:
        compare([a, b], tmp_path / "cmp")
    assert "'q0'" in str(err.value) and "'other 0'" in str(err.value)
    fewer = _fake_eval(tmp_path / "few", "coconut", 5, 10, 10, 4.0, settings={})  # the first 10 of the same: fine
    assert [r["n"] for r in compare([a, fewer], tmp_path / "cmp").rows] == [40, 10]
    c = _fake_eval(tmp_path / "c", "coconut", 33, 40, 10, 2.0,
                   settings={**same, "refine.residual": True, "refine.alpha": 0.5, "refine.contrastive": True, "refine.eta": 8})
    rows = compare([a, c], tmp_path / "cmp").rows
    assert [(r["label"], r["refine"]) for r in rows] == [
        ("coconut", None), ("coconut + residual (alpha 0.5) + contrastive (eta 8)", "residual (alpha 0.5) + contrastive (eta 8)")]
    (tmp_path / "c" / "summary.json").write_text('{"task": ')
    with pytest.raises(ValueError, match=r"c/summary.json: not valid JSON"):
        compare([c], tmp_path / "cmp")


def test_compare_names_an_unfinished_folder(tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(FileNotFoundError, match="half/summary.json: missing"):
        compare([str(tmp_path / "half")], tmp_path / "cmp")


def test_curves_plot_the_logged_key_per_run_and_name_a_log_without_it(tmp_path, capsys):
    from latentreason.cli import main
    from latentreason.eval.report import read_curve

    for name, rewards in (("a", [0.1, 0.3, 0.2]), ("b", [0.5, 0.4, 0.6])):
        run = tmp_path / name
        run.mkdir()
        rows = [{"stage": "rl", "step": 0}] + [{"step": i + 1, "loss": 1.0, "reward": r} for i, r in enumerate(rewards)]
        rows.insert(2, {"step": 1, "valid_metric": 0.5})
        (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_curve(tmp_path / "a", "reward") == [(1, 0.1), (2, 0.3), (3, 0.2)]
    out = tmp_path / "fig.png"
    assert main(["curves", f"{tmp_path / 'a'}=dlr/seed0", f"{tmp_path / 'b' / 'log.jsonl'}=grpo/seed0",
                 "--out", str(out), "--smooth", "2"]) == 0
    assert out.stat().st_size > 1000 and str(out) in capsys.readouterr().out
    # the format follows the name; a new folder is made; a folder named with '=' is read whole; every
    # unlabelled run is its own line; two runs under one label are refused, not one of them dropped
    odd = tmp_path / "lr=1e-3"
    odd.mkdir()
    (odd / "log.jsonl").write_text((tmp_path / "a" / "log.jsonl").read_text())
    for name, magic in (("fig.pdf", b"%PDF"), ("fig.svg", b"<?xm")):
        target = tmp_path / "new" / name
        assert main(["curves", str(tmp_path / "a"), str(odd), str(tmp_path / "b"), "--out", str(target)]) == 0
        assert target.read_bytes()[:4] == magic
    import matplotlib.pyplot as plt

    from latentreason.eval import report

    seen = {}
    real = plt.Axes.plot

    def spy(self, *args, **kwargs):
        seen[kwargs.get("label") or len(seen)] = kwargs.get("color")
        return real(self, *args, **kwargs)

    try:
        plt.Axes.plot = spy
        report.plot_curves({str(tmp_path / "a"): tmp_path / "a", str(odd): odd}, tmp_path / "g.png",
                           groups={str(tmp_path / "a"): str(tmp_path / "a"), str(odd): str(odd)})
    finally:
        plt.Axes.plot = real
    assert len(set(seen.values())) == 2 and str(odd) in seen
    assert main(["curves", f"{tmp_path / 'a'}=x", f"{tmp_path / 'b'}=x", "--out", str(out)]) == 2
    assert "two runs labelled 'x'" in capsys.readouterr().err
    assert main(["curves", str(tmp_path / "a"), "--key", "kl", "--out", str(out)]) == 2
    assert "no rows with 'kl'" in capsys.readouterr().err
    assert main(["curves", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "no training log here" in capsys.readouterr().err


@pytest.mark.parametrize("smooth", [0, -3])
def test_curves_refuse_a_smoothing_window_below_one(tmp_path, capsys, smooth):
    """--smooth 0 ended in a ZeroDivisionError traceback; it is a usage error."""
    from latentreason.eval.report import plot_curves

    (tmp_path / "log.jsonl").write_text(json.dumps({"step": 1, "reward": 0.5}) + "\n")
    with pytest.raises(ValueError, match=f"smooth must be at least 1.*got {smooth}"):
        plot_curves({"a": tmp_path}, tmp_path / "fig.png", smooth=smooth)
    assert main(["curves", str(tmp_path), "--out", str(tmp_path / "fig.png"), "--smooth", str(smooth)]) == 2
    assert "latentreason: error: smooth must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "fig.png").exists()
