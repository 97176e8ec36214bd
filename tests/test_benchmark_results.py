"""benchmarks/common.py: a result file rebuilt from the runs on disk keeps what was measured before."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import common  # noqa: E402


def row(method: str, seed, metric: str, value: float) -> dict:
    return {"task": "arith", "model": "tiny", "method": method, "seed": seed, "split": "test", "metric": metric,
            "value": value, "n": 500}


@pytest.fixture
def published(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    rows = [row("cot", 0, "accuracy", 0.5), row("cot", 1, "accuracy", 0.7), row("cot", "mean", "accuracy", 0.6),
            row("cot", 1, "speedup_vs_cot", 2.0), row("cot-stage-1", 1, "accuracy", 0.1)]
    (tmp_path / "bench.json").write_text(json.dumps({"benchmark": "bench", "date": "2026-11-01", "rows": rows}))


def test_runs_not_on_disk_are_carried_into_rows_and_seed_means(published):
    values = {("cot", "accuracy"): [(2, 0.9)]}
    rows = common.carry_published("bench", [row("cot", 2, "accuracy", 0.9)], values, skip_metrics=("speedup_vs_cot",),
                                  skip_methods=("cot-stage-",))
    carried = [r for r in rows if "carried" in r]
    assert [(r["method"], r["seed"], r["value"], r["carried"]) for r in carried] == \
        [("cot", 0, 0.5, "2026-11-01"), ("cot", 1, 0.7, "2026-11-01")]
    assert values[("cot", "accuracy")] == [(0, 0.5), (1, 0.7), (2, 0.9)]
    means = common.seed_mean_rows(values)
    assert [(m["value"], m["n"]) for m in means] == [(0.7, 3)]


def test_a_run_on_disk_replaces_its_published_rows(published, capsys):
    rows = common.carry_published("bench", [row("cot", 1, "accuracy", 0.75)], skip_metrics=("speedup_vs_cot",),
                                  skip_methods=("cot-stage-",))
    assert sorted((r["seed"], r["value"]) for r in rows) == [(0, 0.5), (1, 0.75)]
    assert "cot seed 1 accuracy was 0.7 (2026-11-01), is 0.75 on disk now" in capsys.readouterr().err
    again = common.carry_published("bench", [row("cot", 1, "accuracy", 0.75)])  # nothing skipped
    assert sorted((r["method"], r["seed"], r["metric"]) for r in again) == \
        [("cot", 0, "accuracy"), ("cot", 1, "accuracy"), ("cot-stage-1", 1, "accuracy")]


def test_a_file_of_one_run_per_method_carries_by_method(tmp_path, monkeypatch, capsys):
    """Rows without a seed (bench_latent_sft_smollm2: one short run per method): a rerun of some
    methods keeps the others' rows, timings included; its accuracies are compared, its timings not."""
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    rows = [row("cot-sft", None, "accuracy", 0.035), row("latent-sft-r4", None, "accuracy", 0.0),
            row("latent-sft-r4", None, "speedup_vs_cot", 1.02), row("latent-sft-r2", None, "accuracy", 0.0),
            row("latent-sft-r2", None, "seconds_per_question", 0.7)]
    (tmp_path / "bench.json").write_text(json.dumps({"benchmark": "bench", "date": "2026-11-27", "rows": rows}))
    rebuilt = [row("cot-sft", None, "accuracy", 0.04), row("latent-sft-r2", None, "accuracy", 0.0),
               row("latent-sft-r2", None, "seconds_per_question", 0.9)]
    differ: list[str] = []
    out = common.carry_published("bench", rebuilt, seedless=True, differences=differ,
                                 unchecked=("seconds_per_question", "speedup_vs_cot"))
    assert out[:3] == rebuilt
    assert [(r["method"], r["metric"], r["carried"]) for r in out[3:]] == [
        ("latent-sft-r4", "accuracy", "2026-11-27"), ("latent-sft-r4", "speedup_vs_cot", "2026-11-27")]
    assert differ == ["bench: cot-sft accuracy was 0.035 (2026-11-27), is 0.04 on disk now"]
    assert differ[0] in capsys.readouterr().err
    # without seedless, rows without a seed are never carried (per-seed files: those are settings rows)
    assert common.carry_published("bench", rebuilt) == rebuilt


def test_rows_name_the_commits_that_trained_and_evaluated_them(tmp_path):
    run = tmp_path / "cot-sft"
    (run / "eval-test").mkdir(parents=True)
    (run / "train_summary.json").write_text(json.dumps({"steps": 4, "provenance": {"commit": "aaa"}}))
    (run / "eval-test" / "summary.json").write_text(json.dumps({"n": 4, "provenance": {"commit": "bbb+dirty"}}))
    assert common.code_of(run / "eval-test" / "summary.json") == {"trained_with": "aaa", "evaluated_with": "bbb+dirty"}
    (run / "train_summary.json").write_text(json.dumps({"steps": 4}))  # written before the stamp existed
    assert common.code_of(run / "eval-test" / "summary.json") == {"evaluated_with": "bbb+dirty"}


def test_alternate_timings_runs_each_config_per_round_and_splits_the_time(tmp_path):
    """The benchmarks' side-by-side timer: the warm-up round dropped, every config once per round, in
    alternating order, and the phases of the configs' own rollouts (a latent one has latent steps)."""
    from latentreason.config import load_run_config
    from latentreason.recipes import build_method
    from tests.conftest import tiny_run

    runs = {name: load_run_config(base=tiny_run(tmp_path, method=name)) for name in ("cot-sft", "pause")}
    method = build_method(runs["pause"])
    seen: list[str] = []
    original = type(method).latent_step

    def tracking(self, examples):  # noqa: ANN001
        seen.append(self.run.method.name)
        return original(self, examples)

    type(method).latent_step = tracking
    try:
        examples = method.task.load("valid", limit=4)
        seconds, phases = common.alternate_timings(method, examples, runs, batch_size=4, reps=2)
    finally:
        type(method).latent_step = original
    assert seen == ["cot-sft", "pause", "pause", "cot-sft", "cot-sft", "pause"]
    assert {k: len(v) for k, v in seconds.items()} == {"cot-sft": 2, "pause": 2}
    assert all(s > 0 for v in seconds.values() for s in v)
    assert {"prefill", "decode"} <= set(phases["cot-sft"]) and "latent" in phases["pause"]
