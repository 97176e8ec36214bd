"""Every baseline through one harness on a tiny model: no-CoT, CoT-SFT, Coconut, the pause control,
SoftCoT (both modes), Soft Thinking, and the causal probes, over several training seeds.

    python benchmarks/bench_baselines.py --task arith --seeds 0 1 2

Per seed: no-CoT and CoT-SFT train from scratch (the demo's recipe); Coconut and the pause
control start from that seed's CoT-SFT model (``train.init_from``) and run the same curriculum
and step budget; SoftCoT trains its projection with that CoT-SFT model as both the frozen main
model and the frozen assistant; Soft Thinking runs on the CoT-SFT model, training-free. Every
model is selected on the validation split and reported on the held-out ``--report-split``
(arith: the generated test split). The probes (zero / noise / shuffled latents) evaluate the
trained Coconut and SoftCoT-answer models. Writes ``benchmarks/results/baselines_<task>.json``:
one row per seed (``seed``) and one row per method with the mean over seeds (``seed`` = "mean",
with ``std``, ``min``, ``max``). ``--collect --speed`` rebuilds the file from the evaluations on
disk, evaluates every Coconut stage's model (``coconut-stage-<k>``: where accuracy goes along the
curriculum) and times Coconut's evaluation against CoT-SFT's side by side (``speedup_vs_cot``),
for the seeds whose Coconut run is on disk (the others keep their published rows). ``--methods``
trains only some methods (a re-run of one, say), the rest of the file carried as it was.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from common import ROOT, carry_published, code_of, earlier_rows, seed_mean_rows, write_results

from latentreason.config import load_run_config, merge, parse_overrides
from latentreason.demo import COCONUT, DEMO_BASE
from latentreason.recipes import run_eval, run_train

#: ProsQA on the tiny model: one token per word of its closed vocabulary (``model.tiny_words=task``,
#: ~150 tokens per question instead of ~940 characters); trained on generated graphs, selected on
#: the generated ``dev`` split, reported on the shipped valid.json, which selection never sees.
#: Coconut as in the paper for ProsQA: one thought per step (c = 1), up to 6 steps replaced.
PROSQA_BASE = {**merge(DEMO_BASE, {
    "model": {"max_positions": 512, "tiny_words": "task"},
    "train": {"max_steps": 600, "save_every": 150, "log_every": 50, "eval_every": 150},
    "rollout": {"max_new_tokens": 64},
    "eval": {"split": "valid"},
}), "data": {"task": "prosqa", "valid_split": "dev"}}
PROSQA_COCONUT = merge(COCONUT, {"method": {"thoughts_per_step": 1, "max_stage": 6, "steps_per_stage": 60,
                                            "final_stage_steps": 60}, "train": {"max_steps": 420, "save_every": 60}})
#: the setting each result file states above its table
NOTES = {
    "arith": "Tiny model (tiny-llama-l4-d128, 4 layers, width 128, char-level), arith with 6 steps mod 10; 3 training seeds (model init and data order); every model selected on the generated valid split, reported on the generated test split (500). Coconut and pause: 480 steps from that seed's CoT-SFT model (c = 2, stages 1-5 of 80 steps, a final stage of 80 steps, 10 thoughts, optimizer reset at each stage); SoftCoT: 300 steps of the projection only, with the seed's CoT-SFT model as frozen main model and frozen assistant, 4 thoughts; Soft Thinking: training-free on the CoT-SFT model (reasoning ends at cold stop or where #### is the top token). coconut-stage-<k>: the model saved at the end of each curriculum stage. speedup_vs_cot: evaluations re-timed back to back on an idle machine.",
    "prosqa": ("Tiny model (tiny-llama-l4-d128, 4 layers, width 128, word-level over ProsQA's closed vocabulary), trained from "
               "scratch on generated ProsQA graphs (no-CoT and CoT-SFT: 600 steps of 64, about 2 epochs of 17,886 questions), "
               "selected on the generated dev split, reported on the shipped valid.json (300), "
               "which selection never sees. Coconut and pause: 420 steps from the seed's CoT-SFT model (c = 1, stages 1-6 of "
               "60 steps, a final stage of 60, 6 thoughts, optimizer reset at each stage); SoftCoT: 300 steps of the "
               "projection only, the seed's CoT-SFT model as frozen main model and frozen assistant; Soft Thinking: "
               "training-free on the CoT-SFT model (reasoning ends at cold stop or where #### is the top token). A short CPU budget: see the CoT-SFT row before reading the others. "
               "Every seed-0 row was re-made on 2026-11-27 with the current code (CoT-SFT re-trained with the same "
               "recipe and seed scores 0.233, against 0.140 on earlier code; `--methods coconut soft-thinking`, then "
               "`--methods nocot-sft pause softcot-answer softcot-chain`). Every seed-2 row was made on 2026-11-28 with the "
               "current code (`--seeds 2`); its CoT-SFT model scores 0.510, so under this budget the seeds' CoT-SFT "
               "models differ widely and every method trained from them inherits that spread. Every seed-1 row was "
               "made on 2026-12-06 with the current code (`--seeds 1`): its CoT-SFT model scores 0.080 again (and its "
               "no-CoT 0.460), as the earlier code's run did, so every mean row is on code from 2026-11-27 on (not one "
               "commit: latent_sft_prosqa.json reports that seed 2's CoT-SFT and no-CoT, re-trained with the same recipe "
               "on later code, gave 0.490 and 0.390)."),
}
TASKS: dict[str, dict[str, Any]] = {
    "arith": {"base": DEMO_BASE, "report": "test", "coconut": COCONUT},
    "prosqa": {"base": PROSQA_BASE, "report": "valid", "coconut": PROSQA_COCONUT, "keep_every": 150},
}


def train_eval(base: dict, out: Path, method: dict, report: str, extra: dict | None = None,
               probes: tuple[str, ...] = ()) -> dict[str, dict]:
    """Train (unless the method is training-free), evaluate best/ on the report split (and probes)."""
    data = merge(merge(base, {"method": method, "train": {"output_dir": str(out)}}), extra or {})
    run = load_run_config(base=data)
    if method["name"] not in ("soft-thinking",):
        if not (out / "train_summary.json").exists():  # a finished run is reused as it is (its best/ untouched)
            run_train(run)
        best = out / ("best" if (out / "best").exists() else "final")
        run.model.name_or_path = str(best)
        run.train.init_from = None
    summaries = {}
    for probe in ("none", *probes):
        run.eval.split, run.eval.probe = report, probe
        run.eval.output_dir = str(out / (f"eval-{report}" if probe == "none" else f"eval-{report}-probe-{probe}"))
        summaries[probe] = run_eval(run)
    return summaries


def train_cot(base: dict, root: Path, task: str) -> str:
    """The seed's CoT-SFT model (trained if missing), which every latent method starts from; it keeps
    early and late models where the task asks (``keep_every``: refinement's references). Returns best/."""
    spec = TASKS[task]
    keep = {"train": {"keep_every": spec["keep_every"]}} if "keep_every" in spec else None
    train_eval(base, root / "cot-sft", {"name": "cot-sft"}, spec["report"], keep)
    return str(root / "cot-sft" / "best")


METHODS = ["nocot-sft", "cot-sft", "coconut", "pause", "softcot-answer", "softcot-chain", "soft-thinking"]
PROBED = ["coconut", "softcot-answer"]
PROBES = ("zero", "noise", "shuffle")


def collect(root: Path, task: str, model: str, report: str, seeds: list[int]) -> list[dict]:
    """Result rows from the evaluation summaries on disk: per seed, then the mean over seeds."""
    rows: list[dict] = []
    values: dict[tuple[str, str], list[tuple[int, float]]] = {}

    def add(method: str, seed: int, metric: str, value: float, n: int, **extra: Any) -> None:
        rows.append({"task": task, "model": model, "method": method, "seed": seed, "split": report, "metric": metric,
                     "value": value, "n": n, **extra})
        values.setdefault((method, metric), []).append((seed, value))

    for seed in seeds:
        folder = root / task / f"seed{seed}"
        for method in METHODS + [f"{m}-probe-{p}" for m in PROBED for p in PROBES]:
            name, _, probe = method.partition("-probe-")
            path = folder / name / (f"eval-{report}-probe-{probe}" if probe else f"eval-{report}") / "summary.json"
            if not path.exists():
                continue
            s, code = json.loads(path.read_text()), code_of(path)
            add(method, seed, "accuracy", s["accuracy"], s["n"], ci95=s["accuracy_ci95"], **code)
            if not probe:
                add(method, seed, "reasoning_positions", round(s["mean_reasoning_positions"], 3), s["n"], **code)
    rows = carry_published(f"baselines_{task}", rows, values, skip_metrics=("speedup_vs_cot",),
                           skip_methods=("coconut-stage-",))
    return rows + seed_mean_rows(values, task=task, model=model, split=report)


def stage_rows(root: Path, task: str, model: str, report: str, seeds: list[int]) -> list[dict]:
    """Each Coconut stage's model on the report split: where along the curriculum accuracy goes."""
    rows = []
    for seed in seeds:
        for stage in sorted((root / task / f"seed{seed}" / "coconut").glob("stage-*")):
            run = load_run_config(overrides=[f"model.name_or_path={stage}", f"eval.split={report}",
                                             f"eval.output_dir={stage / f'eval-{report}'}", "eval.batch_size=250"],
                                  saved_base=True)
            s = run_eval(run)
            base = {"task": task, "model": model, "method": f"coconut-{stage.name}", "seed": seed, "split": report,
                    "n": s["n"], "thoughts": run.method.eval_thoughts}
            rows += [{**base, "metric": "accuracy", "value": s["accuracy"], "ci95": s["accuracy_ci95"]},
                     {**base, "metric": "reasoning_positions", "value": round(s["mean_reasoning_positions"], 3)}]
    return rows


def speed_rows(root: Path, task: str, model: str, report: str, seeds: list[int], reps: int = 3) -> list[dict]:
    """Coconut's evaluation against its CoT-SFT model's, questions per second, side by side: the
    two evaluate the same split back to back, alternating, ``reps`` times (the evaluations of the
    main run happen minutes apart and cannot be compared for speed on a shared machine)."""
    import tempfile

    rows = []
    for seed in seeds:
        folder = root / task / f"seed{seed}"
        if not (folder / "coconut" / "best").exists():
            continue
        qps: dict[str, list[float]] = {"cot-sft": [], "coconut": []}
        for rep in range(reps):
            for name in (("cot-sft", "coconut") if rep % 2 == 0 else ("coconut", "cot-sft")):
                with tempfile.TemporaryDirectory() as tmp:
                    run = load_run_config(overrides=[f"model.name_or_path={folder / name / 'best'}", f"eval.split={report}",
                                                     f"eval.output_dir={tmp}", "eval.batch_size=250"], saved_base=True)
                    qps[name].append(run_eval(run)["questions_per_second"])
        ratios = [c / t for c, t in zip(qps["coconut"], qps["cot-sft"])]
        rows.append({"task": task, "model": model, "method": "coconut", "seed": seed, "split": report,
                     "metric": "speedup_vs_cot", "value": round(statistics.median(ratios), 3), "n": reps,
                     "ratios": [round(r, 3) for r in ratios],
                     "questions_per_second": {k: [round(v, 1) for v in vs] for k, vs in qps.items()},
                     "note": "median over alternating back-to-back evaluations of the same split, batch 250"})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="arith", choices=list(TASKS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-baselines"))
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS,
                    help="train and evaluate only these (CoT-SFT is trained whenever a method starts from it)")
    ap.add_argument("--collect", action="store_true", help="only rebuild the result file from the evaluations on disk")
    ap.add_argument("--speed", action="store_true", help="with --collect: also time Coconut's evaluation against CoT-SFT's")
    ap.add_argument("overrides", nargs="*", help="section.field=value for every run")
    args = ap.parse_args()
    spec = TASKS[args.task]
    report = spec["report"]
    extra = parse_overrides(args.overrides)
    model = spec["base"]["model"]["name_or_path"]
    command = " ".join(["python benchmarks/bench_baselines.py", *[a for a in sys.argv[1:] if a not in ("--collect", "--speed")]])
    if args.speed:
        command += "; then the same with --collect --speed (re-times the evaluations side by side)"
    published = f"baselines_{args.task}"  # read before the per-seed writes below replace the file
    kept = earlier_rows(published, method_prefix="coconut-stage-") + earlier_rows(published, "speedup_vs_cot")
    for seed in [] if args.collect else args.seeds:
        root = Path(args.out) / args.task / f"seed{seed}"
        base = merge(merge(spec["base"], {"train": {"seed": seed}, "model": {"seed": seed}}), extra)
        if "nocot-sft" in args.methods:
            train_eval(base, root / "nocot-sft", {"name": "nocot-sft"}, report)
        if set(args.methods) == {"nocot-sft"}:
            continue
        cot = train_cot(base, root, args.task)
        from_cot = {"train": {"init_from": cot}}
        coconut = spec["coconut"]
        for name, method, probes in (
            ("coconut", {**coconut["method"], "name": "coconut"}, PROBES),
            ("pause", {**coconut["method"], "name": "pause"}, ()),
            ("softcot-answer", {"name": "softcot", "mode": "answer", "assistant": cot}, PROBES),
            ("softcot-chain", {"name": "softcot", "mode": "chain", "assistant": cot}, ()),
        ):
            if name not in args.methods:
                continue
            cfg = merge(from_cot, {k: v for k, v in coconut.items() if k != "method"}) if name in ("coconut", "pause") \
                else merge(from_cot, {"train": {"max_steps": 300}, "optim": {"lr": 1e-3}})
            train_eval(base, root / name, method, report, cfg, probes)
        if "soft-thinking" in args.methods:
            train_eval(merge(base, {"model": {"name_or_path": cot}}), root / "soft-thinking", {"name": "soft-thinking"},
                       report)
        write_results(f"baselines_{args.task}", command, collect(Path(args.out), args.task, model, report, args.seeds),
                      note=NOTES[args.task])
    rows = collect(Path(args.out), args.task, model, report, args.seeds)
    # what only --speed computes (per-stage evaluations, side-by-side timings): re-done for the seeds
    # whose Coconut run is on disk, kept from the last such pass for the others (every seed: a run
    # for --seeds 2 must not drop seed 0's)
    fresh = stage_rows(Path(args.out), args.task, model, report, args.seeds) + \
        speed_rows(Path(args.out), args.task, model, report, args.seeds) if args.speed else []
    redone = {r["seed"] for r in fresh}
    rows += fresh + [r for r in kept if r.get("seed") not in redone]
    if not args.speed and kept:
        command += "; then --collect --speed (its coconut-stage and speedup_vs_cot rows kept from that pass)"
    path = write_results(f"baselines_{args.task}", command, rows, note=NOTES[args.task])
    print(path)


if __name__ == "__main__":
    main()
