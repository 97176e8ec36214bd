"""Rows that finished stepping aside (``rollout.compact``), side by side on SmolLM2-135M.

    python benchmarks/bench_compact.py [--limit 64] [--reps 3] [--at 0.5 0.75 1]

A batch runs its latent loop until its longest chain stops and decodes until its longest answer
ends; without compaction every finished row keeps stepping, masked, until then. With it, once at
most a share ``rollout.compact_at`` (``--at``; default 0.5) of the batch is still going, the others
step aside: rows that stopped reasoning wait (their cache kept for their answer), rows that wrote
their eos leave; each narrowing copies the served rows' cache. On these CPU cores a step's cost
grows with the rows it computes, so this is where shorter chains and answers become wall-clock.

Workloads (GSM8K-Aug valid, the first ``--limit`` questions, batch 32, greedy):

- ``cot-sft``: bench_latent_sft_smollm2.py's short CoT-SFT model (answers of 33 tokens on average,
  up to 96); skipped with a message where that run is not on disk;
- ``soft-thinking``: SmolLM2-135M-Instruct as shipped, Soft Thinking (training-free; rows stop
  reasoning at different steps, by its cold stop or the answer delimiter).

Rows, one set per ``compact_at`` (its field): ``compact_speedup`` (seconds without / with, median
over alternating rounds after a warm-up, every setting in the same rounds), ``latent_speedup`` and
``decode_speedup`` (the same for one phase: the medians of its seconds), and
``latent_row_steps_share`` / ``decode_row_steps_share`` (row-steps computed with compaction over
without; 1 where nothing stepped aside: a control whose ratio is the timing noise). The outputs
must be identical (checked), or the comparison is void. Writes
``benchmarks/results/compact_smollm2.json``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from typing import Any

from common import ROOT, alternate_timings, write_results

from latentreason.config import load_run_config
from latentreason.methods.base import generate_batches
from latentreason.recipes import build_method

COT_SFT = ROOT / "runs" / "bench-latent-sft-smollm2" / "cot-sft" / "final"
SOFT_THINKING = ["model.name_or_path=smollm2-135m", "data.task=gsm8k-aug", "method.name=soft-thinking",
                 "method.num_latent_steps=96", "method.cold_stop_steps=16", "rollout.max_new_tokens=96"]
BATCH = 32


def workloads() -> dict[str, tuple[list[str], bool]]:
    """name -> (overrides, read the model folder's saved settings)."""
    out = {"soft-thinking": (SOFT_THINKING, False)}
    if (COT_SFT / "run_config.yaml").exists():
        out = {"cot-sft": ([f"model.name_or_path={COT_SFT}"], True), **out}
    else:
        print(f"{COT_SFT}: not on disk (python benchmarks/bench_latent_sft_smollm2.py makes it); timing soft-thinking only")
    return out


def measure(name: str, overrides: list[str], saved: bool, limit: int, reps: int, ats: list[float]) -> list[dict[str, Any]]:
    settings = {"false": ["rollout.compact=false"], **{f"{at:g}": ["rollout.compact=true", f"rollout.compact_at={at}"] for at in ats}}
    runs = {key: load_run_config(overrides=overrides + ["eval.split=valid", *extra], saved_base=saved)
            for key, extra in settings.items()}
    method = build_method(runs["false"])
    examples = method.task.load("valid", limit=limit)
    texts: dict[str, list[str]] = {}
    row_steps: dict[str, dict[str, float]] = {}  # loop -> setting -> row-steps computed
    for flag, run in runs.items():  # outputs and row-steps, once each (greedy: deterministic)
        method.run = run
        texts[flag] = []
        for done in generate_batches(method, examples, batch_size=BATCH):
            texts[flag] += done.texts
            for loop in ("latent", "decode"):
                share = row_steps.setdefault(loop, {})
                share[flag] = share.get(flag, 0.0) + done.output.timings[f"{loop}_row_steps"]
    for key in settings:
        same = sum(a == b for a, b in zip(texts["false"], texts[key]))
        if same != len(examples):
            raise SystemExit(f"{name}: {len(examples) - same} of {len(examples)} outputs differ with rollout.compact_at={key}")
    seconds, phases = alternate_timings(method, examples, runs, batch_size=BATCH, reps=reps)
    rows = []
    for key in settings:
        if key == "false":
            continue
        base = {"task": "gsm8k-aug", "model": "smollm2-135m", "method": name, "n": len(examples), "split": "valid",
                "batch_size": BATCH, "compact_at": float(key), "identical_outputs": len(examples), "reps": reps}
        total = [a / b for a, b in zip(seconds["false"], seconds[key])]
        rows.append({**base, "metric": "compact_speedup", "value": round(statistics.median(total), 3),
                     "ratios": [round(r, 3) for r in total],
                     "seconds": {k: [round(v, 2) for v in seconds[k]] for k in ("false", key)},
                     "phase_seconds": {k: phases[k] for k in ("false", key)}})
        for loop, steps in row_steps.items():
            if not steps["false"]:
                continue  # no latent loop (CoT)
            pair = {k: steps[k] for k in ("false", key)}
            extra = {} if steps[key] < steps["false"] else {
                "note": "nothing stepped aside at this setting: both computed the same row-steps; a control, "
                        "whose ratio is the timing noise"}
            rows += [{**base, "metric": f"{loop}_speedup", "value": round(phases["false"][loop] / phases[key][loop], 3), **extra},
                     {**base, "metric": f"{loop}_row_steps_share", "value": round(steps[key] / steps["false"], 4),
                      "row_steps": pair, **extra}]
    return rows


def noise_note(rows: list[dict[str, Any]]) -> str:
    """How far one setting's time moved between rounds: differences between settings smaller than
    this are not told apart by the timings (the row-step shares are exact counts)."""
    spans = {}
    for r in rows:
        if r["metric"] == "compact_speedup":
            for setting, secs in r["seconds"].items():
                spans[(r["method"], setting)] = (min(secs), max(secs))
    if not spans:
        return ""
    (method, setting), (lo, hi) = max(spans.items(), key=lambda kv: kv[1][1] / kv[1][0])
    label = "without compaction" if setting == "false" else f"compact_at={setting}"
    return (f" Between rounds one setting's time moved by up to {hi / lo - 1:.0%} ({method} {label}: {lo:.1f} to "
            f"{hi:.1f} s): speedups that differ by less are not told apart here; the row-step shares are exact counts.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=64, help="questions (the first of GSM8K-Aug valid)")
    ap.add_argument("--reps", type=int, default=3, help="alternating rounds after the warm-up")
    ap.add_argument("--at", type=float, nargs="+", default=[0.5], help="rollout.compact_at settings, each against compact=false")
    args = ap.parse_args()
    rows = []
    for name, (overrides, saved) in workloads().items():
        got = measure(name, overrides, saved, args.limit, args.reps, args.at)
        for r in got:
            print(name, r["compact_at"], r["metric"], r["value"], flush=True)
        rows += got
    note = (f"SmolLM2-135M-Instruct on 2 CPU cores, batch {BATCH}, greedy, the first {args.limit} GSM8K-Aug valid questions; "
            "cot-sft is the short (48-step) CoT-SFT model of bench_latent_sft_smollm2.py, soft-thinking the shipped model. "
            "Outputs identical with and without compaction, at every compact_at (checked). Timings alternate back to back "
            "after a warm-up round, every setting in the same rounds; a phase's speedup is the ratio of its median seconds."
            + noise_note(rows))
    ats = " ".join(f"{a:g}" for a in args.at)
    print(write_results("compact_smollm2", f"python benchmarks/bench_compact.py --limit {args.limit} --reps {args.reps} --at {ats}",
                        rows, note=note))


if __name__ == "__main__":
    sys.exit(main())
