"""Soft Thinking against plain CoT decoding, training-free, SmolLM2-135M-Instruct on GSM8K-Aug valid.

    python benchmarks/bench_soft_thinking_smollm2.py [--limit 200]

Both in one run, same prompt (the task's instruction and the question, in the chat template),
same model, same harness, batch 32: ``cot-decoding`` is the model writing its reasoning greedily
(192 new tokens, as ``zero_shot_smollm2``), ``soft-thinking`` feeds the paper's filtered mixture
(T 0.6, top-k 30, top-p 0.95, min-p 0.001, 10 tokens mixed) for up to 96 steps (cold stop after 16
consecutive steps with entropy below 0.01), then decodes up to 96 tokens. Reported: accuracy
(strict ``####`` and flexible last number), reasoning positions (latent steps + chain tokens before
the answer line), seconds per question. Each evaluation resumes if stopped. Writes
benchmarks/results/soft_thinking_smollm2.json.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common import ROOT, write_results

from latentreason.config import load_run_config
from latentreason.recipes import run_eval

SETTINGS = {
    "cot-decoding": ["method.name=zero-shot", "method.prompt=instruction", "rollout.max_new_tokens=192"],
    "soft-thinking": ["method.name=soft-thinking", "method.num_latent_steps=96", "method.cold_stop_steps=16",
                      "rollout.max_new_tokens=96"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-soft-thinking-smollm2"))
    args = ap.parse_args()
    rows = []
    for method, overrides in SETTINGS.items():
        run = load_run_config(ROOT / "configs" / "zero_shot_gsm8k_aug_smollm2.yaml",
                              [*overrides, f"eval.limit={args.limit}", f"eval.output_dir={Path(args.out) / method}"])
        s = run_eval(run)
        base = {"task": s["task"], "model": "smollm2-135m", "method": method, "split": s["split"], "n": s["n"]}
        rows += [{**base, "metric": "accuracy", "value": s["accuracy"], "ci95": s["accuracy_ci95"]},
                 {**base, "metric": "accuracy_flexible", "value": s["accuracy_flexible"]},
                 {**base, "metric": "reasoning_positions", "value": s["mean_reasoning_positions"],
                  "mean_latent_steps": s.get("mean_latent_steps")},
                 {**base, "metric": "seconds_per_question", "value": round(1 / s["questions_per_second"], 3)}]
    path = write_results("soft_thinking_smollm2", "python benchmarks/bench_soft_thinking_smollm2.py " + " ".join(sys.argv[1:]), rows)
    print(path)
    for r in rows:
        print(f"{r['method']:15} {r['metric']:22} {r['value']:.4f}  n={r['n']}")


if __name__ == "__main__":
    main()
