"""Cost of one Latent-SFT training step against one CoT-SFT step on the same examples.

    python benchmarks/bench_latent_sft_cost.py                                   # SmolLM2-135M, GSM8K-Aug, r = 4
    python benchmarks/bench_latent_sft_cost.py --model tiny-llama-l4-d128 --task arith --batch 64 --options '{num_steps: 6}'

One model, one AdamW optimizer; each repetition runs, on the same batch and in rotating order, a
CoT-SFT step (chain and answer teacher-forced in one pass), a Latent-SFT stage-2 step (prompt,
the N = ceil(|chain| / r) soft-label latents, <eot> and answer in one parallel pass, KL + CE) and a
stage-1 step (the encoder over the interleaved chain under the induction mask, then the decoder
under the supervision mask: two transformers, both trained), each forward + backward + optimizer
step. The soft labels are random top-k distributions of the right shape (the cost does not
depend on their values). Writes ``benchmarks/results/latent_sft_cost_<model>.json``:
``train_step_over_cot_step`` for ``latent-sft`` (stage 2, the issue's number) and
``latent-sft-stage1``, medians of the per-repetition ratios, with the step times in seconds.
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch
from common import timed_train_step, write_results

from latentreason.config import load_run_config
from latentreason.methods.base import METHODS, build_method


class RandomLabels:
    """Stands in for exported soft labels: a top-k distribution per latent of each example."""

    def __init__(self, counts: dict[str, int], k: int, vocab: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.rows = {key: (torch.rand(n, k, generator=g).softmax(-1), torch.randint(0, vocab, (n, k), generator=g))
                     for key, n in counts.items()}

    def get(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rows[key]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="gsm8k-aug")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--compression", type=int, default=4)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--options", default="{}", help="task options as YAML, e.g. '{num_steps: 6}'")
    args = ap.parse_args()
    common = [f"model.name_or_path={args.model}", f"data.task={args.task}", f"data.options={args.options}",
              "method.name=latent-sft", f"method.compression={args.compression}", f"method.top_k={args.top_k}",
              "model.device=cpu", "train.max_steps=3", "train.select_on_valid=true"]
    stage1 = build_method(load_run_config(overrides=common + ["method.stage=1"]), training=True)
    run2 = load_run_config(overrides=common + ["method.stage=2", "method.soft_labels=unused"])
    stage2 = METHODS.get("latent-sft")(run2.method, run2, stage1.loaded, stage1.task)
    cot = METHODS.get("cot-sft")(METHODS.get("cot-sft").config_cls(), run2, stage1.loaded, stage1.task)
    model = stage1.loaded.model
    model.train()
    stage1.encoder.train()
    params = [p for p in [*model.parameters(), *stage1.encoder.parameters()] if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    examples = stage1.task.load("train", limit=args.batch * (args.reps + 1))
    chains = [len(s) for s in stage1._chain_segments(examples)]
    stage2._labels = RandomLabels({ex.id: n for ex, n in zip(examples, chains)}, args.top_k,
                                  model.get_input_embeddings().weight.shape[0])
    modules = torch.nn.ModuleDict({"lm": model, "encoder": stage1.encoder})

    methods = {"cot": cot, "latent-sft": stage2, "latent-sft-stage1": stage1}
    times: dict[str, list[float]] = {k: [] for k in methods}
    chain_tokens = [len(stage1.loaded.tokenizer(stage1.task.chain_text(ex), add_special_tokens=False)["input_ids"])
                    for ex in examples]
    for rep in range(args.reps + 1):  # repetition 0 warms up
        chunk = examples[rep * args.batch: (rep + 1) * args.batch]
        batches = {name: m.collate(chunk) for name, m in methods.items()}
        names = list(methods)
        order = names[rep % 3:] + names[:rep % 3]
        for name in order:
            seconds = timed_train_step(methods[name], modules, batches[name], opt)
            if rep:
                times[name].append(seconds)
        if rep:
            print(f"rep {rep}: " + " ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), flush=True)
    rows = []
    for name in ("latent-sft", "latent-sft-stage1"):
        ratios = [a / b for a, b in zip(times[name], times["cot"])]
        rows.append({"task": args.task, "model": args.model, "method": name, "metric": "train_step_over_cot_step",
                     "value": round(statistics.median(ratios), 3), "n": args.reps, "batch_size": args.batch,
                     "compression": args.compression, "top_k": args.top_k, "ratios": [round(r, 3) for r in ratios],
                     "cot_step_s": round(statistics.median(times["cot"]), 3),
                     "step_s": round(statistics.median(times[name]), 3),
                     "mean_chain_tokens": round(sum(chain_tokens) / len(chain_tokens), 1),
                     "mean_latents": round(sum(chains) / len(chains), 1), "threads": torch.get_num_threads()})
    name = "latent_sft_cost_" + args.model.replace("/", "_")
    print(write_results(name, "python benchmarks/bench_latent_sft_cost.py " + " ".join(sys.argv[1:]), rows))
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
