"""Cost of one Coconut training step at the final stage against one CoT-SFT step, same examples.

    python benchmarks/bench_coconut_cost.py                                   # SmolLM2-135M, GSM8K-Aug
    python benchmarks/bench_coconut_cost.py --model tiny-llama-l4-d128 --task arith --batch 64

One model, one AdamW optimizer; each repetition runs a CoT-SFT step (the chain and the answer,
teacher-forced in one pass) and a Coconut step at its final stage (c x max_stage thoughts, one
pass each over a growing KV cache with gradients through all of them, then the answer in one
pass) on the same batch, forward + backward + optimizer step, in alternating order. Writes
``benchmarks/results/coconut_cost_<model>.json``: ``train_step_over_cot_step`` (median of the
per-repetition ratios) with both medians in seconds. The thoughts replace the chain, so the
ratio depends on how long the chains are: the mean chain length in tokens is reported.
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch
from common import timed_train_step, write_results

from latentreason.config import load_run_config
from latentreason.methods.base import METHODS, build_method


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="gsm8k-aug")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--thoughts-per-step", type=int, default=2)
    ap.add_argument("--max-stage", type=int, default=3)
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--options", default="{}", help="task options as YAML, e.g. '{num_steps: 6}'")
    args = ap.parse_args()
    run = load_run_config(overrides=[
        f"model.name_or_path={args.model}", f"data.task={args.task}", f"data.options={args.options}",
        "method.name=coconut", f"method.thoughts_per_step={args.thoughts_per_step}", f"method.max_stage={args.max_stage}",
        "model.device=cpu", "train.max_steps=1000"])
    coconut = build_method(run, training=True)
    coconut.set_stage(len(coconut.stages()) - 1, coconut.stages()[-1])
    cot = METHODS.get("cot-sft")(METHODS.get("cot-sft").config_cls(), run, coconut.loaded, coconut.task)
    model = coconut.loaded.model
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    examples = coconut.task.load("train", limit=args.batch * (args.reps + 1))
    modules = torch.nn.ModuleDict({"lm": model})

    times = {"cot": [], "coconut": []}
    chain_tokens = []
    for rep in range(args.reps + 1):  # repetition 0 warms up
        chunk = examples[rep * args.batch: (rep + 1) * args.batch]
        batches = {"cot": cot.collate(chunk), "coconut": coconut.collate(chunk)}
        chain_tokens += [len(coconut.loaded.tokenizer(coconut.task.chain_text(ex), add_special_tokens=False)["input_ids"])
                         for ex in chunk]
        order = ["cot", "coconut"] if rep % 2 == 0 else ["coconut", "cot"]
        for name in order:
            seconds = timed_train_step(cot if name == "cot" else coconut, modules, batches[name], opt)
            if rep:
                times[name].append(seconds)
        if rep:
            print(f"rep {rep}: cot {times['cot'][-1]:.2f}s coconut {times['coconut'][-1]:.2f}s", flush=True)
    ratios = [c / t for c, t in zip(times["coconut"], times["cot"])]
    thoughts = args.thoughts_per_step * args.max_stage
    row = {"task": args.task, "model": args.model, "method": "coconut", "metric": "train_step_over_cot_step",
           "value": round(statistics.median(ratios), 3), "n": args.reps, "batch_size": args.batch,
           "thoughts": thoughts, "ratios": [round(r, 3) for r in ratios],
           "cot_step_s": round(statistics.median(times["cot"]), 3),
           "coconut_step_s": round(statistics.median(times["coconut"]), 3),
           "mean_chain_tokens": round(sum(chain_tokens) / len(chain_tokens), 1),
           "threads": torch.get_num_threads()}
    name = "coconut_cost_" + args.model.replace("/", "_")
    print(write_results(name, "python benchmarks/bench_coconut_cost.py " + " ".join(sys.argv[1:]), [row]))
    print(row)


if __name__ == "__main__":
    main()
