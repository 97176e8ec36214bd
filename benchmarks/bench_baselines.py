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
with ``std``, ``min``, ``max``), and ``latentreason compare`` output for seed 0 under runs/.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from common import ROOT, write_results

from latentreason.config import load_run_config, merge, parse_overrides
from latentreason.demo import COCONUT, DEMO_BASE
from latentreason.recipes import run_eval, run_train

TASKS: dict[str, dict[str, Any]] = {"arith": {"base": DEMO_BASE, "report": "test"}}


def train_eval(base: dict, out: Path, method: dict, report: str, extra: dict | None = None,
               probes: tuple[str, ...] = ()) -> dict[str, dict]:
    """Train (unless the method is training-free), evaluate best/ on the report split (and probes)."""
    data = merge(merge(base, {"method": method, "train": {"output_dir": str(out)}}), extra or {})
    run = load_run_config(base=data)
    if method["name"] not in ("soft-thinking",):
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="arith", choices=list(TASKS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-baselines"))
    ap.add_argument("overrides", nargs="*", help="section.field=value for every run")
    args = ap.parse_args()
    spec = TASKS[args.task]
    report = spec["report"]
    extra = parse_overrides(args.overrides)
    rows: list[dict] = []
    model = spec["base"]["model"]["name_or_path"]
    t_start = time.perf_counter()
    per_method: dict[str, list[tuple[int, dict]]] = {}

    def record(method: str, seed: int, summary: dict, seconds: float | None = None) -> None:
        per_method.setdefault(method, []).append((seed, summary))
        base = {"task": args.task, "model": model, "method": method, "seed": seed, "split": report, "n": summary["n"]}
        rows.append({**base, "metric": "accuracy", "value": summary["accuracy"], "ci95": summary["accuracy_ci95"]})
        rows.append({**base, "metric": "reasoning_positions", "value": summary["mean_reasoning_positions"]})
        if seconds is not None:
            rows[-1]["train_and_eval_seconds"] = round(seconds, 1)

    for seed in args.seeds:
        root = Path(args.out) / args.task / f"seed{seed}"
        base = merge(merge(spec["base"], {"train": {"seed": seed}, "model": {"seed": seed}}), extra)
        for name in ("nocot-sft", "cot-sft"):
            t0 = time.perf_counter()
            record(name, seed, train_eval(base, root / name, {"name": name}, report)["none"], time.perf_counter() - t0)
        cot = str(root / "cot-sft" / "best")
        from_cot = {"train": {"init_from": cot}}
        for name, method, probes in (
            ("coconut", {**COCONUT["method"], "name": "coconut"}, ("zero", "noise", "shuffle")),
            ("pause", {**COCONUT["method"], "name": "pause"}, ()),
            ("softcot-answer", {"name": "softcot", "mode": "answer", "assistant": cot}, ("zero", "noise", "shuffle")),
            ("softcot-chain", {"name": "softcot", "mode": "chain", "assistant": cot}, ()),
        ):
            t0 = time.perf_counter()
            cfg = merge(from_cot, {k: v for k, v in COCONUT.items() if k != "method"}) if name in ("coconut", "pause") \
                else merge(from_cot, {"train": {"max_steps": 300}, "optim": {"lr": 1e-3}})
            out = train_eval(base, root / name, method, report, cfg, probes)
            record(name, seed, out["none"], time.perf_counter() - t0)
            for probe in probes:
                record(f"{name}-probe-{probe}", seed, out[probe])
        t0 = time.perf_counter()
        st = {"name": "soft-thinking"}
        record("soft-thinking", seed, train_eval(merge(base, {"model": {"name_or_path": cot}}), root / "soft-thinking",
                                                  st, report)["none"], time.perf_counter() - t0)
        write_results(f"baselines_{args.task}", " ".join(["python benchmarks/bench_baselines.py", *sys.argv[1:]]), rows)

    for method, items in per_method.items():
        for metric, key in (("accuracy", "accuracy"), ("reasoning_positions", "mean_reasoning_positions")):
            values = [s[key] for _, s in items]
            rows.append({"task": args.task, "model": model, "method": method, "seed": "mean", "split": report,
                         "metric": metric, "value": round(statistics.mean(values), 4), "n": items[0][1]["n"],
                         "seeds": [seed for seed, _ in items], "std": round(statistics.pstdev(values), 4),
                         "min": min(values), "max": max(values)})
    rows.append({"task": args.task, "model": model, "method": "all", "metric": "bench_wall_seconds",
                 "value": round(time.perf_counter() - t_start, 1), "n": len(args.seeds)})
    path = write_results(f"baselines_{args.task}", " ".join(["python benchmarks/bench_baselines.py", *sys.argv[1:]]), rows)
    print(path)


if __name__ == "__main__":
    main()
