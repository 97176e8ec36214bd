"""Tiny model on the generated ``arith`` task: CoT-SFT vs no-CoT SFT (the demo's recipe).

    python benchmarks/bench_arith.py [section.field=value ...]

Trains both with the embedded demo configuration (checkpoints selected on the validation
split), evaluates on the held-out generated test split, and writes
benchmarks/results/arith_sft.json (accuracy, flexible accuracy, reasoning positions, and the
wall-clock of the whole demo).
"""
from __future__ import annotations

import sys
import time

from common import ROOT, summary_rows, write_results

from latentreason.demo import DEMO_BASE, run_demo


def main() -> None:
    overrides = sys.argv[1:]
    t0 = time.perf_counter()
    summaries = run_demo(output_dir=str(ROOT / "runs" / "bench-arith"), overrides=overrides)
    seconds = time.perf_counter() - t0
    model = DEMO_BASE["model"]["name_or_path"]
    rows = []
    for s in summaries:
        rows += summary_rows(s, model, s["method"], num_steps=DEMO_BASE["data"]["options"]["num_steps"])
    rows.append({"task": "arith", "model": model, "method": "demo", "metric": "demo_wall_seconds",
                 "value": round(seconds, 1), "n": 1, "note": "both trainings + validation selection + both evaluations"})
    path = write_results("arith_sft", "python benchmarks/bench_arith.py " + " ".join(overrides), rows)
    print(path)


if __name__ == "__main__":
    main()
