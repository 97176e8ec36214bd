"""Refinement of latents on SmolLM2-135M-Instruct: Soft Thinking (training-free) on GSM8K-Aug valid,
and a short Latent-SFT training of SmolLM2 on AQuA.

    python benchmarks/bench_refine_smollm2.py [--limit 200]
    python benchmarks/bench_refine_smollm2.py --task aqua     # after bench_latent_sft_smollm2.py --rates 2

The main model is SmolLM2-135M-Instruct as shipped, running Soft Thinking (the settings of
``bench_soft_thinking_smollm2.py``: up to 96 mixture steps, cold stop after 16, 96 answer tokens).
References: a short CoT-SFT of the same model on GSM8K-Aug (``configs/cot_sft_gsm8k_smollm2.yaml``
cut to ``--ref-steps`` steps, kept every ``ref-steps / 2``: weak = the middle, strong = the end;
no validation). Four rows on the first ``--limit`` validation questions: base, + residual
(α = 0.5), + contrastive, + both, at fixed settings (no sweep: on 2 cores one evaluation takes
minutes). η is set so that the contrastive step is 10% of a latent's norm on average over the first
8 questions (a scale, not an accuracy choice). The cost ratios come from the same runs' wall-clock
(the four evaluations run back to back in one process), or with ``--cost`` from base / + residual /
+ both alternating back to back on the first ``--cost-limit`` questions, ``--reps`` rounds after a
warm-up, with the rollout's split of each setting's time (``phase_seconds``). Writes
benchmarks/results/refine_smollm2.json.

``--task aqua``: the main model is ``bench_latent_sft_smollm2.py``'s Latent-SFT model (r = 2 unless
``--latent-model`` names another: SmolLM2 after a 20-step CoT-SFT and 48 Latent-SFT steps on GSM8K
train, the only training data shipped), evaluated on all 254 AQuA questions (AQuA ships one split,
so nothing is chosen on it but η's scale, as above); same references, same four rows. Writes
benchmarks/results/refine_smollm2_aqua.json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from common import ROOT, alternate_timings, write_results

from latentreason.config import load_run_config, merge
from latentreason.methods.refine import load_references
from latentreason.models.rollout import rollout
from latentreason.models.steps import LatentStep, StepContext, StepResult
from latentreason.recipes import build_method, run_eval, run_train

#: bench_latent_sft_smollm2.py --rates 2's model (a 20-step CoT-SFT, then 48 Latent-SFT steps)
LATENT_SFT_R2 = ROOT / "runs" / "bench-latent-sft-smollm2" / "latent-sft-r2" / "stage2" / "final"
SOFT_THINKING = {"method": {"name": "soft-thinking", "num_latent_steps": 96, "cold_stop_steps": 16},
                 "rollout": {"max_new_tokens": 96}}


def references(out: Path, steps: int) -> tuple[str, str]:
    """(strong, weak): the end and the middle of a short CoT-SFT run of SmolLM2 (trained if missing)."""
    if not (out / "train_summary.json").exists():
        data = yaml.safe_load((ROOT / "configs" / "cot_sft_gsm8k_smollm2.yaml").read_text())
        data = merge(data, {"train": {"output_dir": str(out), "max_steps": steps, "keep_every": steps // 2,
                                      "save_every": steps // 2, "select_on_valid": False},
                            "optim": {"warmup_steps": min(5, steps // 4)}})
        run_train(load_run_config(base=data))
    return str(out / f"keep-{steps}"), str(out / f"keep-{steps // 2}")


class _Scale(LatentStep):
    """Records |z| and |h_strong - h_weak| per active row, feeding the inner step unchanged."""

    def __init__(self, inner: LatentStep) -> None:
        self.inner, self.needs_hidden, self.ratios = inner, inner.needs_hidden, []

    def __call__(self, ctx: StepContext) -> StepResult:
        result = self.inner(ctx)
        strong, weak = ctx.references.hidden(result.embeds, ctx.active, ctx.positions)
        a = ctx.active
        self.ratios.append((result.embeds[a].norm(dim=-1).mean() / (strong - weak)[a].norm(dim=-1).mean()).item())
        return result


def calibrate_eta(method, examples, dim: int) -> float:
    """η with (2η/d) |h_s - h_w| = 0.1 |z| on average: a 10% step."""
    probe = _Scale(method.latent_step(examples))
    with torch.inference_mode():
        rollout(method.loaded.model, method.prompt_ids(examples), probe, method.rollout_config(),
                eos_ids=method.loaded.eos_ids, pad_id=method.loaded.pad_id, eot_id=method.loaded.eot_id,
                references=load_references(method))
    return round(0.1 * statistics.mean(probe.ratios) * dim / 2, 4)


def side_by_side(method, data: dict, saved: bool, settings: dict[str, dict], limit: int, reps: int) -> dict[str, Any]:
    """Seconds and the rollout's phase split of each setting on the first ``limit`` questions,
    alternating back to back (``common.alternate_timings``)."""
    examples = method.task.load("valid", limit=limit)
    batch = load_run_config(base=data, saved_base=saved).eval.batch_size
    runs = {k: load_run_config(base=merge(data, {"refine": refine}), saved_base=saved) for k, refine in settings.items()}
    seconds, phases = alternate_timings(method, examples, runs, batch, reps)
    return {"seconds": seconds, "n": len(examples), "batch": batch, "phase_seconds": phases}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="gsm8k-aug", choices=["gsm8k-aug", "aqua"],
                    help="gsm8k-aug: Soft Thinking on SmolLM2 as shipped; aqua: a short Latent-SFT model of SmolLM2")
    ap.add_argument("--limit", type=int, default=None,
                    help="questions of the valid split (default: 200 of GSM8K-Aug, about 35 min on 2 cores with the "
                         "references; all 254 of AQuA)")
    ap.add_argument("--latent-model", default=str(LATENT_SFT_R2),
                    help="--task aqua: the Latent-SFT model to refine (bench_latent_sft_smollm2.py's r = 2)")
    ap.add_argument("--ref-steps", type=int, default=20)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-refine-smollm2"))
    ap.add_argument("--cost", action="store_true",
                    help="the cost ratios from alternating back-to-back runs on --cost-limit questions (--reps rounds, "
                         "with the rollout's phase split) instead of the evaluations' one run each")
    ap.add_argument("--cost-limit", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    out = Path(args.out)
    limit = args.limit if args.limit is not None else (200 if args.task == "gsm8k-aug" else None)  # None: all
    cap = [f"eval.limit={limit}"] if limit else []
    strong, weak = references(out / "cot-sft-kept", args.ref_steps)
    if args.task == "gsm8k-aug":
        data = yaml.safe_load((ROOT / "configs" / "zero_shot_gsm8k_aug_smollm2.yaml").read_text())
        data["method"] = {}
        data = merge(merge(data, SOFT_THINKING), {"refine": {"strong": strong, "weak": weak}})
        name, saved, folder = "soft-thinking", False, out
    else:
        model = Path(args.latent_model)
        if not (model / "run_config.yaml").exists():
            sys.exit(f"{model}: no saved Latent-SFT model; run python benchmarks/bench_latent_sft_smollm2.py --rates 2")
        saved_cfg = yaml.safe_load((model / "run_config.yaml").read_text())
        name = f"latent-sft-r{saved_cfg['method']['compression']}"
        data = {"model": {"name_or_path": str(model)}, "data": {"task": "aqua"},
                "refine": {"strong": strong, "weak": weak}}
        saved, folder = True, out / "aqua"
    run = load_run_config(base=data, overrides=cap, saved_base=saved)
    method = build_method(run)
    examples = method.task.load("valid", limit=8)
    eta = calibrate_eta(method, examples, method.loaded.model.get_input_embeddings().weight.shape[1])
    settings = {
        name: {},
        f"{name}+residual": {"residual": True, "alpha": args.alpha},
        f"{name}+contrastive": {"contrastive": True, "eta": eta},
        f"{name}+refine": {"residual": True, "alpha": args.alpha, "contrastive": True, "eta": eta},
    }
    rows, seconds = [], {}
    for key, refine in settings.items():
        cell = load_run_config(base=merge(data, {"refine": refine}), saved_base=saved,
                               overrides=[*cap, f"eval.output_dir={folder / key}"])
        s = run_eval(cell, method=method)
        seconds[key] = 1 / s["questions_per_second"]
        base = {"task": s["task"], "model": "smollm2-135m", "method": key, "split": s["split"], "n": s["n"],
                "alpha": refine.get("alpha", 0.0), "eta": refine.get("eta", 0.0)}
        rows += [{**base, "metric": "accuracy", "value": s["accuracy"], "ci95": s["accuracy_ci95"]},
                 {**base, "metric": "accuracy_flexible", "value": s["accuracy_flexible"]},
                 {**base, "metric": "mean_latent_steps", "value": s["mean_latent_steps"]},
                 {**base, "metric": "seconds_per_question", "value": round(seconds[key], 3)}]
    timed = None
    if args.cost:
        timed = side_by_side(method, data, saved, {k: settings[k] for k in (name, f"{name}+residual", f"{name}+refine")},
                             args.cost_limit, args.reps)
    for key, metric in ((f"{name}+residual", "residual_cost_ratio"), (f"{name}+refine", "refine_cost_ratio")):
        if timed is None:
            rows.append({"task": args.task, "model": "smollm2-135m", "method": key, "split": "valid", "n": s["n"],
                         "metric": metric, "value": round(seconds[key] / seconds[name], 3),
                         "note": f"one run each, back to back in one process (batch {run.eval.batch_size})"})
            continue
        ratios = [a / b for a, b in zip(timed["seconds"][key], timed["seconds"][name])]
        rows.append({"task": args.task, "model": "smollm2-135m", "method": key, "split": "valid", "n": args.reps,
                     "metric": metric, "value": round(statistics.median(ratios), 3), "ratios": [round(r, 3) for r in ratios],
                     "seconds": {k: [round(v, 2) for v in vs] for k, vs in timed["seconds"].items()},
                     "phase_seconds": timed["phase_seconds"],
                     "note": f"median over {args.reps} alternating back-to-back runs of the first {timed['n']} valid "
                             f"questions (batch {timed['batch']}), after a warm-up round"})
    refs = (f"References: CoT-SFT of the same model on GSM8K-Aug, strong = step {args.ref_steps}, weak = step "
            f"{args.ref_steps // 2} (a short run: 16 examples per step). Fixed settings, no sweep: alpha = {args.alpha}, "
            f"eta = {eta} (a 10% step on the first 8 questions).")
    if args.task == "gsm8k-aug":
        note = f"SmolLM2-135M-Instruct, Soft Thinking training-free, first {s['n']} GSM8K-Aug valid questions, CPU. " + refs
    else:
        shown = model.resolve().relative_to(ROOT) if model.resolve().is_relative_to(ROOT) else model
        budget = "a 20-step CoT-SFT, then 48 Latent-SFT steps of 16 examples; " if model.resolve() == LATENT_SFT_R2 else ""
        note = (f"SmolLM2-135M-Instruct after a SHORT Latent-SFT training on GSM8K train (r = {saved_cfg['method']['compression']}: "
                f"{budget}{shown}), evaluated on {s['n']} AQuA questions (the one split shipped; trained on none of it), "
                "CPU. " + refs)
    if timed is not None:  # where the refined run's extra time goes
        ph = timed["phase_seconds"]
        base_total, both = sum(ph[name].values()), ph[f"{name}+refine"]
        note += (f" Cost rows: {args.reps} alternating rounds on the first {timed['n']} questions. With both operators the "
                 f"references add {both.get('reference_prefill', 0.0):.1f} s of prefill and "
                 f"{both['latent'] - ph[name]['latent']:.1f} s of latent steps to an unrefined {base_total:.1f} s "
                 f"(prefill {ph[name]['prefill']:.1f}, latent {ph[name]['latent']:.1f}, decode {ph[name]['decode']:.1f}).")
    command = "python benchmarks/bench_refine_smollm2.py " + " ".join(sys.argv[1:])
    suffix = "" if args.task == "gsm8k-aug" else "_aqua"
    print(write_results(f"refine_smollm2{suffix}", command.strip(), rows, note=note))


if __name__ == "__main__":
    main()
