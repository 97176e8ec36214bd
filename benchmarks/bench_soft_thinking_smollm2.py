"""Soft Thinking against plain CoT decoding, training-free, SmolLM2-135M-Instruct on GSM8K-Aug valid.

    python benchmarks/bench_soft_thinking_smollm2.py [--limit 200]

Both in one run, same prompt (the task's instruction and the question, in the chat template),
same model, same harness, batch 32: ``cot-decoding`` is the model writing its reasoning greedily
(192 new tokens, as ``zero_shot_smollm2``), ``soft-thinking`` feeds the paper's filtered mixture
(T 0.6, top-k 30, top-p 0.95, min-p 0.001, 10 tokens mixed) for up to 96 steps (cold stop after 16
consecutive steps with entropy below 0.01, or at the step whose top token is ``####``), then decodes
up to 96 tokens. Reported: accuracy
(strict ``####`` and flexible last number), reasoning positions (latent steps + chain tokens before
the answer line), seconds per question (timed side by side: both methods on the first
``--speed-limit`` questions, alternating, in one process; the full runs' times are kept beside). Each evaluation resumes if stopped. Writes
benchmarks/results/soft_thinking_smollm2.json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from common import ROOT, write_results

import yaml

from latentreason.config import load_run_config, merge
from latentreason.recipes import run_eval

SETTINGS = {
    "cot-decoding": {"method": {"name": "zero-shot", "prompt": "instruction"}, "rollout": {"max_new_tokens": 192}},
    "soft-thinking": {"method": {"name": "soft-thinking", "num_latent_steps": 96, "cold_stop_steps": 16},
                      "rollout": {"max_new_tokens": 96}},
}


def _run(method: str, limit: int, out: Path) -> dict:
    data = yaml.safe_load((ROOT / "configs" / "zero_shot_gsm8k_aug_smollm2.yaml").read_text())
    data["method"] = {}  # the zero-shot settings of the file are not soft-thinking's
    run = load_run_config(base=merge(data, SETTINGS[method]), overrides=[f"eval.limit={limit}", f"eval.output_dir={out}"])
    return run_eval(run)


def side_by_side(limit: int, reps: int) -> dict[str, list[float]]:
    """Seconds per question of both methods on the same ``limit`` questions, alternating, ``reps``
    times each, in fresh folders: the full evaluations run minutes apart on a shared machine."""
    import tempfile

    seconds: dict[str, list[float]] = {m: [] for m in SETTINGS}
    for rep in range(reps):
        for method in (list(SETTINGS) if rep % 2 == 0 else list(SETTINGS)[::-1]):
            with tempfile.TemporaryDirectory() as tmp:
                seconds[method].append(1 / _run(method, limit, Path(tmp))["questions_per_second"])
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-soft-thinking-smollm2"))
    ap.add_argument("--speed-limit", type=int, default=32, help="questions timed side by side (0: report the full runs' times)")
    ap.add_argument("--speed-reps", type=int, default=2, help="alternating repetitions of the side-by-side timing")
    args = ap.parse_args()
    rows = []
    timed = side_by_side(args.speed_limit, args.speed_reps) if args.speed_limit else {}
    for method in SETTINGS:
        s = _run(method, args.limit, Path(args.out) / method)
        base = {"task": s["task"], "model": "smollm2-135m", "method": method, "split": s["split"], "n": s["n"]}
        full = round(1 / s["questions_per_second"], 3)
        if timed:
            speed = {**base, "metric": "seconds_per_question", "value": round(statistics.median(timed[method]), 3),
                     "n": args.speed_limit, "runs": [round(x, 3) for x in timed[method]], "full_run_value": full,
                     "note": f"median of {args.speed_reps} alternating runs on the first {args.speed_limit} questions, batch 32"}
        else:
            speed = {**base, "metric": "seconds_per_question", "value": full}
        rows += [{**base, "metric": "accuracy", "value": s["accuracy"], "ci95": s["accuracy_ci95"]},
                 {**base, "metric": "accuracy_flexible", "value": s["accuracy_flexible"]},
                 {**base, "metric": "reasoning_positions", "value": s["mean_reasoning_positions"],
                  "mean_latent_steps": s.get("mean_latent_steps")},
                 speed]
    path = write_results("soft_thinking_smollm2", "python benchmarks/bench_soft_thinking_smollm2.py " + " ".join(sys.argv[1:]), rows)
    print(path)
    for r in rows:
        print(f"{r['method']:15} {r['metric']:22} {r['value']:.4f}  n={r['n']}")


if __name__ == "__main__":
    main()
