"""Latent-SFT on SmolLM2-135M-Instruct, GSM8K train / GSM8K-Aug valid: a short run on 2 CPU cores.

    python benchmarks/bench_latent_sft_smollm2.py [--rates 4 2] [--stage1-steps 6] [--stage2-steps 30]
        [--init runs/bench-refine-smollm2/cot-sft-kept/final] [--limit 200] [--lora]

Every model starts from one short CoT-SFT of SmolLM2 (``--init``, a model folder; without it one is
trained here: ``configs/cot_sft_gsm8k_smollm2.yaml`` cut to ``--init-steps``). From there, the
same budget of optimizer steps of 16 examples for each method:

* ``cot-sft``: CoT-SFT continued for 3 x stage1-steps + stage2-steps steps;
* ``latent-sft-r<r>``: stage 1 (warm-up, decoder, both: stage1-steps each, the best of each step
  on 32 validation questions), soft labels exported from the stage-1 encoder for the 16 x
  stage2-steps training examples stage 2 then sees once, stage 2 for stage2-steps steps (its last model).
  Full fine-tune at lr 1e-4; ``--lora`` trains ``latent-sft-r<r>-lora`` instead, with the official
  recipe's training mode: LoRA (r 64, alpha 128, dropout 0.1) on every linear layer and the embedding
  table, of the encoder and the LLM, at the official scripts' rates (stage 1 1e-4, stage 2 3e-4).

Each is evaluated greedily on the first ``--limit`` GSM8K-Aug valid questions: accuracy, reasoning
positions (#L for Latent-SFT), seconds per question, and for Latent-SFT ECR@1/5/10, N_eff,
N_eff / N_eff_naive and Top-2. GSM8K has one gold chain per question, so N_eff's further solutions
are ``--samples`` chains sampled (T = 0.6, top-p 0.95) from the continued CoT-SFT model on the same
questions (right or wrong, as the paper's authors do), given to the evaluation as ``eval.solutions``.
``*_encoder_aligned`` rows: N_eff, its ratio and Top-2 with the authors' alignment (each latent step
takes the closest unused segment by the stage-1 encoder's latent of it; ``eval.n_eff_alignment``).
``latent-sft-r<r>-stage1`` rows: has the encoder collapsed (its latents' top-1 weight and share of
distinct top-1 tokens at the end of stage 1, and the same over the soft labels stage 2 trained on)?
``speedup_vs_cot``: the r = 4 model's evaluation against the continued CoT-SFT model's, alternating
back to back (``--speed-reps``), batch 32, the same questions. Everything resumes when rerun.
Writes benchmarks/results/latent_sft_smollm2.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from common import ROOT, carry_published, write_results

from latentreason.config import load_run_config, merge
from latentreason.eval.superposition import solutions_from_predictions
from latentreason.recipes import run_eval, run_train

MODEL = "smollm2-135m"
COT = ROOT / "configs" / "cot_sft_gsm8k_smollm2.yaml"
#: the official recipe adapts every linear layer and the embedding table (where the new tokens are learned)
LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,embed_tokens"
LATENT_METRICS = ("ecr@1", "ecr@5", "ecr@10", "n_eff", "n_eff_over_naive", "top2", "pass_at_1_over_latent_steps")


def cot_base() -> dict[str, Any]:
    return yaml.safe_load(COT.read_text())


def trained(folder: Path) -> Path:
    return folder / ("best" if (folder / "best").exists() else "final")


def train(data: dict[str, Any]) -> Path:
    """Train ``data`` unless its folder holds a finished run (a stopped one resumes)."""
    out = Path(data["train"]["output_dir"])
    if not (out / "train_summary.json").exists():
        run_train(load_run_config(base=data))
    return trained(out)


def evaluate(model: Path, out: Path, limit: int, overrides: list[str] = ()) -> dict[str, Any]:
    run = load_run_config(overrides=[f"model.name_or_path={model}", "eval.split=valid", f"eval.limit={limit}",
                                     f"eval.output_dir={out}", "eval.batch_size=32", *overrides], saved_base=True)
    return run_eval(run)


def encoder_rows(folder: Path, rate: int, tokenizer: Any, method: str) -> list[dict[str, Any]]:
    """Has the stage-1 encoder collapsed? Its latents at the end of stage 1 (the training log's last
    window) and the soft labels stage 2 learned from (every exported latent): the mean top-1 weight,
    the share of distinct top-1 tokens, and the commonest top-1 tokens."""
    base = {"task": "gsm8k-aug", "model": MODEL, "method": f"{method}-stage1", "split": "train",
            "compression": rate}
    rows = []
    log = folder / "stage1" / "log.jsonl"
    last = [r for r in map(json.loads, log.read_text().splitlines()) if "latent_top1_weight" in r][-1:] if log.exists() else []
    rows += [{**base, "metric": key, "value": round(last[0][key], 4), "n": 16,
              "note": "last logged window of stage 1 (batches of 16); distinct = distinct top-1 tokens / latents"}
             for key in ("latent_top1_weight", "latent_distinct_top1") if last]
    shards = sorted((folder / "stage2" / "soft_labels").glob("shard-*.safetensors"))
    if shards:
        from collections import Counter

        from safetensors.torch import load_file

        parts = [load_file(str(p)) for p in shards]
        if all("ids" in part for part in parts):  # top-k export (full distributions: argmax would do, not needed here)
            top_w = torch.cat([part["probs"][:, 0] for part in parts])
            top_id = torch.cat([part["ids"][:, 0] for part in parts]).tolist()
            counts = Counter(top_id)
            common = [[tokenizer.decode([t]), round(c / len(top_id), 3)] for t, c in counts.most_common(5)]
            note = "the exported soft labels stage 2 trained on (every latent of its training examples)"
            rows += [{**base, "metric": "soft_label_top1_weight", "value": round(float(top_w.mean()), 4),
                      "n": len(top_id), "note": note},
                     {**base, "metric": "soft_label_distinct_top1", "value": round(len(counts) / len(top_id), 5),
                      "n": len(top_id), "distinct": len(counts), "commonest_top1": common, "note": note}]
    return rows


def rows_for(summary: dict[str, Any], method: str, **extra: Any) -> list[dict[str, Any]]:
    base = {"task": "gsm8k-aug", "model": MODEL, "method": method, "split": "valid", **extra}
    n = summary["n"]
    rows = [{**base, "metric": "accuracy", "value": round(summary["accuracy"], 4), "n": n, "ci95": summary["accuracy_ci95"]},
            {**base, "metric": "reasoning_positions", "value": round(summary["mean_reasoning_positions"], 2), "n": n},
            {**base, "metric": "latent_steps", "value": round(summary["mean_latent_steps"], 2), "n": n,
             "note": "#L: latent steps fed (reasoning_positions adds any text written before the answer line)"},
            {**base, "metric": "seconds_per_question", "value": round(1 / summary["questions_per_second"], 4), "n": n,
             "note": "this evaluation alone, batch 32; see speedup_vs_cot for the side-by-side ratio"}]
    for key in LATENT_METRICS:
        if summary.get(key) is not None:
            few = key in ("n_eff", "n_eff_over_naive", "top2")
            rows.append({**base, "metric": key, "value": round(summary[key], 4),
                         "n": summary.get("n_eff_questions", n) if few else n})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", type=int, nargs="+", default=[4], help="compression rates r to train")
    ap.add_argument("--init", default=None, help="a CoT-SFT model folder of SmolLM2 to start from (default: train one)")
    ap.add_argument("--init-steps", type=int, default=20)
    ap.add_argument("--stage1-steps", type=int, default=6, help="optimizer steps of each of stage 1's three steps")
    ap.add_argument("--stage2-steps", type=int, default=30)
    ap.add_argument("--limit", type=int, default=200, help="GSM8K-Aug valid questions evaluated")
    ap.add_argument("--samples", type=int, default=3, help="chains sampled per question for N_eff")
    ap.add_argument("--speed-reps", type=int, default=2)
    ap.add_argument("--lora", action="store_true",
                    help="train Latent-SFT with LoRA as the official recipe does (methods latent-sft-r<r>-lora)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-latent-sft-smollm2"))
    args = ap.parse_args()
    out = Path(args.out)
    budget = 3 * args.stage1_steps + args.stage2_steps
    no_select = {"select_on_valid": False, "eval_every": 0}

    init = Path(args.init) if args.init else train(merge(cot_base(), {
        "train": {"output_dir": str(out / "cot-sft-init"), "max_steps": args.init_steps, "save_every": args.init_steps,
                  **no_select}, "optim": {"warmup_steps": min(5, args.init_steps // 4)}}))
    cot = train(merge(cot_base(), {"train": {"output_dir": str(out / "cot-sft"), "init_from": str(init), "max_steps": budget,
                                             "save_every": budget, **no_select}, "optim": {"warmup_steps": 0}}))
    rows = rows_for(evaluate(cot, out / "cot-sft" / "eval-valid", args.limit), "cot-sft", train_steps=budget)

    sampled = [out / "samples" / f"seed{s}" for s in range(args.samples)]
    for s, folder in enumerate(sampled):
        evaluate(cot, folder, args.limit, ["rollout.temperature=0.6", "rollout.top_p=0.95", f"rollout.seed={s}"])
    solutions = out / "samples" / "solutions.jsonl"
    found = solutions_from_predictions([f / "predictions.jsonl" for f in sampled], solutions)

    latent_paths = {}
    suffix = "-lora" if args.lora else ""
    lora = {"enabled": True, "r": 64, "alpha": 128, "dropout": 0.1, "target_modules": LORA_TARGETS}
    for rate in args.rates:
        name = f"latent-sft-r{rate}{suffix}"
        folder = out / name
        common = {"model": {"name_or_path": MODEL}, "data": {"task": "gsm8k-aug", "valid_split": "valid"},
                  "optim": {"lr": 1e-4, "warmup_steps": 0, "scheduler": "constant", "weight_decay": 0.01},
                  "rollout": {"max_new_tokens": 32}, **({"lora": lora} if args.lora else {})}
        method = {"name": "latent-sft", "compression": rate, "top_k": 10, "max_latent_steps": 128 // rate,
                  "max_length": 320}
        one = merge(common, {"method": {**method, "stage": 1, "steps": "warmup,decoder,both",
                                        "steps_per_step": args.stage1_steps},
                             "train": {"output_dir": str(folder / "stage1"), "init_from": str(init),
                                       "max_steps": 3 * args.stage1_steps, "global_batch_size": 16, "micro_batch_size": 8,
                                       "save_every": args.stage1_steps, "eval_every": args.stage1_steps,
                                       "eval_limit": 32, "select_on_valid": True, "log_every": 2}})
        stage1 = train(one)
        # stage 2 sees stage2-steps x 16 examples once: export soft labels for those only
        two = merge(common, {"method": {**method, "stage": 2}, "data": {"train_limit": 16 * args.stage2_steps},
                             "train": {"output_dir": str(folder / "stage2"), "init_from": str(stage1),
                                       "max_steps": args.stage2_steps, "global_batch_size": 16, "micro_batch_size": 8,
                                       "save_every": args.stage2_steps, "log_every": 5, **no_select},
                             **({"optim": {"lr": 3e-4}} if args.lora else {})})
        latent_paths[rate] = train(two)
        summary = evaluate(latent_paths[rate], folder / "stage2" / "eval-valid", args.limit, [f"eval.solutions={solutions}"])
        mode = {"training": "lora", "lr": [1e-4, 3e-4]} if args.lora else {"training": "full", "lr": 1e-4}
        rows += rows_for(summary, name, compression=rate, train_steps=budget,
                         stage1_steps=3 * args.stage1_steps, stage2_steps=args.stage2_steps, **mode)
        # N_eff again with the authors' alignment: each latent step takes the closest unused segment by
        # the stage-1 encoder's latent of it (eval.n_eff_alignment=encoder)
        aligned = evaluate(latent_paths[rate], folder / "stage2" / "eval-valid-encoder-aligned", args.limit,
                           [f"eval.solutions={solutions}", "eval.n_eff_alignment=encoder"])
        rows += [{"task": "gsm8k-aug", "model": MODEL, "method": name, "split": "valid", "metric": f"{key}_encoder_aligned",
                  "value": round(aligned[key], 4), "n": aligned["n_eff_questions"], "compression": rate,
                  "train_steps": budget, **mode} for key in ("n_eff", "n_eff_over_naive", "top2") if aligned.get(key) is not None]
        from transformers import AutoTokenizer

        rows += encoder_rows(folder, rate, AutoTokenizer.from_pretrained(str(latent_paths[rate])), name)

    if 4 in latent_paths and args.speed_reps:
        paths = {"cot-sft": cot, f"latent-sft-r4{suffix}": latent_paths[4]}
        qps: dict[str, list[float]] = {k: [] for k in paths}
        for rep in range(args.speed_reps):
            for name in (list(paths) if rep % 2 == 0 else list(paths)[::-1]):
                with tempfile.TemporaryDirectory() as tmp:
                    qps[name].append(evaluate(paths[name], Path(tmp), args.limit)["questions_per_second"])
        ratios = [a / b for a, b in zip(qps[f"latent-sft-r4{suffix}"], qps["cot-sft"])]
        rows.append({"task": "gsm8k-aug", "model": MODEL, "method": f"latent-sft-r4{suffix}", "split": "valid",
                     "metric": "speedup_vs_cot", "value": round(statistics.median(ratios), 3), "n": args.speed_reps,
                     "ratios": [round(r, 3) for r in ratios],
                     "questions_per_second": {k: [round(v, 3) for v in vs] for k, vs in qps.items()},
                     "note": f"median over alternating back-to-back evaluations of the same {args.limit} questions, "
                             "batch 32, greedy; CoT answers up to 96 new tokens, Latent-SFT up to 32 after its latents"})

    shown = init.resolve().relative_to(ROOT) if init.resolve().is_relative_to(ROOT) else init
    note = (f"SHORT RUN on 2 CPU cores, one seed: SmolLM2-135M-Instruct from a {args.init_steps}-step CoT-SFT "
            f"({shown}); then {budget} optimizer steps of 16 GSM8K train examples per method (Latent-SFT: stage 1 "
            f"3 x {args.stage1_steps} steps at about 2.2x a CoT step's cost, stage 2 {args.stage2_steps} steps). Full "
            "fine-tune at lr 1e-4, except the methods ending in -lora: LoRA as the official recipe trains (r 64, alpha "
            "128, dropout 0.1, every linear layer and the embedding table, encoder and LLM; stage 1 at lr 1e-4, stage 2 "
            "at 3e-4, the official scripts' rates), constant rate, no warm-up, as the full fine-tunes. Evaluated on the "
            f"first {args.limit} GSM8K-Aug valid questions (selection used at most "
            f"32 of them, in stage 1 only). N_eff: the gold chain plus {args.samples} chains sampled from the continued "
            f"CoT-SFT model ({len(found)} questions gave at least one non-empty chain). Far from the paper's budget "
            "(full epochs of GSM8K-Aug on Llama-3.2-1B): these rows measure the pipeline and the cost, not the "
            "method's accuracy at scale.")
    command = "python benchmarks/bench_latent_sft_smollm2.py " + " ".join(sys.argv[1:])
    differ: list[str] = []  # runs/ is not versioned: a rerun retrains from scratch and should land on the same numbers
    carried = carry_published("latent_sft_smollm2", rows, seedless=True, differences=differ,
                              unchecked=("seconds_per_question", "speedup_vs_cot"))[len(rows):]
    if carried:
        note += (f" Rows marked carried ({', '.join(sorted({r['method'] for r in carried}))}) come from an earlier run "
                 f"of this script from the same {args.init_steps}-step CoT-SFT recipe; the rows rebuilt here that it also "
                 "published " + ("differ: see the warnings." if differ else "are the same values (timings aside)."))
    weight = {r["method"]: r["value"] for r in rows + carried if r["metric"] == "soft_label_top1_weight"}
    for r in rows + carried:  # say it where an encoder collapsed: the stage-2 rows then rest on near-constant labels
        if r["metric"] == "soft_label_distinct_top1" and r["value"] < 0.01:
            top = ", ".join(f"'{t}' {share:.0%}" for t, share in r["commonest_top1"][:4])
            note += (f" {r['method']}: the soft labels stage 2 learned from have {r['distinct']} distinct top-1 tokens over "
                     f"{r['n']} latents ({top}), mean top-1 weight {weight.get(r['method'], float('nan')):.2f}: ")
            note += ("the encoder collapsed onto a few tokens, so at this budget the latents cannot carry the chain's "
                     "numbers (latentreason inspect latents shows what the model feeds)." if weight.get(r["method"], 1) >= 0.6
                     else "few tokens lead, but the mixtures stay spread (no collapse onto one token per latent).")
    print(write_results("latent_sft_smollm2", command, rows + carried, note=note))
    for r in rows:
        print(f"{r['method']:16} {r['metric']:26} {r['value']}  n={r['n']}")


if __name__ == "__main__":
    main()
