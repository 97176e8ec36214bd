"""Rollout cost on SmolLM2-135M-Instruct: loading, and one latent step against one decode step.

    python benchmarks/bench_rollout.py [--reps 7] [--latent-steps 32] [--decode-tokens 33] [--batch-sizes 1 8]

Writes benchmarks/results/rollout_smollm2.json with these rows, all measured in this one process:

- load_seconds, method gguf: ``load_model("smollm2-135m")`` with an empty cache folder (a fresh
  temporary ``$LATENTREASON_CACHE``), so it dequantises the packaged GGUF and writes the cache.
- load_seconds, method cached: the same call once that cache exists.
- latent_step_over_decode_step, methods hidden / topk (mixture, top_k=10) / full (mixture over
  the whole vocabulary): the time of one latent step (a forward of one ``inputs_embeds`` column
  through the KV cache, the step function building the next vector, and the rollout's own
  bookkeeping: kept top-k distribution, masks) over one cached greedy decode step (a forward of
  one token plus the argmax). Both come from the real ``rollout()`` timings after the same
  ~100-token GSM8K-style chat prompt: ``latent_s / K`` from a run with K latent steps, no <eot>
  and one answer token (no decode forward), and ``decode_s / (N - 1)`` from a run with no latent
  step and N answer tokens that never stop early (``eos_ids=[-1]``: N - 1 decode forwards).

Why a ratio: per step both phases read the same weights once, so about 1.0 is the floor for
hidden and top-k; the full-vocabulary mixture also reads the V x D embedding once more (the size
of the LM head), about 1.2. The machine is noisy, so repetitions are interleaved (decode, hidden,
topk, full, decode, ...; the order rotates each repetition), the first is a discarded warm-up,
and the value is the median over repetitions of the per-repetition ratio.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import hardware  # also puts src/ on sys.path

from latentreason.io import atomic_write_json
from latentreason.models.loading import LoadedModel, load_model
from latentreason.models.rollout import RolloutConfig, rollout
from latentreason.models.steps import HiddenStateStep, LatentStep, MixtureStep

MODEL = "smollm2-135m"
OUT = Path(__file__).resolve().parent / "results" / "rollout_smollm2.json"
COMMAND = "python benchmarks/bench_rollout.py"
# GSM8K-style questions (written for this benchmark), ~100 tokens each in the chat template.
QUESTIONS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?",
    "Betty is saving money for a new wallet which costs $100. Betty has only half of the money she needs. Her parents "
    "decided to give her $15 for that purpose, and her grandparents twice as much as her parents. How much more money "
    "does Betty need to buy the wallet?",
    "James writes a 3-page letter to 2 different friends twice a week. How many pages does he write a year?",
    "Mark has a garden with flowers. He planted plants of three different colors in it. Ten of them are yellow, and "
    "there are 80% more of those in purple. How many flowers does Mark have in his garden?",
    "Albert is wondering how much pizza he can eat in one day. He buys 2 large pizzas and 2 small pizzas. A large "
    "pizza has 16 slices and a small pizza has 8 slices. How many pieces does he eat that day?",
    "Ken created a care package to send to his brother. He placed a box on a scale and poured in enough jelly beans "
    "to bring the weight to 2 pounds. How much did the box weigh at the end?",
    "Alexis is applying for a new job and bought a new set of business clothes to wear to the interview. She went to "
    "a department store with a budget of $200. How much did she pay for the shoes?",
]
INSTRUCTION = " Think step by step, then give the final answer as a number after '####'."


def time_loads(reps: int) -> tuple[list[dict], LoadedModel]:
    """Median seconds of a first (dequantising) and a cached load, each in a fresh temporary cache.

    Returns the rows and the last model loaded (its weights are in memory; the cache folder goes).
    """
    gguf, cached = [], []
    lm = None
    before = os.environ.get("LATENTREASON_CACHE")
    try:
        for _ in range(reps):
            with tempfile.TemporaryDirectory(prefix="latentreason-bench-") as tmp:
                os.environ["LATENTREASON_CACHE"] = tmp
                t0 = time.perf_counter()
                load_model(MODEL)  # empty cache: dequantises the GGUF and writes it
                gguf.append(time.perf_counter() - t0)
                for _ in range(2):
                    t0 = time.perf_counter()
                    lm = load_model(MODEL)
                    cached.append(time.perf_counter() - t0)
                print(f"load: gguf {gguf[-1]:.2f}s, cached {cached[-2]:.2f}s {cached[-1]:.2f}s", flush=True)
    finally:
        if before is None:
            os.environ.pop("LATENTREASON_CACHE", None)
        else:
            os.environ["LATENTREASON_CACHE"] = before
    base = {"task": "-", "model": MODEL, "metric": "load_seconds"}
    rows = [
        {**base, "method": "gguf", "value": round(statistics.median(gguf), 3), "n": len(gguf),
         "runs": [round(x, 3) for x in gguf]},
        {**base, "method": "cached", "value": round(statistics.median(cached), 3), "n": len(cached),
         "runs": [round(x, 3) for x in cached]},
    ]
    assert lm is not None
    return rows, lm


def prompts(lm: LoadedModel, batch_size: int) -> list[list[int]]:
    out = []
    for q in QUESTIONS[:batch_size]:
        text = lm.tokenizer.apply_chat_template([{"role": "user", "content": q + INSTRUCTION}], tokenize=False,
                                                add_generation_prompt=True)
        out.append(lm.tokenizer.encode(text, add_special_tokens=False))
    return out


def time_steps(lm: LoadedModel, batch_size: int, reps: int, latent_steps: int, decode_tokens: int) -> list[dict]:
    batch = prompts(lm, batch_size)
    steps: dict[str, LatentStep] = {"hidden": HiddenStateStep(), "topk": MixtureStep(top_k=10), "full": MixtureStep(top_k=0)}

    def decode_ms() -> float:
        out = rollout(lm.model, batch, None, RolloutConfig(num_latent_steps=0, max_new_tokens=decode_tokens),
                      eos_ids=[-1], pad_id=lm.pad_id)
        assert out.timings["forwards"] == decode_tokens, out.timings  # prefill + N - 1 decode forwards
        return 1000 * out.timings["decode_s"] / (decode_tokens - 1)

    def latent_ms(step: LatentStep) -> float:
        cfg = RolloutConfig(num_latent_steps=latent_steps, max_new_tokens=1, feed_eot=False)
        out = rollout(lm.model, batch, step, cfg, eos_ids=[-1], pad_id=lm.pad_id, eot_id=lm.eot_id)
        assert out.timings["forwards"] == 1 + latent_steps, out.timings  # prefill + K latent forwards
        return 1000 * out.timings["latent_s"] / latent_steps

    jobs = {"decode": decode_ms, **{name: (lambda s=s: latent_ms(s)) for name, s in steps.items()}}
    order = list(jobs)
    times: dict[str, list[float]] = {name: [] for name in jobs}
    with torch.inference_mode():
        for rep in range(reps + 1):
            rotated = order[rep % len(order):] + order[: rep % len(order)]
            got = {name: jobs[name]() for name in rotated}
            if rep == 0:
                continue  # warm-up
            for name, ms in got.items():
                times[name].append(ms)
            print(f"batch {batch_size} rep {rep}: " + ", ".join(f"{k} {v:.1f}ms" for k, v in got.items()), flush=True)
    decode = times["decode"]
    rows = []
    for name in steps:
        ratios = [lat / dec for lat, dec in zip(times[name], decode)]
        rows.append({
            "task": "-", "model": MODEL, "method": name, "metric": "latent_step_over_decode_step",
            "value": round(statistics.median(ratios), 3), "n": reps, "batch_size": batch_size,
            "latent_ms": round(statistics.median(times[name]), 2), "decode_ms": round(statistics.median(decode), 2),
            "ratio_min": round(min(ratios), 3), "ratio_max": round(max(ratios), 3),
            "num_latent_steps": latent_steps, "decode_steps": decode_tokens - 1,
            "prompt_tokens": [len(p) for p in batch], "dtype": "float32", "threads": torch.get_num_threads(),
        })
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=7, help="timed repetitions per batch size (after one warm-up)")
    ap.add_argument("--load-reps", type=int, default=2, help="first + cached load repetitions")
    ap.add_argument("--latent-steps", type=int, default=32)
    ap.add_argument("--decode-tokens", type=int, default=33)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=OUT, help="result file (the default is the one the project keeps)")
    args = ap.parse_args()
    if max(args.batch_sizes) > len(QUESTIONS):
        ap.error(f"--batch-sizes: at most {len(QUESTIONS)} (one prompt per question)")
    torch.set_num_threads(args.threads)

    rows, lm = time_loads(max(1, args.load_reps))
    for batch_size in args.batch_sizes:
        rows += time_steps(lm, batch_size, args.reps, args.latent_steps, args.decode_tokens)
    doc = {"benchmark": "rollout_smollm2", "command": COMMAND, "hardware": hardware(),
           "date": dt.date.today().isoformat(), "rows": rows}
    atomic_write_json(args.out, doc)
    for row in rows:
        extra = ""
        if "batch_size" in row:
            extra = f" (batch {row['batch_size']}, latent {row['latent_ms']} ms / decode {row['decode_ms']} ms)"
        print(f"{row['metric']:30} {row['method']:7} {row['value']}{extra}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
