"""DLR against token-level GRPO on tiny models: accuracy, reward stability, forgetting, update cost.

    python benchmarks/bench_dlr.py --seeds 0 1 2          # calibrate, train, evaluate (about 40 min on 2 cores)
    python benchmarks/bench_dlr.py --seeds 0 1 2 --cost   # + wall-clock per update, side by side

Every run and evaluation is skipped when its folder is complete, so a rerun rebuilds the result
file from disk and an interrupted one continues.

The test bed (issue 17), all on one tiny Llama (4 layers, d = 128) and generated arith:

- the main model is CoT-SFT trained on a mix of two tasks: A = arith (6 steps, mod 10) and
  B = arith (3 steps, mod 7, other questions); the number of operators tells the model which
  modulus applies, so B is a second skill the model holds beside A;
- calibration: the CoT-SFT run keeps a checkpoint every 50 steps; the main model is the latest
  one whose accuracy on 200 validation questions of A is below 0.8 (a band where RL has room);
- DLR (assistant = a copy of the main model, L = 6 latents of width 512 or 32) warm-starts on A
  (answer mode: the answer follows the latents; σ = 0.3), then RL on A with G = 8; token-level
  GRPO trains the main model itself on A with the same G, questions per update and number of
  updates; the learning rates (and DLR's σ and latent width) are swept on seed 0 and chosen on validation;
- accuracy on A's generated test split (500) for the main model alone (writing its chain), the
  warm-started DLR, DLR after RL (best/ on validation), GRPO (best/ on validation); forgetting:
  accuracy on B's test split before and after, for each method's main model;
- reward_std_last_half: standard deviation of the per-update mean training reward over the last
  half of the updates; ``--cost``: seconds per update (sampling, all G decodes, loss, backward,
  optimizer step) of DLR and GRPO alternating on the same questions, median ratio.

Writes benchmarks/results/dlr_arith.json and the reward-curve figure dlr_reward_curves.png.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from common import ROOT, RESULTS, seed_mean_rows, write_results

from latentreason.config import load_run_config, load_yaml
from latentreason.recipes import run_eval, run_train

MODEL = "tiny-llama-l4-d128"
RUNS = ROOT / "runs" / "bench-dlr"
TASK_A = {"task": "arith", "options": {"num_steps": 6}}
TASK_B = {"task": "arith", "options": {"num_steps": 3, "modulus": 7, "seed": 1}}
MIX = {"task": "mix", "options": {"parts": "arith:num_steps=6;arith:num_steps=3:modulus=7:seed=1"}}
BAND = 0.8
G = 8
RL_STEPS = 150
RL_BATCH = 16
WARM_STEPS = 400
DLR_METHOD = {"name": "dlr", "num_latents": 6, "group_size": G}
GRPO_METHOD = {"name": "grpo", "group_size": G}
COMMON = {
    "model": {"name_or_path": MODEL, "max_positions": 128},
    "rollout": {"max_new_tokens": 48},
    "eval": {"batch_size": 250},
}
NOTE = ("Tiny Llama (4 layers, d = 128) on generated arith, CPU. Main model: CoT-SFT on a mix of A = arith "
        "(6 steps, mod 10) and B = arith (3 steps, mod 7), the kept checkpoint (every 50 steps) last below 0.8 on 200 "
        f"validation questions of A. RL: G = {G}, {RL_BATCH} questions per update, {RL_STEPS} updates, constant lr "
        "(DLR: lr x sigma x latent width 512 or 32, GRPO: lr, each chosen by the best validation accuracy of a seed-0 sweep, see 'sweep'), "
        "validation (200 questions of A) every 25 updates picks best/. DLR: assistant = copy of the main "
        f"model, L = 6, warm start (sigma 0.3) {WARM_STEPS} steps (batch 64, lr 1e-3), keep the "
        "top 18% of each group, contrastive weight 0.1. Accuracy on the generated test splits (500). Seeds: the RL "
        "runs' seeds (one main model); seed 0's runs are the sweep's runs of the chosen settings, so seed 0 is the "
        "sweep's winner on validation, not an independent draw: seeds 1 and 2 are.")


def base(**sections: Any) -> dict[str, Any]:
    data = {k: dict(v) for k, v in COMMON.items()}
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return data


def train(out: Path, data: dict[str, Any]) -> Path:
    if not (out / "train_summary.json").exists():
        data["train"] = {**data.get("train", {}), "output_dir": str(out)}
        run_train(load_run_config(base=data))
    return out


def evaluate(folder: Path, out: Path, task: dict[str, Any], split: str = "test", limit: int | None = None,
             method: str | None = None) -> dict[str, Any]:
    """Evaluate a saved folder on ``task`` (its own method, or ``method`` with the folder's LM)."""
    if (out / "summary.json").exists():
        return json.loads((out / "summary.json").read_text())
    data = load_yaml(folder / "run_config.yaml")
    if method:
        data["method"] = {"name": method}
    data["data"] = {**data["data"], "task": task["task"], "options": task["options"]}
    data["model"]["name_or_path"] = str(folder)
    data["train"]["init_from"] = None
    data["eval"] = {**data.get("eval", {}), "split": split, "limit": limit, "output_dir": str(out), "batch_size": 250}
    return run_eval(load_run_config(base=data))


def calibrate(root: Path) -> tuple[Path, list[dict[str, Any]]]:
    """The latest kept CoT-SFT checkpoint below BAND on A's validation questions."""
    run = train(root / "cot-sft-mix", base(
        method={"name": "cot-sft"}, data=MIX, optim={"lr": 1e-3, "warmup_steps": 50},
        train={"max_steps": 600, "global_batch_size": 64, "micro_batch_size": 64, "keep_every": 50,
               "save_every": 100, "log_every": 25, "select_on_valid": False}))
    table = []
    for kept in sorted(run.glob("keep-*"), key=lambda p: int(p.name.split("-")[1])):
        acc = evaluate(kept, root / "calibration" / kept.name, TASK_A, split="valid", limit=200)["accuracy"]
        table.append({"checkpoint": kept.name, "valid_accuracy_A": acc})
    below = [row for row in table if row["valid_accuracy_A"] < BAND]
    if not below:
        raise SystemExit(f"no kept checkpoint below {BAND} on A: shorten the CoT-SFT run")
    return run / below[-1]["checkpoint"], table


#: Settings swept on validation (seed 0, best valid accuracy of the run's checkpoints), then used for every seed.
DLR_GRID = [{"lr": lr, "sigma": sigma, "latent_dim": dim} for dim in (512, 32) for sigma in (0.3, 1.0)
            for lr in (3e-5, 1e-4, 3e-4)]
GRPO_GRID = [{"lr": lr} for lr in (1e-4, 3e-4, 1e-3)]


def _rl(seed: int, lr: float) -> dict[str, Any]:
    return {"optim": {"lr": lr, "warmup_steps": 0, "scheduler": "constant"},
            "train": {"max_steps": RL_STEPS, "global_batch_size": RL_BATCH, "micro_batch_size": RL_BATCH, "seed": seed,
                      "log_every": 1, "eval_every": 25, "eval_limit": 200, "save_every": 25}}


def warm_start(root: Path, main: Path, seed: int, latent_dim: int = 512) -> Path:
    name = f"dlr-warmstart-seed{seed}" if latent_dim == 512 else f"dlr-warmstart-d{latent_dim}-seed{seed}"
    return train(root / name, base(
        method={**DLR_METHOD, "warm_start_steps": WARM_STEPS, "latent_dim": latent_dim}, data=TASK_A,
        optim={"lr": 1e-3, "warmup_steps": 50}, train={
            "init_from": str(main), "max_steps": WARM_STEPS, "global_batch_size": 64, "micro_batch_size": 64,
            "seed": seed, "log_every": 25, "eval_every": 100, "eval_limit": 200, "save_every": 100}))


def dlr_run(out: Path, warm: Path, seed: int, lr: float, sigma: float, latent_dim: int) -> Path:
    rl = _rl(seed, lr)
    return train(out, base(method={**DLR_METHOD, "warm_start_steps": 0, "sample_seed": seed, "sigma": sigma,
                                   "latent_dim": latent_dim},
                           data=TASK_A, optim=rl["optim"], train={**rl["train"], "init_from": str(warm / "best")}))


def grpo_run(out: Path, main: Path, seed: int, lr: float) -> Path:
    rl = _rl(seed, lr)
    return train(out, base(method={**GRPO_METHOD, "sample_seed": seed}, data=TASK_A, optim=rl["optim"],
                           train={**rl["train"], "init_from": str(main)}))


def best_valid(run: Path) -> float:
    return max(r["valid_metric"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())
               if "valid_metric" in r)


def sweep(root: Path, main: Path) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """DLR's (lr, σ) and GRPO's lr, each the best validation accuracy reached in a seed-0 run."""
    table = []
    for cell in DLR_GRID:
        run = dlr_run(root / "sweep" / dlr_name(cell), warm_start(root, main, 0, cell["latent_dim"]), 0, **cell)
        table.append({"method": "dlr", **cell, "best_valid_accuracy": best_valid(run), "run": run.name})
    for cell in GRPO_GRID:
        run = grpo_run(root / "sweep" / f"grpo-lr{cell['lr']:g}", main, 0, **cell)
        table.append({"method": "grpo", **cell, "best_valid_accuracy": best_valid(run), "run": run.name})
    pick = {m: max((r for r in table if r["method"] == m), key=lambda r: r["best_valid_accuracy"]) for m in ("dlr", "grpo")}
    return ({k: pick["dlr"][k] for k in ("lr", "sigma", "latent_dim")}, {"lr": pick["grpo"]["lr"]}, table)


def dlr_name(cell: dict[str, Any]) -> str:
    return f"dlr-d{cell['latent_dim']}-lr{cell['lr']:g}-sigma{cell['sigma']:g}"


def rl_runs(root: Path, main: Path, seed: int, dlr: dict[str, Any], grpo: dict[str, Any]) -> dict[str, Path]:
    """Seed 0's runs are the sweep's runs of the chosen settings (the same configs)."""
    warm = warm_start(root, main, seed, dlr["latent_dim"])
    names = (f"sweep/{dlr_name(dlr)}", f"sweep/grpo-lr{grpo['lr']:g}") if seed == 0 else (
        f"dlr-seed{seed}", f"grpo-seed{seed}")
    return {"warm": warm, "dlr": dlr_run(root / names[0], warm, seed, **dlr),
            "grpo": grpo_run(root / names[1], main, seed, **grpo)}


def weights_digest(folder: Path) -> str:
    """sha256 of the LM's safetensors files (the main model's identity)."""
    h = hashlib.sha256()
    for f in sorted(folder.glob("model*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def reward_std_last_half(run: Path) -> float:
    rewards = [r["reward"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "reward" in r]
    return statistics.pstdev(rewards[len(rewards) // 2:])


def seconds_per_update(run: Path) -> float:
    """Median seconds between consecutive logged RL updates (the training log's own clock)."""
    rows = [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "reward" in r]
    gaps = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(rows, rows[1:]) if b["step"] == a["step"] + 1]
    return statistics.median(gaps)


def cost(root: Path, main: Path, warm: Path, dlr: dict[str, Any], updates: int = 8) -> dict[str, float]:
    """Seconds per update of DLR and GRPO alternating on the same questions (everything an update does)."""
    import torch

    from latentreason.methods.base import build_method

    def make(folder: Path, method: dict[str, Any]) -> Any:
        data = base(method=method, data=TASK_A, train={"output_dir": str(root / "cost"), "global_batch_size": RL_BATCH,
                                                         "micro_batch_size": RL_BATCH})
        m = build_method(load_run_config(base=data), model_path=str(folder), training=True)
        modules = torch.nn.ModuleDict({"lm": m.loaded.model, **m.extra_modules()})
        stages = m.stages()
        if stages:  # DLR: its RL stage
            m.set_stage(len(stages) - 1, stages[-1])
        params = [p for p in modules.parameters() if p.requires_grad]
        return m, modules, torch.optim.AdamW(params, lr=1e-4)

    methods = {"dlr": make(warm / "best", {**DLR_METHOD, "warm_start_steps": 0, "sigma": dlr["sigma"],
                                           "latent_dim": dlr["latent_dim"]}),
               "grpo": make(main, GRPO_METHOD)}
    examples = methods["dlr"][0].task.load("train", limit=RL_BATCH * (updates + 1))
    times: dict[str, list[float]] = {"dlr": [], "grpo": []}
    for u in range(updates + 1):
        batch_ex = examples[u * RL_BATCH:(u + 1) * RL_BATCH]
        for name in (["dlr", "grpo"] if u % 2 == 0 else ["grpo", "dlr"]):
            m, modules, opt = methods[name]
            t0 = time.perf_counter()
            batch = m.collate(batch_ex)
            modules.eval()
            with torch.no_grad():
                batch = m.sample(modules, batch, u)
            modules.train()
            out = m.loss(modules, batch)
            (out["loss_sum"] / max(batch["num_targets"], 1)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if u:  # the first update of each warms up
                times[name].append(time.perf_counter() - t0)
    ratios = [g / d for d, g in zip(times["dlr"], times["grpo"])]
    return {"dlr_s": statistics.median(times["dlr"]), "grpo_s": statistics.median(times["grpo"]),
            "speedup": statistics.median(ratios), "updates": updates}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--cost", action="store_true", help="also time updates of DLR and GRPO side by side")
    args = ap.parse_args()
    root = RUNS
    main_model, table = calibrate(root)
    print("calibration (valid accuracy on A):", table, "->", main_model.name, flush=True)
    rows: list[dict[str, Any]] = []
    means: dict[tuple[str, str], list[tuple[Any, float]]] = {}
    fields = {"task": "arith", "model": MODEL, "split": "test"}

    labels: dict[tuple[str, str], dict[str, Any]] = {}  # a mean row says what its seed rows say (task, split, note)

    def add(method: str, metric: str, value: float, n: int, seed: Any, **extra: Any) -> None:
        rows.append({**fields, "method": method, "metric": metric, "value": round(value, 4), "n": n, "seed": seed,
                     **extra})
        means.setdefault((method, metric), []).append((seed, value))
        labels[(method, metric)] = {k: v for k, v in extra.items() if k in ("task", "split", "note")}

    frozen_a = evaluate(main_model, root / "eval" / "main-A", TASK_A)
    frozen_b = evaluate(main_model, root / "eval" / "main-B", TASK_B)
    rows.append({**fields, "method": "frozen-main", "metric": "accuracy", "value": frozen_a["accuracy"],
                 "n": frozen_a["n"], "note": f"the CoT-SFT main model ({main_model.name}) writing its chain"})
    rows.append({**fields, "task": "arith-B", "method": "frozen-main", "metric": "accuracy",
                 "value": frozen_b["accuracy"], "n": frozen_b["n"],
                 "note": "the second task (3 steps, mod 7), before any RL"})
    dlr_cfg, grpo_cfg, sweep_table = sweep(root, main_model)
    print("sweep:", sweep_table, "->", dlr_cfg, grpo_cfg, flush=True)
    curves: dict[str, Path] = {}
    for seed in args.seeds:
        runs = rl_runs(root, main_model, seed, dlr_cfg, grpo_cfg)
        ev = root / "eval" / f"seed{seed}"
        warm = evaluate(runs["warm"] / "best", ev / "dlr-warmstart-A", TASK_A)
        dlr = evaluate(runs["dlr"] / "best", ev / "dlr-A", TASK_A)
        grpo = evaluate(runs["grpo"] / "best", ev / "grpo-A", TASK_A)
        add("dlr-warmstart", "accuracy", warm["accuracy"], warm["n"], seed)
        add("dlr", "accuracy", dlr["accuracy"], dlr["n"], seed)
        add("grpo", "accuracy", grpo["accuracy"], grpo["n"], seed)
        # forgetting: each method's main model on B, as cot-sft (DLR's LM is the main model: verified bit-identical)
        same = weights_digest(runs["dlr"] / "best") == weights_digest(main_model)
        if not same:
            raise SystemExit(f"{runs['dlr'] / 'best'}: the main model's weights changed under DLR")
        dlr_b = frozen_b  # the same weights (checked above), so the same answers on B
        grpo_b = evaluate(runs["grpo"] / "best", ev / "grpo-B", TASK_B, method="cot-sft")
        add("dlr", "forgetting", dlr_b["accuracy"] - frozen_b["accuracy"], dlr_b["n"], seed, task="arith-B",
            weights_bit_identical=same)
        add("grpo", "forgetting", grpo_b["accuracy"] - frozen_b["accuracy"], grpo_b["n"], seed, task="arith-B")
        for name in ("dlr", "grpo"):
            add(name, "reward_std_last_half", reward_std_last_half(runs[name]), RL_STEPS - RL_STEPS // 2, seed,
                split="train", note="n = updates in the last half; std of the per-update mean reward")
            add(name, "seconds_per_update_in_training", seconds_per_update(runs[name]), RL_STEPS - 1, seed,
                split="train", note="median over the run's updates (validation excluded); runs trained one after another")
            curves[f"{name}/seed{seed}"] = runs[name]
    for row in seed_mean_rows(means, **fields):
        own = labels.get((row["method"], row["metric"]), {})
        note = f"{row['note']}; {own['note']}" if "note" in own else row["note"]
        rows.append({**row, **own, "note": note})
    if args.cost:
        c = cost(root, main_model, warm_start(root, main_model, args.seeds[0], dlr_cfg["latent_dim"]), dlr_cfg)
        base_row = {**fields, "split": "train", "n": c["updates"],
                    "note": f"G = {G}, {RL_BATCH} questions per update, alternating back to back; median ratio"}
        rows.append({**base_row, "method": "dlr", "metric": "update_speedup_vs_grpo", "value": round(c["speedup"], 3)})
        rows.append({**base_row, "method": "dlr", "metric": "seconds_per_update", "value": round(c["dlr_s"], 4)})
        rows.append({**base_row, "method": "grpo", "metric": "seconds_per_update", "value": round(c["grpo_s"], 4)})
    from latentreason.eval.report import plot_curves

    plot_curves(curves, RESULTS / "dlr_reward_curves.png", key="reward", smooth=5,
                title=f"training reward (mean of G = {G} samples x {RL_BATCH} questions), 5-update trailing mean")
    command = "python benchmarks/bench_dlr.py " + " ".join(sys.argv[1:])
    write_results("dlr_arith", command, rows, note=NOTE, calibration=table, main_model=main_model.name,
                  sweep=sweep_table, chosen={"dlr": dlr_cfg, "grpo": grpo_cfg})
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
