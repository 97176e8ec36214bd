"""The one trainer every method uses: Accelerate, exact resume, validation-based selection.

Design choices, and why:
- Data order is a pure function of (seed, step): step s consumes examples [s*G, (s+1)*G) of a
  per-epoch permutation, each process a contiguous 1/world slice. Resuming therefore needs only
  the step counter, and ``accelerate launch --num_processes N`` sees the same global batch G.
- Losses are summed per micro-batch and divided by the target count of the *global* batch
  (all-reduced before the forward), so N processes x M micro-batches give the gradient of one
  big batch, not a mean of means.
- The resumable checkpoint (``checkpoint/``: trainable weights in safetensors, optimizer,
  scheduler, RNG, step) is written to a temporary folder and renamed, so a SIGKILL at any moment
  leaves the previous one intact; log lines past the checkpoint are dropped on resume.
- ``best/`` is chosen on the validation split by the caller's ``select`` function, never on test.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from latentreason.config import RunConfig, to_dict
from latentreason.data.base import Example
from latentreason.io import atomic_replace_dir, atomic_write_json, atomic_write_text, read_jsonl
from latentreason.methods.base import Method
from latentreason.models.loading import save_checkpoint

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    final_loss: float
    best_metric: float | None
    seconds: float


class _LossModule(nn.Module):
    """Holds every trained module so one ``accelerator.prepare`` wraps them all (DDP/FSDP)."""

    def __init__(self, method: Method) -> None:
        super().__init__()
        self.method = [method]  # a list hides it from nn.Module registration
        self.parts = nn.ModuleDict({"lm": method.loaded.model, **method.extra_modules()})

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.method[0].loss(self.parts, batch)


def apply_lora(method: Method, run: RunConfig) -> None:
    """Wrap the LM with peft LoRA adapters in place (``method.loaded.model``)."""
    from peft import LoraConfig as PeftLora
    from peft import get_peft_model

    cfg = run.lora
    targets: str | list[str] = cfg.target_modules if cfg.target_modules == "all-linear" else cfg.target_modules.split(",")
    extra = None
    if cfg.train_embeddings:
        extra = [n for n, m in method.loaded.model.named_modules() if m is method.loaded.model.get_input_embeddings()]
    peft_cfg = PeftLora(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                        modules_to_save=[e.split(".")[-1] for e in extra] if extra else None, task_type="CAUSAL_LM")
    method.loaded.model = get_peft_model(method.loaded.model, peft_cfg)


def _schedule(run: RunConfig) -> Callable[[int], float]:
    warm, total, kind = run.optim.warmup_steps, run.train.max_steps, run.optim.scheduler

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total - warm)
        if kind == "cosine":
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if kind == "linear":
            return max(0.0, 1 - progress)
        return 1.0

    return factor


def batch_indices(n_examples: int, step: int, global_batch: int, seed: int) -> list[int]:
    """Example indices of global step ``step``: a pure function, so resume needs only the step."""
    start = step * global_batch
    out: list[int] = []
    while len(out) < global_batch:
        epoch, offset = divmod(start + len(out), n_examples)
        perm = np.random.RandomState(seed + epoch).permutation(n_examples)
        take = min(global_batch - len(out), n_examples - offset)
        out.extend(perm[offset: offset + take].tolist())
    return out


def _trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous() for n, p in module.named_parameters() if p.requires_grad}


class Trainer:
    """Runs ``method`` on ``examples`` for ``run.train.max_steps`` optimizer steps."""

    def __init__(
        self,
        run: RunConfig,
        method: Method,
        examples: list[Example],
        select: Callable[[Method], float] | None = None,
        accelerator: Any = None,
    ) -> None:
        from accelerate import Accelerator

        if not examples:
            raise ValueError(f"no training examples for task {run.data.task!r} split {run.data.train_split!r}")
        self.run, self.method, self.examples, self.select = run, method, examples, select
        self.acc = accelerator or Accelerator(cpu=not torch.cuda.is_available())
        world = self.acc.num_processes
        t = run.train
        if t.global_batch_size % (world * t.micro_batch_size):
            raise ValueError(
                f"train.global_batch_size={t.global_batch_size} must be a multiple of processes ({world}) x "
                f"train.micro_batch_size ({t.micro_batch_size}); e.g. set train.micro_batch_size="
                f"{max(1, t.global_batch_size // world)}"
            )
        self.out = Path(t.output_dir)
        self.ckpt = self.out / "checkpoint"
        self.log_path = self.out / "log.jsonl"
        self.module = _LossModule(method)
        params = [p for p in self.module.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"method {method.name!r} has no trainable parameters")
        o = run.optim
        self.optimizer = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _schedule(run))
        self.wrapped, self.optimizer = self.acc.prepare(self.module, self.optimizer)
        self.step = 0
        self.best: float | None = None

    # -- checkpoints ---------------------------------------------------------------------------
    def save_resumable(self) -> None:
        if self.acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=self.out, prefix=".checkpoint-"))
            module = self.acc.unwrap_model(self.wrapped)
            save_file(_trainable_state(module), str(tmp / "trainable.safetensors"))
            torch.save(
                {
                    "step": self.step,
                    "best": self.best,
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
                },
                tmp / "trainer_state.pt",
            )
            atomic_write_text(tmp / "config.yaml", yaml.safe_dump(to_dict(self.run), sort_keys=False))
            atomic_replace_dir(tmp, self.ckpt)
        self.acc.wait_for_everyone()

    def try_resume(self) -> bool:
        if not (self.run.train.resume and (self.ckpt / "trainer_state.pt").exists()):
            return False
        module = self.acc.unwrap_model(self.wrapped)
        saved = load_file(str(self.ckpt / "trainable.safetensors"))
        expected = _trainable_state(module)
        if set(saved) != set(expected):
            missing, extra = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
            raise ValueError(
                f"{self.ckpt}: checkpoint does not match this run's trainable parameters "
                f"(missing {missing[:5]}, unexpected {extra[:5]}); use a new train.output_dir or train.resume=false"
            )
        with torch.no_grad():
            for name, p in module.named_parameters():
                if name in saved:
                    p.copy_(saved[name])
        state = torch.load(self.ckpt / "trainer_state.pt", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        self.step, self.best = state["step"], state["best"]
        if self.acc.is_main_process and self.log_path.exists():
            rows = [r for r in read_jsonl(self.log_path, drop_torn_tail=True) if r.get("step", 0) <= self.step]
            atomic_write_text(self.log_path, "".join(json.dumps(r) + "\n" for r in rows))
        logger.info("resumed from %s at step %d", self.ckpt, self.step)
        return True

    def save_model(self, name: str) -> None:
        """A ``save_pretrained`` folder users load directly (LoRA merged), plus extra modules."""
        if self.acc.is_main_process:
            loaded = self.method.loaded
            save_checkpoint(loaded, self.out / name)
            extras = self.method.extra_modules()
            if extras:
                state = {f"{k}.{n}": t.detach().contiguous() for k, m in extras.items() for n, t in m.state_dict().items()}
                save_file(state, str(self.out / name / "extra_modules.safetensors"))
            atomic_write_text(self.out / name / "run_config.yaml", yaml.safe_dump(to_dict(self.run), sort_keys=False))
        self.acc.wait_for_everyone()

    # -- the loop ------------------------------------------------------------------------------
    def _micro_batches(self, step: int) -> list[dict[str, Any]]:
        t, world, rank = self.run.train, self.acc.num_processes, self.acc.process_index
        idx = batch_indices(len(self.examples), step, t.global_batch_size, t.seed)
        per_rank = t.global_batch_size // world
        mine = idx[rank * per_rank: (rank + 1) * per_rank]
        chunks = [mine[i: i + t.micro_batch_size] for i in range(0, len(mine), t.micro_batch_size)]
        return [self.method.collate([self.examples[i] for i in c]) for c in chunks]

    def _maybe_select(self) -> None:
        if self.select is None:
            return
        self.wrapped.eval()
        metric = self.select(self.method)  # every process evaluates: cheap, and keeps them in step
        self.wrapped.train()
        if self.acc.is_main_process:
            self._log({"step": self.step, "valid_metric": metric})
        if self.best is None or metric > self.best:
            self.best = metric
            self.save_model("best")

    def _log(self, row: dict[str, Any]) -> None:
        with open(self.log_path, "a") as fh:
            fh.write(json.dumps(row) + "\n")

    def train(self) -> TrainResult:
        t = self.run.train
        start = time.perf_counter()
        if self.acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out / "run_config.yaml", yaml.safe_dump(to_dict(self.run), sort_keys=False))
        self.try_resume()
        self.wrapped.train()
        bar = tqdm(total=t.max_steps, initial=self.step, desc=f"train {self.method.name}",
                   disable=not self.acc.is_main_process, dynamic_ncols=True)
        window_loss, window_steps, window_tokens, window_start = 0.0, 0, 0, time.perf_counter()
        last_loss, dropped = float("nan"), 0
        while self.step < t.max_steps:
            micro = self._micro_batches(self.step)
            local = torch.tensor(float(sum(b["num_targets"] for b in micro)), device=self.acc.device)
            total = float(self.acc.reduce(local, reduction="sum")) if self.acc.num_processes > 1 else float(local)
            scale = self.acc.num_processes / max(total, 1.0)  # DDP averages gradients over processes
            step_loss = torch.zeros((), device=self.acc.device)
            for i, batch in enumerate(micro):
                batch = {k: v.to(self.acc.device) if torch.is_tensor(v) else v for k, v in batch.items()}
                sync = i == len(micro) - 1
                with contextlib.nullcontext() if sync else self.acc.no_sync(self.wrapped):
                    out = self.wrapped(batch)
                    self.acc.backward(out["loss_sum"] * scale)
                step_loss += out["loss_sum"].detach()
                dropped += batch.get("dropped", 0)
            if self.run.optim.max_grad_norm > 0:
                self.acc.clip_grad_norm_(self.module.parameters(), self.run.optim.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            if self.acc.num_processes > 1:
                step_loss = self.acc.reduce(step_loss, reduction="sum")
            last_loss = float(step_loss) / max(total, 1.0)
            window_loss += last_loss
            window_steps += 1
            window_tokens += int(total)
            bar.update(1)
            bar.set_postfix(loss=f"{last_loss:.4f}")
            if self.step % t.log_every == 0 or self.step == t.max_steps:
                elapsed = time.perf_counter() - window_start
                if self.acc.is_main_process:
                    self._log({"step": self.step, "loss": window_loss / max(1, window_steps),
                               "lr": self.scheduler.get_last_lr()[0], "targets_per_s": window_tokens / max(elapsed, 1e-9),
                               "dropped_examples": dropped, "elapsed_s": round(time.perf_counter() - start, 3)})
                window_loss, window_steps, window_tokens, window_start = 0.0, 0, 0, time.perf_counter()
            if t.eval_every and self.step % t.eval_every == 0 and self.step < t.max_steps:
                self._maybe_select()
            if self.step % t.save_every == 0 or self.step == t.max_steps:
                self.save_resumable()
        bar.close()
        self.wrapped.eval()
        self._maybe_select()
        self.save_model("final")
        if self.acc.is_main_process:
            atomic_write_json(self.out / "train_summary.json", {
                "steps": self.step, "final_loss": last_loss, "best_valid_metric": self.best,
                "seconds_this_session": round(time.perf_counter() - start, 2), "processes": self.acc.num_processes,
                "global_batch_size": t.global_batch_size,
            })
        return TrainResult(self.out, self.step, last_loss, self.best, time.perf_counter() - start)
