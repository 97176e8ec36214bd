"""SmolLM2-135M-Instruct on 200 rows of GSM8K-Aug valid: zero-shot, then after a short CoT-SFT.

    python benchmarks/bench_smollm2_gsm8k.py [--limit 200] [--train-steps 60]

The CoT-SFT run trains on GSM8K train with equation-only chains (the gsm8k-aug task's train
split, which excludes every GSM8K-Aug valid question) and is evaluated exactly like the
zero-shot model (both with the task's format instruction in the prompt: method.prompt=instruction,
not the zero-shot method's bare default). Both phases resume if the script is stopped and rerun. Writes
benchmarks/results/smollm2_gsm8k.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from common import ROOT, summary_rows, write_results

from latentreason.recipes import run_eval, run_train
from latentreason.config import load_run_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--train-steps", type=int, default=60)
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-smollm2-gsm8k"))
    args = ap.parse_args()
    out = Path(args.out)
    rows = []

    zero = load_run_config(ROOT / "configs" / "zero_shot_gsm8k_aug_smollm2.yaml",
                           ["method.prompt=instruction", f"eval.limit={args.limit}", f"eval.output_dir={out / 'zero-shot'}"])
    summary = run_eval(zero)
    rows += summary_rows(summary, "smollm2-135m", "zero-shot", max_new_tokens=zero.rollout.max_new_tokens)

    train_dir = out / "cot-sft"
    sft = load_run_config(ROOT / "configs" / "cot_sft_gsm8k_smollm2.yaml",
                          [f"train.output_dir={train_dir}", f"train.max_steps={args.train_steps}",
                           "train.select_on_valid=false", f"eval.limit={args.limit}",
                           f"eval.output_dir={train_dir / 'eval-valid'}"])
    t0 = time.perf_counter()
    run_train(sft)
    train_s = time.perf_counter() - t0
    log = [json.loads(x) for x in (train_dir / "log.jsonl").read_text().splitlines()]
    sft.model.name_or_path = str(train_dir / "final")
    summary = run_eval(sft)
    extra = {"train_steps": args.train_steps, "global_batch_size": sft.train.global_batch_size,
             "train_task": "gsm8k-aug train (GSM8K train, equation chains)", "max_new_tokens": sft.rollout.max_new_tokens}
    rows += summary_rows(summary, "smollm2-135m", "cot-sft", **extra)
    losses = [r["loss"] for r in log if "loss" in r]
    rows.append({"task": "gsm8k-aug", "model": "smollm2-135m", "method": "cot-sft", "metric": "train_loss_last",
                 "value": losses[-1], "n": args.train_steps, "first_logged_loss": losses[0],
                 "train_seconds_this_run": round(train_s, 1)})
    path = write_results("smollm2_gsm8k", "python benchmarks/bench_smollm2_gsm8k.py " + " ".join(sys.argv[1:]), rows)
    print(path)
    for r in rows:
        print(f"{r['method']:10} {r['metric']:26} {r['value']:.4f}  n={r['n']}")


if __name__ == "__main__":
    main()
