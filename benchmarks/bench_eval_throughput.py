"""Harness throughput on SmolLM2-135M-Instruct, measured side by side in one process.

    python benchmarks/bench_eval_throughput.py [--n 32] [--max-new-tokens 40] [--reps 2]

- eval_over_hf_generate: questions/s of the harness (``predict``: prompt encoding, the shared
  rollout with CoT decoding, detokenising, scoring) over transformers' ``generate`` (greedy, same
  32 GSM8K-Aug prompts, same batch size 32, same max_new_tokens, eos stopping in both). The
  outputs must be identical token for token, or the comparison is void (checked).
- batch32_over_batch1: harness questions/s at batch 32 over batch 1 on the same prompts.
Repetitions alternate, with the order flipped every other pair (ours/generate, generate/ours)
so that drift on a shared machine cancels; the median of the per-pair ratios is reported.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from common import write_results  # also puts src/ on sys.path

from latentreason.config import load_run_config
from latentreason.data.base import build_task
from latentreason.eval.harness import predict
from latentreason.methods import METHODS
from latentreason.models.loading import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    run = load_run_config(overrides=["model.name_or_path=smollm2-135m", "data.task=gsm8k-aug", "method.name=zero-shot",
                                     f"rollout.max_new_tokens={args.max_new_tokens}"])
    loaded = load_model(run.model)
    task = build_task("gsm8k-aug")
    examples = task.load("valid", limit=args.n)
    method = METHODS.get("zero-shot")(run.method, run, loaded, task)
    tok, model = loaded.tokenizer, loaded.model

    def ours(batch_size: int) -> tuple[float, list[str]]:
        t0 = time.perf_counter()
        preds = predict(method, examples, batch_size)
        return time.perf_counter() - t0, [p.output for p in preds]

    def hf_generate() -> tuple[float, list[str]]:
        t0 = time.perf_counter()
        ids = method.prompt_ids(examples)  # same prompt encoding as the harness
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # same batching as the harness
        outs: dict[int, str] = {}
        for s in range(0, len(order), args.n):
            idx = order[s: s + args.n]
            width = max(len(ids[i]) for i in idx)
            input_ids = torch.full((len(idx), width), loaded.pad_id, dtype=torch.long)
            mask = torch.zeros_like(input_ids)
            for r, i in enumerate(idx):
                input_ids[r, width - len(ids[i]):] = torch.tensor(ids[i])
                mask[r, width - len(ids[i]):] = 1
            with torch.inference_mode():
                gen = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=args.max_new_tokens,
                                     do_sample=False, pad_token_id=loaded.pad_id, eos_token_id=loaded.eos_ids)
            texts = tok.batch_decode(gen[:, width:], skip_special_tokens=True)
            outs.update(zip(idx, texts))
        return time.perf_counter() - t0, [outs[i] for i in range(len(ids))]

    ours(args.n)  # warm-up (allocator, threads)
    ours_s, hf_s = [], []
    for rep in range(args.reps):
        if rep % 2:
            s, hf_text = hf_generate()
            hf_s.append(s)
        s, ours_text = ours(args.n)
        ours_s.append(s)
        if not rep % 2:
            s, hf_text = hf_generate()
            hf_s.append(s)
    same = sum(a == b for a, b in zip(ours_text, hf_text))
    if same != len(ours_text):
        print(f"warning: {len(ours_text) - same} of {len(ours_text)} outputs differ from generate", file=sys.stderr)
    b1_s, b32_s = [], []
    for _ in range(2):  # batch 1 is slow: two pairs, each beside a fresh batch-32 run
        b1_s.append(ours(1)[0])
        b32_s.append(ours(args.n)[0])
    qps = lambda secs: args.n / statistics.median(secs)  # noqa: E731
    pair_ratio = lambda num, den: statistics.median(d / n for n, d in zip(num, den))  # noqa: E731
    common = {"task": "gsm8k-aug", "model": "smollm2-135m", "n": args.n, "max_new_tokens": args.max_new_tokens,
              "reps": args.reps}
    rows = [
        {**common, "method": "cot-decoding", "metric": "eval_over_hf_generate", "value": pair_ratio(ours_s, hf_s),
         "batch_size": args.n, "ours_qps": qps(ours_s), "hf_generate_qps": qps(hf_s), "identical_outputs": same,
         "ours_seconds": [round(x, 2) for x in ours_s], "hf_seconds": [round(x, 2) for x in hf_s]},
        {**common, "method": "cot-decoding", "metric": "batch32_over_batch1", "value": pair_ratio(b32_s, b1_s),
         "batch32_qps": qps(b32_s), "batch1_qps": qps(b1_s), "batch32_seconds": [round(x, 2) for x in b32_s],
         "batch1_seconds": [round(x, 2) for x in b1_s]},
    ]
    path = write_results("eval_throughput_smollm2", "python benchmarks/bench_eval_throughput.py " + " ".join(sys.argv[1:]), rows)
    print(path)
    for r in rows:
        print(f"{r['metric']:24} {r['value']:.3f}  {r}")


if __name__ == "__main__":
    main()
