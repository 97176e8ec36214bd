"""The command line: help that teaches, errors that name the field, inspect, the quick demo."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

import latentreason
from latentreason.cli import main
from latentreason.io import git_commit, provenance
from tests.conftest import cli_args, tiny_run


def test_help_lists_every_config_field(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for field in ("optim.lr", "train.global_batch_size", "rollout.num_latent_steps", "model.name_or_path", "method.with_chain"):
        assert field in out


def test_unknown_key_is_rejected_with_a_suggestion(capsys):
    assert main(["train", "optim.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'lrr'; did you mean lr?" in err


def test_unknown_model_names_builtins(tmp_path, capsys, monkeypatch):
    cfg = tiny_run(tmp_path, model={"name_or_path": "./no/such/model"})
    assert main(["eval", *cli_args(cfg)]) == 2
    assert "smollm2-135m" in capsys.readouterr().err
    # 'runs/bset' looks like owner/model, but runs/ is a folder here: a typo, named at once (it went
    # to the hub, which retries for a minute offline, and ended in a raw OSError)
    (tmp_path / "runs" / "best").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    cfg = tiny_run(tmp_path, model={"name_or_path": "runs/bset"})
    assert main(["eval", *cli_args(cfg)]) == 2
    assert "'runs/bset': no such local folder" in capsys.readouterr().err


def test_inspect(capsys):
    assert main(["inspect", "tasks"]) == 0
    out = capsys.readouterr().out
    assert "arith" in out and "gsm8k" in out
    assert main(["inspect", "methods"]) == 0
    assert "cot-sft" in capsys.readouterr().out
    assert main(["inspect", "example", "data.task=arith", "-n", "2"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 2 and rows[0]["answer"].startswith("####")


def test_inspect_resolves_a_saved_run_as_eval_does(tmp_path, capsys):
    import yaml

    folder = tmp_path / "saved"
    folder.mkdir()
    saved = tiny_run(tmp_path, data={"task": "arith", "options": {"num_steps": 2}})
    (folder / "run_config.yaml").write_text(yaml.safe_dump(saved))
    assert main(["inspect", "config", f"model.name_or_path={folder}"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["data"]["options"] == {"num_steps": 2}
    assert main(["inspect", "example", f"model.name_or_path={folder}", "-n", "1"]) == 0
    chain = json.loads(capsys.readouterr().out)["chain"]
    assert len(chain.split(" ")) == 2, chain  # two steps, as the saved run's task writes them


def test_inspect_lists_in_a_fresh_process():
    """In a fresh interpreter nothing has registered the tasks yet (in-process tests hide that)."""
    import sys

    out = subprocess.run([sys.executable, "-m", "latentreason.cli", "inspect", "tasks"], capture_output=True,
                         text=True, check=True).stdout
    assert {"arith", "gsm8k", "prosqa"} <= {line.split()[0] for line in out.splitlines() if line.strip()}
    out = subprocess.run([sys.executable, "-m", "latentreason.cli", "inspect", "methods"], capture_output=True,
                         text=True, check=True).stdout
    assert {"cot-sft", "coconut", "latent-sft"} <= {line.split()[0] for line in out.splitlines() if line.strip()}


def test_overrides_may_follow_options(capsys):
    """argparse fills the overrides at their first run of positionals: later ones (after -n, --config)
    were refused as unrecognized arguments."""
    assert main(["inspect", "example", "-n", "1", "data.task=arith", "--config", "configs/cot_sft_arith.yaml",
                 "eval.split=test"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["id"] == "arith-test-0"
    assert main(["inspect", "example", "eval.split=test", "-n", "1", "eval.split=valid"]) == 0  # the later one wins
    assert json.loads(capsys.readouterr().out)["id"].startswith("arith-valid-")
    with pytest.raises(SystemExit):
        main(["inspect", "example", "-n", "1", "stray"])
    assert "latentreason inspect: error: unrecognized arguments: stray" in capsys.readouterr().err  # its own usage
    from latentreason.cli import make_parser, parse

    verbose = lambda *argv: parse(make_parser(), list(argv)).verbose  # noqa: E731
    assert verbose("inspect", "example", "-v") and verbose("-v", "inspect", "example")  # -v after the verb too
    assert not verbose("inspect", "example")
    with pytest.raises(SystemExit):
        main(["compare", "runs/a", "--out", "x", "b=c"])  # compare takes no overrides
    assert "unrecognized arguments: b=c" in capsys.readouterr().err


def test_train_then_eval_through_the_cli(tmp_path, capsys):
    cfg = tiny_run(tmp_path, train={"max_steps": 60, "save_every": 30})
    assert main(["train", *cli_args(cfg)]) == 0
    best = tmp_path / "run" / "best"
    assert (best / "model.safetensors").exists() and (best / "run_config.yaml").exists()
    assert main(["eval", *cli_args(cfg), f"model.name_or_path={best}"]) == 0
    summary = json.loads((tmp_path / "run" / "eval-valid" / "summary.json").read_text())
    rows = [json.loads(line) for line in (tmp_path / "run" / "eval-valid" / "predictions.jsonl").read_text().splitlines()]
    assert summary["n"] == len(rows) == 32 and summary["model"] == str(best)
    # model.device=auto / model.dtype=auto in the default suite (LATENTREASON_DEVICE=cpu): CPU, float32.
    assert (summary["device"], summary["dtype"]) == ("cpu", "float32")
    # Both summaries name the code that made them (this checkout's commit when run from one).
    trained = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert (trained["device"], trained["distributed_type"], trained["processes"]) == ("cpu", "NO", 1)
    assert summary["provenance"] == trained["provenance"] == provenance()
    assert summary["provenance"]["torch"] == torch.__version__
    package = str(Path(latentreason.__file__).parent)
    head = subprocess.run(["git", "-C", package, "rev-parse", "HEAD"], capture_output=True, text=True)
    tracked = subprocess.run(["git", "-C", package, "ls-files", "--", "."], capture_output=True, text=True)
    if tracked.stdout.strip():  # run from a checkout (CI's clone, an editable install)
        assert summary["provenance"]["commit"].startswith(head.stdout.strip())
    assert all(r["correct"] == (r["prediction"] == r["gold"]) for r in rows)
    assert summary["accuracy"] == sum(r["correct"] for r in rows) / 32
    # The same evaluation of the untrained model (the run's starting point) scores lower.
    assert main(["eval", *cli_args(cfg), f"eval.output_dir={tmp_path / 'untrained'}"]) == 0
    untrained = json.loads((tmp_path / "untrained" / "summary.json").read_text())
    assert summary["accuracy"] > untrained["accuracy"]


@pytest.mark.parametrize("flag", [[], ["--no-latent-sft"]], ids=["default", "no-latent-sft"])
def test_demo_trains_latent_sft_unless_told_not_to(tmp_path, monkeypatch, flag):
    """The default demo (the README's main command) trains Latent-SFT beside the baselines."""
    import latentreason.eval.report as report
    import latentreason.recipes as recipes

    trained = []

    def fake_train(run):
        trained.append(run.method.name)
        (Path(run.train.output_dir) / "best").mkdir(parents=True)

    monkeypatch.setattr(recipes, "run_train", fake_train)
    monkeypatch.setattr(recipes, "run_eval", lambda run: {"method": run.method.name})
    monkeypatch.setattr(report, "table", lambda summaries: "")
    monkeypatch.setattr(report, "compare", lambda *a, **k: None)
    monkeypatch.setattr(report, "plot_accuracy_vs_positions", lambda *a, **k: None)
    assert main(["demo", "--quick", *flag, "--output-dir", str(tmp_path / "demo")]) == 0
    expected = ["nocot-sft", "cot-sft", "coconut"] + ([] if flag else ["latent-sft", "latent-sft"])
    assert trained == expected


def test_quick_demo_writes_table_plot_and_summaries(tmp_path, capsys):
    assert main(["demo", "--quick", "--output-dir", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "nocot-sft" in out and "cot-sft" in out and "reason.pos" in out
    png = tmp_path / "demo" / "accuracy_vs_positions.png"
    assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"
    for method in ("nocot-sft", "cot-sft", "coconut", "latent-sft"):
        summary = json.loads((tmp_path / "demo" / method / "eval-test" / "summary.json").read_text())
        assert summary["n"] == 64 and summary["split"] == "test" and summary["method"] == method
    assert "latent-sft" in out and summary["mean_latent_steps"] > 0  # stage 2 writes its own latents
    assert not (tmp_path / "demo" / "latent-sft-stage1" / "eval-test").exists()  # the teacher is not a result
    assert "latent-sft-stage1/best" in (tmp_path / "demo" / "latent-sft" / "run_config.yaml").read_text()


def test_git_commit_names_only_a_checkout_that_tracks_the_package(tmp_path):
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(tmp_path), *args], capture_output=True, text=True, check=True).stdout

    git("init", "-q")
    git("config", "user.email", "t@t")
    git("config", "user.name", "t")
    (tmp_path / "README").write_text("someone else's project\n")
    git("add", "README")
    git("commit", "-qm", "their project")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text("x = 1\n")
    assert git_commit(tmp_path / "pkg") is None  # untracked: a package installed inside someone else's repo
    git("add", "pkg")
    git("commit", "-qm", "add pkg")
    head = git("rev-parse", "HEAD").strip()
    assert git_commit(tmp_path / "pkg") == head
    (tmp_path / "pkg" / "mod.py").write_text("x = 2\n")
    assert git_commit(tmp_path / "pkg") == head + "+dirty"
    assert git_commit(tmp_path / "nowhere") is None


def test_results_record_the_command_that_made_them(tmp_path, monkeypatch):
    """An evaluation started by a benchmark script must not be stamped ``latentreason <the script's flags>``."""
    from latentreason.recipes import invocation

    monkeypatch.chdir(tmp_path)
    assert invocation(["/venv/bin/latentreason", "eval", "--config", "c.yaml"]) == "latentreason eval --config c.yaml"
    assert invocation(["/src/latentreason/__main__.py", "train"]) == "latentreason train"
    script = tmp_path / "benchmarks" / "bench_x.py"
    assert invocation([str(script), "--rates", "2"]) == "python benchmarks/bench_x.py --rates 2"
    clone = tmp_path / "latentreason" / "train_more.py"  # a script in a clone named like the package
    assert invocation([str(clone)]) == "python latentreason/train_more.py"
