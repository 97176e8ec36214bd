"""Post-training refinement on tiny latent models: base, + residual, + contrastive, + both.

    python benchmarks/bench_refine.py --task arith --seeds 0 1 2          # sweeps and reports
    python benchmarks/bench_refine.py --task arith --seeds 0 1 2 --collect --cost   # + wall-clock, side by side
    python benchmarks/bench_refine.py --task prosqa --seeds 0 1 2

Per seed (arith; ProsQA below), on the models of ``bench_baselines.py`` / ``bench_latent_sft.py`` (same seeds):

- references: that seed's CoT-SFT recipe trained again with ``train.keep_every=50`` (``cot-sft-kept``):
  strong = its last kept model (step 400), weak = its first (step 50), the paper's late and early
  CoT checkpoints; neither is the latent model being refined;
- Coconut latents: the seed's Coconut model (its final stage, 10 thoughts; about 21% on arith, and
  its answers barely depend on its thoughts: the zero probe keeps most of it), and the same run's
  curriculum stage-1 model (``coconut-stage-1``: 2 thoughts in place of the first step, the rest
  written; about 88%, and zeroing its thoughts costs about 20 points: latents that matter);
- Latent-SFT latents: r = 4 with stage 2 cut to 400 of the recipe's 1200 steps (from the same
  stage 1 and soft labels; a shorter budget, so the base sits well below 90%);
- ``latentreason refine``: α × η swept on 200 validation questions, each of base, + residual,
  + contrastive, + both taken as the best validation cell of its kind and evaluated once on the
  generated test split (500); the contrastive step is also swept with the sign flipped
  (``refine.direction=weak``: the paper's printed update).

ProsQA: references are the first and last models the seed's CoT-SFT run kept (every 150 steps:
steps 150 and 600; re-run with kept models where it kept none); Latent-SFT r = 4 is
``bench_latent_sft.py --task prosqa``'s model as it is (its recipe is short already; skipped with
a message where it has not run); the sweep selects on the generated dev split and the report is
the shipped valid.json.

``--cost`` times report-split evaluation without refinement, with the residual alone, and with both
operators, alternating back to back (``residual_cost_ratio``, ``refine_cost_ratio``: medians of
the ratios; ``+refine-inexact``: ``refine.exact_references=false``; ``phase_seconds``: the medians of
the rollout's own split of each setting's time: prefill, the references' prefill, latent steps, answer
decoding). A ``--cost`` run replaces the timings of its ``--cost-seed`` and keeps other seeds'. Writes ``benchmarks/results/refine_<task>.json``; ``--collect`` rebuilds it from disk.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

from common import ROOT, alternate_timings, carry_published, earlier_rows, write_results

from latentreason.config import load_run_config, load_yaml, merge
from latentreason.recipes import build_method, run_train

MODEL = "tiny-llama-l4-d128"
STAGE2_STEPS = 400
#: η is in the paper's units ((2η/d) times the references' hidden-state difference): Coconut's
#: latents are hidden states (norm ~13), Latent-SFT's are embedding mixtures (norm ~0.5), so the
#: grids differ: Coconut's spans steps of about 3% to 100% of a latent's norm; Latent-SFT's goes lower
#: (0.3% to 10%) and its α too, as its latents degrade at the smallest settings of a Coconut-like grid.
GRIDS = {
    "coconut": {"alphas": [0.0, 0.25, 0.5, 0.75, 0.9], "etas": [0.0, 8.0, 24.0, 72.0, 216.0]},
    "coconut-stage-1": {"alphas": [0.0, 0.25, 0.5, 0.75, 0.9], "etas": [0.0, 8.0, 24.0, 72.0, 216.0]},
    "latent-sft-r4": {"alphas": [0.0, 0.05, 0.1, 0.25, 0.5], "etas": [0.0, 0.01, 0.03, 0.1, 0.3]},
}
ROW_NAMES = {"base": "", "residual": "+residual", "contrastive": "+contrastive", "both": "+refine"}
NOTES = {
    "arith": ("Tiny model (4 layers, d = 128), generated arith (6 steps, mod 10), CPU. References: the seed's CoT-SFT recipe "
              "(400 steps) run again keeping every 50 steps: strong = step 400, weak = step 50. Coconut: the seed's model "
              "of bench_baselines.py (10 thoughts); coconut-stage-1: its curriculum stage-1 model (2 thoughts, then the "
              "remaining steps written). latent-sft-r4: r = 4 with stage 2 cut to 400 of 1200 steps. Every "
              "setting chosen on 200 validation questions (alpha x eta grid), reported once on the generated test split (500). "
              "ci95 over seeds: mean +- t(0.975, seeds-1) * sd / sqrt(seeds). latent-sft-r4+residual's cost ratio of 1.32 "
              "(seed 0) is not the operator's cost (1.00 on ProsQA, and 1.001 for the operator alone): a batch's latent loop "
              "runs as long as its longest row, and refined latents keep a few rows reasoning past the 9 steps every row "
              "otherwise takes. Checked on 2026-12-06 with a re-trained seed-1 model (configs/latent_sft_arith_stage1.yaml, "
              "stage 2 of 400 steps; seed 0's models are no longer on disk), test split, batch 250: unrefined, both batches "
              "ran 9 latent steps; alpha = 0.05 kept one row of 500 reasoning 14 steps, so one batch ran 14 (latent phase "
              "1.25x, whole evaluation 1.09x); alpha = 0.25, two batches of 24 and 16. summary.json's batch_step_use "
              "reports this share of waiting rows for any evaluation."),
    "prosqa": ("Tiny model (4 layers, d = 128, word-level), ProsQA as in bench_baselines.py (600 CoT-SFT steps from scratch: "
               "under-trained, see baselines_prosqa). References: the seed's CoT-SFT run keeping every 150 steps: strong = "
               "step 600, weak = step 150. Coconut: the seed's model (6 thoughts); coconut-stage-1: its curriculum stage-1 "
               "model (1 thought, then the remaining steps written); latent-sft-r4: bench_latent_sft.py's ProsQA recipe. "
               "Every setting chosen on 200 questions of the generated dev split (alpha x eta grid), reported once on the "
               "shipped valid.json (300). ci95 over seeds: mean +- t(0.975, seeds-1) * sd / sqrt(seeds). Heat map of "
               "latent-sft-r4's sweep, seed 0: benchmarks/results/refine_prosqa_sweep_latent-sft-r4_seed0.png. Seed 1: every "
               "model on 2026-12-06. Seed 2: Coconut's rows from 2026-11-28 (carried); latent-sft-r4 on 2026-12-06 "
               "(--seeds 2 --models latent-sft-r4), from a seed-2 CoT-SFT model trained again that day (0.490 on "
               "valid.json, against 0.510 on 2026-11-28), whose kept models are its references. Cost rows: seed 0's from "
               "--cost on 2026-11-28, seed 1's from --cost --cost-seed 1 on 2026-12-06 with the rollout's split of the "
               "time (phase_seconds): the prefill of ProsQA's long prompts is about 85% of an unrefined evaluation, "
               "and each reference reads the prompts too, so the two references' prefill alone costs about 1.6x the "
               "whole unrefined run; their latent steps add about 0.5 s of about 10."),
}
#: where each task reports (selection always runs on the saved model's own ``data.valid_split``) and
#: how often the reference CoT-SFT run keeps a model
REPORT = {"arith": "test", "prosqa": "valid"}
KEEP_EVERY = {"arith": 50, "prosqa": 150}


def kept_cot(root: Path, task: str) -> tuple[str, str]:
    """(strong, weak): the last and first model the seed's CoT-SFT run kept (``train.keep_every``); a run
    that kept none is re-run with kept models (``cot-sft-kept``, trained if missing)."""
    out = root / "cot-sft"
    if not list(out.glob("keep-*")):
        out = root / "cot-sft-kept"
        if not (out / "train_summary.json").exists():
            every = KEEP_EVERY[task]
            data = merge(load_yaml(root / "cot-sft" / "run_config.yaml"),
                         {"train": {"output_dir": str(out), "keep_every": every, "save_every": every}})
            run_train(load_run_config(base=data))
    kept = sorted(out.glob("keep-*"), key=lambda p: int(p.name.split("-")[1]))
    return str(kept[-1]), str(kept[0])


def short_latent_sft(root: Path) -> Path:
    """Latent-SFT r = 4 with a stage 2 of STAGE2_STEPS steps, from the recipe's stage 1 and soft labels."""
    full = root / "latent-sft-r4" / "stage2"
    out = root / f"latent-sft-r4-stage2-{STAGE2_STEPS}"
    if not (out / "train_summary.json").exists():
        data = merge(load_yaml(full / "run_config.yaml"), {
            "method": {"soft_labels": str(full / "soft_labels")},
            "train": {"output_dir": str(out), "max_steps": STAGE2_STEPS, "save_every": STAGE2_STEPS}})
        run_train(load_run_config(base=data))
    return out / "best"


def latent_models(root: Path, task: str) -> dict[str, Path]:
    """The latent models refined for one seed. On arith, Latent-SFT's stage 2 is cut short (its full recipe
    sits at the ceiling); ProsQA's recipe is short already, and runs only if bench_latent_sft.py made it."""
    models = {"coconut": root / "coconut" / "best", "coconut-stage-1": root / "coconut" / "stage-1"}
    if task == "arith":
        models["latent-sft-r4"] = short_latent_sft(root)
    elif (root / "latent-sft-r4" / "stage2" / "best").exists():
        models["latent-sft-r4"] = root / "latent-sft-r4" / "stage2" / "best"
    else:
        print(f"{root}: no latent-sft-r4 run (python benchmarks/bench_latent_sft.py --task {task}); refining Coconut only")
    return models


def refine_overrides(model: Path, name: str, refs: tuple[str, str], out: Path, direction: str,
                     report: str) -> list[str]:
    grid = GRIDS[name]
    alphas = grid["alphas"] if direction == "strong" else [0.0]
    return [f"model.name_or_path={model}", f"refine.strong={refs[0]}", f"refine.weak={refs[1]}",
            f"refine.direction={direction}", f"refine.sweep_alphas={json.dumps(alphas)}",
            f"refine.sweep_etas={json.dumps(grid['etas'])}", "refine.sweep_limit=200", f"eval.split={report}",
            "eval.batch_size=250", f"eval.output_dir={out}"]


def run_seed(root: Path, task: str, only: list[str] | None = None) -> None:
    from latentreason.methods.refine import run_refine

    refs = kept_cot(root, task)
    for name, model in latent_models(root, task).items():
        if only and name not in only:
            continue
        for direction in ("strong", "weak"):
            out = root / "refine" / f"{name}-{direction}"
            overrides = refine_overrides(model, name, refs, out, direction, REPORT[task])
            run_refine(load_run_config(overrides=overrides, saved_base=True))


COST_METRICS = ("refine_cost_ratio", "residual_cost_ratio")


def collect(root: Path, task: str, seeds: list[int]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for seed in seeds:
        for name in GRIDS:
            for direction in ("strong", "weak"):
                path = root / task / f"seed{seed}" / "refine" / f"{name}-{direction}" / "refine_summary.json"
                if not path.exists():
                    continue
                report = json.loads(path.read_text())["report"]
                kinds = ROW_NAMES if direction == "strong" else {"contrastive": "+contrastive-weak"}
                for kind, suffix in kinds.items():
                    if kind not in report:
                        continue
                    r = report[kind]
                    rows.append({"task": task, "model": MODEL, "method": name + suffix, "seed": seed, "split": REPORT[task],
                                 "metric": "accuracy", "value": r["accuracy"], "n": r["n"], "ci95": r["accuracy_ci95"],
                                 "alpha": r["alpha"], "eta": r["eta"], "valid_accuracy": r["valid_accuracy"],
                                 "direction": direction,
                                 # how far each operator moved the latents, relative to their norm (newer runs)
                                 **{f"shift_{op}": round(v, 5) for op, v in (r.get("refine_shift") or {}).items()}})
    rows = carry_published(f"refine_{task}", rows, skip_metrics=COST_METRICS)
    base = {(r["method"], r["seed"]): r["value"] for r in rows if "+" not in r["method"]}
    values: dict[str, list[tuple[int, float, float]]] = {}  # method -> (seed, accuracy, gain over the same seed's base)
    for r in sorted(rows, key=lambda r: r["seed"]):
        values.setdefault(r["method"], []).append((r["seed"], r["value"], r["value"] - base[r["method"].split("+")[0], r["seed"]]))
    for method, items in values.items():
        if len(items) < 2:
            continue
        for metric, idx in (("accuracy", 1), ("accuracy_gain", 2)):
            vals = [it[idx] for it in items]
            mean, sd = statistics.mean(vals), statistics.stdev(vals)
            half = _t975(len(vals) - 1) * sd / math.sqrt(len(vals))
            rows.append({"task": task, "model": MODEL, "method": method, "seed": "mean", "split": REPORT[task],
                         "metric": metric, "value": round(mean, 4), "n": len(vals), "seeds": [it[0] for it in items],
                         "std": round(sd, 4), "ci95": [round(mean - half, 4), round(mean + half, 4)],
                         "note": "n = training seeds; accuracy_gain = this row minus the same seed's base, paired"})
    return rows


def _t975(df: int) -> float:
    return {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}.get(df, 1.96)


def cost_rows(root: Path, task: str, seed: int, reps: int) -> list[dict[str, Any]]:
    """Wall-clock of the test split without refinement / residual alone / both, alternating."""
    folder = root / task / f"seed{seed}"
    refs = kept_cot(folder, task)
    rows = []
    for name, model in latent_models(folder, task).items():
        if name not in ("coconut", "latent-sft-r4"):
            continue
        summary = json.loads((folder / "refine" / f"{name}-strong" / "refine_summary.json").read_text())["report"]
        both = summary.get("both", {"alpha": 0.5, "eta": GRIDS[name]["etas"][2]})
        settings = {
            "base": [],
            "residual": ["refine.residual=true", f"refine.alpha={both['alpha']}"],
            "both": ["refine.residual=true", f"refine.alpha={both['alpha']}", "refine.contrastive=true",
                     f"refine.eta={both['eta']}"],
        }
        settings["both-inexact"] = settings["both"] + ["refine.exact_references=false"]
        base_over = [f"model.name_or_path={model}", f"refine.strong={refs[0]}", f"refine.weak={refs[1]}"]
        method = build_method(load_run_config(overrides=base_over, saved_base=True))
        examples = method.task.load(REPORT[task])
        runs = {k: load_run_config(overrides=base_over + over, saved_base=True) for k, over in settings.items()}
        seconds, phases = alternate_timings(method, examples, runs, batch_size=250, reps=reps)
        labels = {"residual": "+residual", "both": "+refine", "both-inexact": "+refine-inexact"}
        for key, metric in (("residual", "residual_cost_ratio"), ("both", "refine_cost_ratio"),
                            ("both-inexact", "refine_cost_ratio")):
            ratios = [a / b for a, b in zip(seconds[key], seconds["base"])]
            rows.append({"task": task, "model": MODEL, "method": name + labels[key],
                         "seed": seed, "split": REPORT[task], "metric": metric, "value": round(statistics.median(ratios), 3),
                         "n": reps, "ratios": [round(r, 3) for r in ratios], "alpha": both["alpha"],
                         "eta": both["eta"] if key.startswith("both") else 0.0,
                         "seconds": {k: [round(v, 3) for v in vs] for k, vs in seconds.items()},
                         "phase_seconds": phases,
                         "note": f"median over alternating back-to-back runs of the {len(examples)} {REPORT[task]} questions, batch 250"})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="arith", choices=list(REPORT))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-baselines"), help="the runs of bench_baselines.py")
    ap.add_argument("--collect", action="store_true", help="only rebuild the result file from the runs on disk")
    ap.add_argument("--cost", action="store_true", help="also time evaluation with and without refinement (on --cost-seed)")
    ap.add_argument("--cost-seed", type=int, default=0)
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--models", nargs="+", choices=list(GRIDS),
                    help="refine only these latent models (default: every one the seed has); the others' published "
                         "rows are carried")
    args = ap.parse_args()
    root = Path(args.out)
    for seed in [] if args.collect else args.seeds:
        run_seed(root / args.task / f"seed{seed}", args.task, args.models)
    rows = collect(root, args.task, args.seeds)
    if args.cost:  # this seed's timings replace its earlier ones; other seeds' stay
        rows += cost_rows(root, args.task, args.cost_seed, args.reps)
        rows += [r for m in COST_METRICS for r in earlier_rows(f"refine_{args.task}", m) if r.get("seed") != args.cost_seed]
    else:  # keep the side-by-side timings of the last --cost run
        rows += [r for m in COST_METRICS for r in earlier_rows(f"refine_{args.task}", m)]
    seeds = " ".join(map(str, args.seeds))
    command = f"python benchmarks/bench_refine.py --task {args.task} --seeds {seeds}" + \
        (f" --models {' '.join(args.models)}" if args.models else "")
    if args.cost:
        command += f"; python benchmarks/bench_refine.py --task {args.task} --seeds {seeds} --collect --cost --cost-seed {args.cost_seed}"
    else:  # the timings kept come from the last --cost run: name it
        published = ROOT / "benchmarks" / "results" / f"refine_{args.task}.json"
        timed = [c for c in json.loads(published.read_text())["command"].split("; ") if "--cost" in c] if published.exists() else []
        command += "".join(f"; {c}" for c in timed)
    print(write_results(f"refine_{args.task}", command, rows, note=NOTES[args.task]))


if __name__ == "__main__":
    sys.exit(main())
