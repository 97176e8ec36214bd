"""Coconut's curriculum on arith at several budgets: where along the stages accuracy goes.

    python benchmarks/bench_coconut_budget.py --seed 1 --steps-per-stage 80 300

Why it exists: with the demo's 80 steps per stage Coconut ends at the no-CoT level on arith
(``baselines_arith``), and the question is whether that is the method or the budget. Per budget b,
from the seed's CoT-SFT model (the demo's recipe, trained if missing): the demo's curriculum (c = 2,
stages 1-5, then a final stage with every step latent, 10 thoughts, optimizer reset at each stage)
with b steps in every stage, validation twice in the final stage for ``best/``. Every stage's model
is then evaluated on the generated test split (nothing is selected on it), with its probes on the
final model (zero, noise, shuffled thoughts). Writes ``benchmarks/results/coconut_budget_arith.json``:
``accuracy`` and ``reasoning_positions`` per stage (``coconut-stage-<k>``, ``coconut-stage-final``;
field ``steps_per_stage``), and the probes of the final model. The official code trains about 3
epochs of GSM8K-Aug (385k questions) per stage; b = 300 is 19,200 questions.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common import ROOT, code_of, write_results

from latentreason.config import load_run_config, merge
from latentreason.demo import COCONUT, DEMO_BASE
from latentreason.recipes import run_eval, run_train

MODEL = DEMO_BASE["model"]["name_or_path"]
PROBES = ("zero", "noise", "shuffle")


def recipe(steps: int) -> dict:
    """The demo's Coconut curriculum with ``steps`` optimizer steps in every stage."""
    return merge(COCONUT, {"method": {"steps_per_stage": steps, "final_stage_steps": steps},
                           "train": {"max_steps": 6 * steps, "save_every": steps, "eval_every": steps // 2}})


def evaluate(folder: Path, split: str, probe: str = "none") -> dict:
    name = f"eval-{split}" if probe == "none" else f"eval-{split}-probe-{probe}"
    run = load_run_config(overrides=[f"model.name_or_path={folder}", f"eval.split={split}", f"eval.probe={probe}",
                                     f"eval.output_dir={folder / name}", "eval.batch_size=250"], saved_base=True)
    return {**run_eval(run), "thoughts": run.method.eval_thoughts if run.method.name == "coconut" else 0}


def rows_for(summary: dict, method: str, summary_path: Path, **fields: object) -> list[dict]:
    base = {"task": "arith", "model": MODEL, "method": method, "split": summary["split"], "n": summary["n"],
            "thoughts": summary["thoughts"], **fields, **code_of(summary_path)}
    return [{**base, "metric": "accuracy", "value": summary["accuracy"], "ci95": summary["accuracy_ci95"]},
            {**base, "metric": "reasoning_positions", "value": round(summary["mean_reasoning_positions"], 3)}]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--steps-per-stage", type=int, nargs="+", default=[80, 300])
    ap.add_argument("--split", default="test", help="where every stage's model is evaluated (none is selected on it)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-coconut-budget"))
    args = ap.parse_args()
    root = Path(args.out) / "arith" / f"seed{args.seed}"
    base = merge(DEMO_BASE, {"train": {"seed": args.seed}, "model": {"seed": args.seed}})
    cot = root / "cot-sft"
    if not (cot / "train_summary.json").exists():
        run_train(load_run_config(base=merge(base, {"method": {"name": "cot-sft"}, "train": {"output_dir": str(cot)}})))
    rows = rows_for(evaluate(cot / "best", args.split), "cot-sft", cot / "best" / f"eval-{args.split}" / "summary.json",
                    seed=args.seed)
    for steps in args.steps_per_stage:
        out = root / f"coconut-{steps}"
        if not (out / "train_summary.json").exists():  # a finished run is reused as it is
            run_train(load_run_config(base=merge(merge(base, recipe(steps)), {
                "method": {"name": "coconut"}, "train": {"init_from": str(cot / "best"), "output_dir": str(out)}})))
        for stage in sorted(out.glob("stage-*")):
            s = evaluate(stage, args.split)
            rows += rows_for(s, f"coconut-{stage.name}", stage / f"eval-{args.split}" / "summary.json",
                             seed=args.seed, steps_per_stage=steps)
        for probe in PROBES:
            s = evaluate(out / "stage-final", args.split, probe)
            rows += rows_for(s, f"coconut-stage-final-probe-{probe}",
                             out / "stage-final" / f"eval-{args.split}-probe-{probe}" / "summary.json",
                             seed=args.seed, steps_per_stage=steps)[:1]
    command = " ".join(["python benchmarks/bench_coconut_budget.py", *sys.argv[1:]])
    note = (f"Tiny model ({MODEL}), arith with 6 steps mod 10, one training seed ({args.seed}); Coconut from that seed's "
            "CoT-SFT model with the demo's curriculum (c = 2, stages 1-5 then a final stage, 10 thoughts, optimizer reset "
            "at each stage), at each budget in steps_per_stage (optimizer steps of 64 questions per stage); every stage's "
            f"model on the generated {args.split} split (500), none selected on it.")
    print(write_results("coconut_budget_arith", command, rows, note=note))


if __name__ == "__main__":
    main()
