"""SmolLM2-135M-Instruct zero-shot on GSM8K-Aug valid, with the task instruction and with the bare question.

    python benchmarks/bench_zero_shot_prompts.py [--limit 200]

Why: a zero-shot baseline handicapped by its prompt flatters every method compared with it. The
task instruction asks for ``<<a=b>>`` annotations and a ``####`` line, which a 135M model does not
follow; the bare question (chat template, no instruction) is the zero-shot default for chat models.
Both are scored strict (``####``) and flexible (last number). Greedy, 192 new tokens, batch 32.
Each evaluation resumes if the script is stopped and rerun. Writes
benchmarks/results/zero_shot_smollm2.json (methods ``zero-shot`` = instruction, ``zero-shot-bare``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common import ROOT, summary_rows, write_results

from latentreason.config import load_run_config
from latentreason.recipes import run_eval


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-zero-shot-prompts"))
    args = ap.parse_args()
    rows = []
    for method, prompt in (("zero-shot", "instruction"), ("zero-shot-bare", "bare")):
        out = Path(args.out) / method
        run = load_run_config(ROOT / "configs" / "zero_shot_gsm8k_aug_smollm2.yaml",
                              [f"method.prompt={prompt}", f"eval.limit={args.limit}", f"eval.output_dir={out}"])
        summary = run_eval(run)
        preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
        at_cap = sum(p["generated_tokens"] >= run.rollout.max_new_tokens for p in preds)
        extra = {"prompt": prompt, "max_new_tokens": run.rollout.max_new_tokens}
        rows += summary_rows(summary, "smollm2-135m", method, **extra)
        rows.append({"task": summary["task"], "model": "smollm2-135m", "method": method, "split": summary["split"],
                     **extra, "metric": "fraction_at_token_cap", "value": at_cap / len(preds), "n": len(preds)})
    path = write_results("zero_shot_smollm2", "python benchmarks/bench_zero_shot_prompts.py " + " ".join(sys.argv[1:]), rows)
    print(path)
    for r in rows:
        print(f"{r['method']:15} {r['metric']:26} {r['value']:.4f}  n={r['n']}")


if __name__ == "__main__":
    main()
