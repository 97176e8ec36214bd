"""DLR with SmolLM2-135M-Instruct as the frozen main model, 200 GSM8K-Aug validation questions.

    python benchmarks/bench_dlr_smollm2.py [--warm-steps 30] [--rl-steps 20]

A short run on 2 CPU cores (about 20 minutes), so read it as a working pipeline at real scale,
not as a result: the assistant is a shallow model made of SmolLM2's first 4 blocks (and its
embeddings), latent head width 512, L = 8 latents; warm start (SoftCoT's answer objective through
the frozen main model, 16 questions per step, lr 3e-4) then RL (G = 4, 8 questions per update,
σ = 0.3, lr 1e-4), answers decoded greedily (at most 16 tokens). Rows: zero-shot (the model as
shipped, writing its own chain: ``configs/zero_shot_gsm8k_aug_smollm2.yaml``, measured once and
read from its folder), dlr-warmstart, dlr; the training reward per update is in the JSON and in
dlr_smollm2_reward.png. Writes benchmarks/results/dlr_smollm2.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common import RESULTS, ROOT, write_results

from latentreason.config import load_run_config, load_yaml
from latentreason.recipes import run_eval, run_train

OUT = ROOT / "runs" / "bench-dlr-smollm2"
ZERO_SHOT = ROOT / "runs" / "bench-zero-shot-prompts" / "zero-shot-bare"
METHOD = {"name": "dlr", "assistant_layers": 4, "num_latents": 8, "group_size": 4}
COMMON = {"model": {"name_or_path": "smollm2-135m"}, "data": {"task": "gsm8k-aug"},
          "rollout": {"max_new_tokens": 16}}


def train(out: Path, method: dict, optim: dict, train_cfg: dict) -> Path:
    if not (out / "train_summary.json").exists():
        data = {**COMMON, "method": {**METHOD, **method}, "optim": optim,
                "train": {"output_dir": str(out), "select_on_valid": False, "log_every": 1, **train_cfg}}
        run_train(load_run_config(base=data))
    return out


def evaluate(folder: Path, out: Path, limit: int) -> dict:
    if (out / "summary.json").exists():
        return json.loads((out / "summary.json").read_text())
    data = load_yaml(folder / "run_config.yaml")
    data["model"]["name_or_path"] = str(folder)
    data["train"]["init_from"] = None
    data["eval"] = {"split": "valid", "limit": limit, "batch_size": 32, "output_dir": str(out)}
    return run_eval(load_run_config(base=data))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--warm-steps", type=int, default=30)
    ap.add_argument("--rl-steps", type=int, default=20)
    ap.add_argument("--limit", type=int, default=200)
    args = ap.parse_args()
    warm = train(OUT / "warmstart", {"warm_start_steps": args.warm_steps}, {"lr": 3e-4, "warmup_steps": 3},
                 {"max_steps": args.warm_steps, "global_batch_size": 16, "micro_batch_size": 8,
                  "save_every": 10})
    dlr = train(OUT / "dlr", {"warm_start_steps": 0, "sigma": 0.3},
                {"lr": 1e-4, "warmup_steps": 0, "scheduler": "constant"},
                {"init_from": str(warm / "final"), "max_steps": args.rl_steps, "global_batch_size": 8,
                 "micro_batch_size": 8, "save_every": 5})
    rows = []
    base = {"task": "gsm8k-aug", "model": "smollm2-135m", "split": "valid"}
    zero = json.loads((ZERO_SHOT / "summary.json").read_text())
    rows += [{**base, "method": "zero-shot", "metric": "accuracy", "value": zero["accuracy"], "n": zero["n"],
              "note": "the model as shipped writing its own chain (192 tokens), bare prompt; "
                      "latentreason eval --config configs/zero_shot_gsm8k_aug_smollm2.yaml method.prompt=bare"},
             {**base, "method": "zero-shot", "metric": "accuracy_flexible", "value": zero["accuracy_flexible"],
              "n": zero["n"]}]
    for name, folder in (("dlr-warmstart", warm / "final"), ("dlr", dlr / "final")):
        s = evaluate(folder, OUT / f"eval-{name}", args.limit)
        rows += [{**base, "method": name, "metric": "accuracy", "value": s["accuracy"], "n": s["n"],
                  "ci95": s["accuracy_ci95"]},
                 {**base, "method": name, "metric": "accuracy_flexible", "value": s["accuracy_flexible"], "n": s["n"]},
                 {**base, "method": name, "metric": "questions_per_second", "value": round(s["questions_per_second"], 3),
                  "n": s["n"]}]
    log = [json.loads(line) for line in (dlr / "log.jsonl").read_text().splitlines()]
    rewards = [(r["step"], round(r["reward"], 4)) for r in log if "reward" in r]
    from latentreason.eval.report import plot_curves

    plot_curves({"dlr": dlr}, RESULTS / "dlr_smollm2_reward.png", key="reward",
                title="DLR, SmolLM2-135M frozen, GSM8K-Aug train: reward per update (G = 4 x 8)")
    note = (f"SmolLM2-135M-Instruct frozen main model, CPU (2 cores), a short run: warm start {args.warm_steps} steps "
            f"x 16 questions, RL {args.rl_steps} updates x 8 questions x G = 4; assistant = SmolLM2's first 4 blocks. "
            f"Evaluated on the first {args.limit} GSM8K-Aug valid questions (no selection on them: final/ of each run).")
    print(write_results("dlr_smollm2", "python benchmarks/bench_dlr_smollm2.py " + " ".join(sys.argv[1:]), rows,
                        note=note, reward_curve=rewards))


if __name__ == "__main__":
    main()
