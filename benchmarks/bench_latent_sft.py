"""Latent-SFT against CoT-SFT on a tiny model: both stages, the superposition metrics, the probes.

    python benchmarks/bench_latent_sft.py --task arith --seeds 0 1 2 [--compression 4]

Per seed, from that seed's CoT-SFT model of ``bench_baselines.py`` (trained here if missing, with
the same recipe): stage 1 (the recipe's steps, each continuing from the previous one's best on
validation), then stage 2 (soft labels exported from the stage-1 encoder), each selected on the
validation split; the stage-2 model is reported on the held-out report split (arith: the
generated test split) with accuracy, #L (latent steps), Pass@1/#L, ECR@1/5/10 (and N_eff / Top-2
where the task has several solutions per question), and under the three probes. The stage-1
model's accuracy with its encoder reading the gold chain (``latent-sft-teacher``) says how much
the latents can carry before the LLM has to produce them. Writes
``benchmarks/results/latent_sft_<task>.json``; ``--collect`` rebuilds it from the runs on disk. Rows
``latent-sft-stage1`` / ``latent_top1_weight`` and ``latent_distinct_top1`` say whether the encoder
collapsed (every latent one token with weight ~1: latents that carry nothing).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench_baselines import PROBES, TASKS, train_eval
from common import ROOT, seed_mean_rows, write_results

from latentreason.config import merge, parse_overrides
from latentreason.demo import LATENT_SFT_STAGE1, LATENT_SFT_STAGE2

METRICS = ("accuracy", "reasoning_positions", "pass_at_1_over_latent_steps", "ecr@1", "ecr@5", "ecr@10", "n_eff",
           "n_eff_over_naive", "top2")


def collect(root: Path, task: str, model: str, report: str, seeds: list[int], rate: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    values: dict[tuple[str, str], list[tuple[int, float]]] = {}

    def add(method: str, seed: int, metric: str, value: Any, n: int, **extra: Any) -> None:
        if value is None:
            return
        rows.append({"task": task, "model": model, "method": method, "seed": seed, "split": report, "metric": metric,
                     "value": round(value, 4) if isinstance(value, float) else value, "n": n, "compression": rate,
                     **extra})
        values.setdefault((method, metric), []).append((seed, value))

    for seed in seeds:
        folder = root / task / f"seed{seed}" / f"latent-sft-r{rate}"
        for method, sub in [("latent-sft", f"stage2/eval-{report}"), ("latent-sft-teacher", f"stage1/eval-{report}")] + \
                [(f"latent-sft-probe-{p}", f"stage2/eval-{report}-probe-{p}") for p in PROBES]:
            path = folder / sub / "summary.json"
            if not path.exists():
                continue
            s = json.loads(path.read_text())
            add(method, seed, "accuracy", s["accuracy"], s["n"], ci95=s["accuracy_ci95"])
            if method == "latent-sft":
                add(method, seed, "reasoning_positions", s["mean_reasoning_positions"], s["n"])
                for key in METRICS[2:]:
                    add(method, seed, key, s.get(key), s.get("n_eff_questions", s["n"]) if key in ("n_eff", "n_eff_over_naive", "top2") else s["n"])
        log = folder / "stage1" / "log.jsonl"
        if log.exists():  # the encoder's latents at the end of stage 1: has it collapsed to one token?
            last = [r for r in map(json.loads, log.read_text().splitlines()) if "latent_top1_weight" in r][-1:]
            rows += [{"task": task, "model": model, "method": "latent-sft-stage1", "seed": seed, "split": "train",
                      "metric": key, "value": round(last[0][key], 4), "n": 64, "compression": rate,
                      "note": "last logged window of stage 1 (batches of 64); distinct = distinct top-1 tokens / latents"}
                     for key in ("latent_top1_weight", "latent_distinct_top1") if last]
    return rows + seed_mean_rows(values, task=task, model=model, split=report, compression=rate)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="arith", choices=list(TASKS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--compression", type=int, default=4, help="r: chain tokens per latent token")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-baselines"), help="the runs of bench_baselines.py")
    ap.add_argument("--collect", action="store_true", help="only rebuild the result file from the runs on disk")
    ap.add_argument("overrides", nargs="*", help="section.field=value for every run")
    args = ap.parse_args()
    spec, report = TASKS[args.task], TASKS[args.task]["report"]
    model = spec["base"]["model"]["name_or_path"]
    extra = parse_overrides(args.overrides)
    rate = {"method": {"compression": args.compression}}
    for seed in [] if args.collect else args.seeds:
        root = Path(args.out) / args.task / f"seed{seed}"
        base = merge(merge(spec["base"], {"train": {"seed": seed}, "model": {"seed": seed}}), extra)
        train_eval(base, root / "cot-sft", {"name": "cot-sft"}, report)
        folder = root / f"latent-sft-r{args.compression}"
        one = merge(merge(LATENT_SFT_STAGE1, rate), {"train": {"init_from": str(root / "cot-sft" / "best")}})
        train_eval(base, folder / "stage1", one["method"], report, {k: v for k, v in one.items() if k != "method"})
        two = merge(merge(LATENT_SFT_STAGE2, rate), {"train": {"init_from": str(folder / "stage1" / "best")}})
        train_eval(base, folder / "stage2", two["method"], report, {k: v for k, v in two.items() if k != "method"},
                   PROBES)
    command = " ".join(["python benchmarks/bench_latent_sft.py", *[a for a in sys.argv[1:] if a != "--collect"]])
    path = write_results(f"latent_sft_{args.task}", command,
                         collect(Path(args.out), args.task, model, report, args.seeds, args.compression))
    print(path)


if __name__ == "__main__":
    main()
