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
- On-policy methods (``Method.on_policy``: DLR, GRPO) complete each micro-batch with samples
  drawn from the current weights (``Method.sample``) before the normaliser is summed, so a
  normaliser known only after generation (GRPO's sampled tokens) still gives one global batch.
- A method may declare stages (``Method.stages``). The stage of step s is a pure function of s,
  so resume needs nothing more; each stage's end saves ``<stage.name>/`` and a checkpoint, so a
  run killed later resumes after the switch; an optimizer reset at a stage's first step is
  idempotent, so a resume exactly at a boundary is exact too.
- Under FSDP (``configs/accelerate/fsdp.yaml``) each process holds shards of the weights and
  optimizer state: saving gathers them into whole tensors on the main process (the same files
  as without FSDP), resuming scatters them back, and validation runs with the weights gathered
  (``whole_parameters``), every process on the same questions so that their forwards pair up.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from latentreason.config import ADDED_FIELDS, RUN_CONFIG_FILE, ConfigError, RunConfig, to_dict
from latentreason.data.base import Example
from latentreason.io import (
    atomic_replace_dir,
    atomic_write_json,
    atomic_write_text,
    make_temp_dir,
    one_writer,
    provenance,
    read_jsonl,
    recover_dir,
    set_default_file_mode,
)
from latentreason.methods.base import Method, Stage, stage_index_at, stage_problems, stage_start
from latentreason.models.loading import CheckpointError

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
    """Wrap the LM with peft LoRA adapters in place (``method.loaded.model``).

    When the input embedding is adapted (a LoRA target, or ``train_embeddings``) on a model that
    ties it to the output layer, peft changes only the input lookup, so the model trained computes
    logits with the *base* table. The output layer is untied first (a frozen copy of the base
    table), so that the merged model saved computes exactly what was trained.
    """
    from peft import LoraConfig as PeftLora
    from peft import get_peft_model

    cfg = run.lora
    model = method.loaded.model
    targets: str | list[str] = cfg.target_modules if cfg.target_modules == "all-linear" else [
        t.strip() for t in cfg.target_modules.split(",") if t.strip()]
    embed = model.get_input_embeddings()
    embed_name = next(n for n, m in model.named_modules() if m is embed)
    targets_embedding = isinstance(targets, list) and any(
        embed_name == t or embed_name.endswith("." + t) for t in targets)
    if cfg.train_embeddings or targets_embedding:
        untie_output_embeddings(model)
    peft_cfg = PeftLora(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                        modules_to_save=[embed_name.split(".")[-1]] if cfg.train_embeddings else None,
                        task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):  # the adapters' initialisation is a function of the seed
        torch.manual_seed(run.train.seed)
        method.loaded.model = get_peft_model(model, peft_cfg)
        # Extra modules that are transformers of their own (Latent-SFT's encoder) get the same adapters.
        for owner, attr in method.lora_submodules():
            body = getattr(owner, attr)
            names = {n.split(".")[-1] for n, _ in body.named_modules()}
            wanted = targets if isinstance(targets, str) else [t for t in targets if t.split(".")[-1] in names]
            sub_cfg = PeftLora(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=wanted)
            setattr(owner, attr, get_peft_model(body, sub_cfg))


def untie_output_embeddings(model: nn.Module) -> None:
    """Give the output layer its own (frozen) copy of a tied input embedding table."""
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None or out.weight is not inp.weight:
        return
    out.weight = nn.Parameter(inp.weight.detach().clone(), requires_grad=False)
    model.config.get_text_config().tie_word_embeddings = False
    model.config.tie_word_embeddings = False


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


def batch_hint(global_batch: int, micro_batch: int, world: int) -> str:
    """Settings that divide evenly: the largest micro-batch up to ``micro_batch`` that splits each
    process's share; where the processes cannot share the batch equally, the next batch they can."""
    per_rank, rest = divmod(global_batch, world)
    fit = lambda share: max(d for d in range(1, min(share, micro_batch) + 1) if share % d == 0)  # noqa: E731
    if rest or not per_rank:
        micro = fit(per_rank + 1)
        return (f"e.g. set train.global_batch_size={world * (per_rank + 1)}"
                + ("" if micro == micro_batch else f" and train.micro_batch_size={micro}"))
    return f"e.g. set train.micro_batch_size={fit(per_rank)}"


def epoch_begins(step: int, global_batch: int, n_examples: int) -> bool:
    """Whether a new epoch's first example is in step ``step``'s batch (never at step 0: the first
    epoch needs no reset). Batches run across epoch ends (see :func:`batch_indices`)."""
    first, last = step * global_batch, (step + 1) * global_batch - 1
    return step > 0 and last // n_examples > (first - 1) // n_examples


def _resumable_state(module: _LossModule) -> dict[str, torch.Tensor]:
    """Trainable parameters, plus every buffer of the extra modules (running statistics, etc.).

    Frozen LM weights and the LM's own buffers (rotary tables) are rebuilt by loading the model,
    so they are not copied into every checkpoint.
    """
    state = {n: p.detach().contiguous() for n, p in module.named_parameters() if p.requires_grad}
    for key, part in module.parts.items():
        if key != "lm":
            state.update({f"parts.{key}.{n}": b.detach().contiguous() for n, b in part.named_buffers()})
    return state


def is_sharded(module: nn.Module) -> bool:
    """FSDP2 (``fully_shard``, what Accelerate's FSDP config applies) replaced the module's
    parameters by this process's shards (DTensors)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without DTensor has no FSDP2 either
        return False
    return any(isinstance(p, DTensor) for p in module.parameters())


@contextlib.contextmanager
def whole_parameters(module: nn.Module) -> Iterator[None]:
    """Inside, every FSDP2 unit of ``module`` has its parameters gathered whole on every process.

    Why: FSDP2 gathers a unit's weights only when that unit's own forward runs. Validation and
    sampling call the LM's body and output layer directly (the rollout), never the root unit's
    forward, so the root's weights (embeddings, final norm, output layer) would stay sharded.
    Collective: every process enters, and runs the same forwards inside (each layer still gathers
    and frees its weights around its forward). Writes to parameters inside are lost on exit. A
    no-op for a module without FSDP.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        FSDPModule = ()  # noqa: N806 - no FSDP2 in this torch: nothing to gather
    units = [m for m in module.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()


#: Settings a run may change when it resumes: they alter neither the trajectory nor the selection.
#: ``train.keep_every`` keeps ``<output_dir>/keep-<step>/``.
KEEP_PREFIX = "keep-"

RESUME_SAFE = ("train.max_steps", "train.save_every", "train.log_every", "train.eval_every", "train.resume",
               "train.output_dir", "train.keep_every", "eval.", "refine.")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(saved: dict[str, Any], current: dict[str, Any], safe: tuple[str, ...] = RESUME_SAFE) -> list[str]:
    """Dotted fields that differ between a checkpoint's config and this run's, unsafe ones only. A field
    added since the checkpoint was written matches the value that behaves as before (``ADDED_FIELDS``)."""
    a, b = _flatten(saved), _flatten(current)
    a = {**{k: v for k, v in ADDED_FIELDS.items() if k in b and k not in a}, **a}
    changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return [k for k in changed if not any(k == s or (s.endswith(".") and k.startswith(s)) for s in safe)]


def resume_safe(run: RunConfig) -> tuple[str, ...]:
    """RESUME_SAFE, less what shapes this run: ``train.max_steps`` for a method whose stage lengths
    derive from it or under a decaying learning rate (cosine, linear: its curve spans max_steps, so
    a longer run would jump back up mid-way); ``train.eval_every`` and ``refine.*`` when validation
    picks best/ (they decide which steps compete and how they are scored; Latent-SFT's stage 1 also
    restarts each of its steps from that pick)."""
    from latentreason.methods.base import METHODS

    unsafe = set()
    stages = run.method.name in METHODS and METHODS.get(run.method.name).schedule_uses_max_steps(run)
    if stages or run.optim.scheduler != "constant":
        unsafe.add("train.max_steps")
    if run.train.select_on_valid:
        unsafe |= {"train.eval_every", "refine."}
    return tuple(s for s in RESUME_SAFE if s not in unsafe)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _restart_hint(ckpt: Path) -> str:
    return (f"the checkpoint is truncated or corrupt. Delete {ckpt} (or set train.resume=false) to "
            "start again from step 0, or use a new train.output_dir")


def resumable_checkpoint(run: RunConfig) -> Path | None:
    """The checkpoint this run will resume from (None: a fresh start); refuses other settings.

    Cheap (reads one YAML file), so entry points call it before loading any weights, and the
    trainer again before it writes anything: ``run_config.yaml`` always holds the config in force.
    """
    ckpt = Path(run.train.output_dir) / "checkpoint"
    if not run.train.resume:
        return None
    recover_dir(ckpt)  # a save killed between its two renames left only checkpoint.old
    if not (ckpt / "trainer_state.pt").exists():
        return None
    cfg_file = ckpt / "config.yaml"
    try:
        saved = yaml.safe_load(cfg_file.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise CheckpointError(f"{cfg_file}: unreadable ({exc}); {_restart_hint(ckpt)}") from exc
    current = to_dict(run)
    safe = resume_safe(run)
    changed = config_changes(saved, current, safe)
    if changed:
        old, new = _flatten(saved), _flatten(current)
        diffs = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:8])
        raise CheckpointError(
            f"{ckpt} was written with other settings ({diffs}); resuming would mix two runs. Rerun with "
            "the saved values, use a new train.output_dir, or set train.resume=false to start over. "
            f"Safe to change on resume: {', '.join(safe)}"
        )
    return ckpt


def accelerator_options(run: RunConfig) -> dict[str, Any]:
    """CPU or the accelerator as ``model.device`` says; bfloat16 autocast under ``model.dtype=auto``
    on a GPU that supports it (float32 weights and optimizer state, the usual mixed precision)."""
    from latentreason.models.loading import resolve_device

    device = resolve_device(run.model.device)
    bf16 = run.model.dtype == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    return {"cpu": device.type == "cpu", "mixed_precision": "bf16" if bf16 else "no"}


def sharding_fallback(distributed_type: str, environ: dict[str, str] | None = None) -> str | None:
    """Why the launch's FSDP/DeepSpeed request does not apply, or None. Accelerate runs an FSDP or
    DeepSpeed config on CPU processes as plain data parallel (MULTI_CPU) without saying so."""
    env = os.environ if environ is None else environ
    for key, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if str(env.get(key, "")).lower() in ("1", "true") and name.lower() not in str(distributed_type).lower():
            return (f"the accelerate config asks for {name}, but this run is {distributed_type} (on CPU processes "
                    f"Accelerate falls back to data parallel): every process holds the whole model")
    return None


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
        options = accelerator_options(run)
        if any(stage.frozen for stage in method.stages() or []):
            # a stage may leave a part out of the loss (Latent-SFT's warm-up: no LM layer): DDP must not
            # wait for its gradients (DeepSpeed refuses such stages; FSDP2 does not wait)
            from accelerate.utils import DistributedDataParallelKwargs

            options["kwargs_handlers"] = [DistributedDataParallelKwargs(find_unused_parameters=True)]
        self.acc = accelerator or Accelerator(**options)
        fallback = sharding_fallback(str(self.acc.distributed_type))
        if fallback and self.acc.is_main_process:
            logger.warning(fallback)
        world = self.acc.num_processes
        t = run.train
        if t.global_batch_size % (world * t.micro_batch_size):
            raise ValueError(
                f"train.global_batch_size={t.global_batch_size} must be a multiple of processes ({world}) x "
                f"train.micro_batch_size ({t.micro_batch_size}); {batch_hint(t.global_batch_size, t.micro_batch_size, world)}"
            )
        # Per-rank seed: dropout and sampled noise must differ between processes (and are
        # restored exactly on resume). Model initialisation has happened already, seeded apart.
        seed = t.seed * 1000 + self.acc.process_index
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
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
        self.deepspeed = str(self.acc.distributed_type).endswith("DEEPSPEED")
        if self.deepspeed:
            self._configure_deepspeed(method)
        self.wrapped, self.optimizer = self.acc.prepare(self.module, self.optimizer)
        self.sharded = is_sharded(self.acc.unwrap_model(self.wrapped))
        if self.sharded and method.on_policy:
            raise ConfigError([f"method {method.name!r} samples on-policy, each process its own questions, and FSDP "
                               "needs every process's forwards to pair up; train it with DDP "
                               "(configs/accelerate/ddp.yaml) or DeepSpeed"])
        if self.sharded and run.lora.enabled:
            raise ConfigError(["lora.enabled=true under FSDP is not supported (saving merges the adapters into "
                               "whole weights); use DDP (configs/accelerate/ddp.yaml) or DeepSpeed"])
        self.step = 0
        self.best: float | None = None
        self.stages: list[Stage] | None = method.stages()
        if self.stages is not None:  # a safety net: methods check this in validate(run), before weights load
            problems = stage_problems(self.stages, t.max_steps)
            if problems:
                raise ConfigError([f"method {method.name!r}: {p}" for p in problems])
        self.stage_index: int | None = None  # the stage last given to method.set_stage
        if self.stages is not None:
            parts = set(self.module.parts)
            for stage in self.stages:
                unknown = sorted(set(stage.frozen) - parts)
                if unknown:
                    raise ConfigError([f"method {method.name!r}: stage {stage.name!r} freezes {unknown}, but the "
                                       f"trained parts are {sorted(parts)}"])
                if stage.restore_best and select is None:
                    raise ConfigError([f"method {method.name!r}: stage {stage.name!r} keeps its best checkpoint on "
                                       "validation; set train.select_on_valid=true"])
        # Best of the current restore_best stage: its metric and trainable state (on the host).
        self.stage_best: float | None = None
        self.stage_best_state: dict[str, torch.Tensor] | None = None
        self._selected_at: int | None = None

    def _configure_deepspeed(self, method: Method) -> None:
        """DeepSpeed steps the optimizer inside ``backward`` (Accelerate calls ``engine.step``), so
        each process takes its share of a step in one micro-batch and nothing runs between the
        backward and the step (a stage's frozen parts cannot be skipped there). Batch size and
        clipping come from the recipe, not from the accelerate config."""
        t, world = self.run.train, self.acc.num_processes
        per_rank = t.global_batch_size // world
        problems = []
        if t.micro_batch_size != per_rank:
            problems.append(f"under DeepSpeed each process takes its share of a step in one micro-batch: set "
                            f"train.micro_batch_size={per_rank} (train.global_batch_size / {world} processes)")
        if any(stage.frozen for stage in method.stages() or []):
            problems.append(f"method {method.name!r} freezes parts in some stages, which DeepSpeed cannot skip (its "
                            "optimizer steps inside backward); train it with DDP or FSDP")
        if problems:
            raise ConfigError(problems)
        self.acc.state.deepspeed_plugin.deepspeed_config.update(
            train_micro_batch_size_per_gpu=t.micro_batch_size, gradient_accumulation_steps=1,
            train_batch_size=t.global_batch_size, gradient_clipping=float(self.run.optim.max_grad_norm))

    # -- checkpoints ---------------------------------------------------------------------------
    # Under FSDP the reads below gather whole tensors onto the main process (collectives: every
    # process calls them; the others get empty dicts) and the writes scatter them back.
    def _gathered_state(self) -> dict[str, torch.Tensor]:
        """Every weight and persistent buffer of the sharded module, whole, on the main process's host."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.acc.unwrap_model(self.wrapped),
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        """The resumable state (``_resumable_state``), whole, on the host of the main process."""
        module = self.acc.unwrap_model(self.wrapped)
        if not self.sharded:
            return {k: v.detach().to("cpu", copy=True) for k, v in _resumable_state(module).items()}
        full = self._gathered_state()
        return {k: full[k].contiguous() for k in _resumable_state(module) if k in full}

    def _load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        """Write ``state`` (names as ``_resumable_state``) into the live parameters and buffers."""
        module = self.acc.unwrap_model(self.wrapped)
        if not self.sharded:
            with torch.no_grad():
                for name, t in [*module.named_parameters(), *module.named_buffers()]:
                    if name in state:
                        t.copy_(state[name].to(t.device))
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        # The main process's copy is scattered; the call replaces the dict's values, so it gets a copy.
        set_model_state_dict(module, dict(state) if self.acc.is_main_process else {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False))

    def _optimizer_state(self) -> dict[str, Any]:
        if not self.sharded:
            return self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(self.acc.unwrap_model(self.wrapped), getattr(self.optimizer, "optimizer", self.optimizer),
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _load_optimizer_state(self, state: dict[str, Any]) -> None:
        if not self.sharded:
            self.optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(self.acc.unwrap_model(self.wrapped), getattr(self.optimizer, "optimizer", self.optimizer),
                                 state, options=StateDictOptions(full_state_dict=True))

    def _whole(self) -> contextlib.AbstractContextManager:
        return whole_parameters(self.acc.unwrap_model(self.wrapped)) if self.sharded else contextlib.nullcontext()

    def save_resumable(self) -> None:
        # Every rank's RNG (dropout masks, sampled noise differ per rank), gathered to the writer.
        from accelerate.utils import gather_object

        rngs = gather_object([_rng_state()]) if self.acc.num_processes > 1 else [_rng_state()]
        # Under FSDP every process takes part in gathering; otherwise the writer alone copies.
        trainable = self._trainable_state() if self.sharded or self.acc.is_main_process else {}
        optimizer = self._optimizer_state()
        if self.acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            tmp = make_temp_dir(self.out, "checkpoint")
            save_file(trainable, str(tmp / "trainable.safetensors"))
            set_default_file_mode(tmp / "trainable.safetensors")
            if self.stage_best_state is not None:
                save_file(self.stage_best_state, str(tmp / "stage_best.safetensors"))
                set_default_file_mode(tmp / "stage_best.safetensors")
            torch.save(
                {
                    "step": self.step,
                    "best": self.best,
                    "stage_best": self.stage_best,
                    "optimizer": optimizer,
                    "scheduler": self.scheduler.state_dict(),
                    "rng": rngs,
                    "sharded": self.sharded,  # the optimizer state's layout: FSDP's is keyed by name
                    "selected_at": self._selected_at,  # a resume does not validate (and log) this step again
                },
                tmp / "trainer_state.pt",
            )
            atomic_write_text(tmp / "config.yaml", yaml.safe_dump(to_dict(self.run), sort_keys=False))
            atomic_replace_dir(tmp, self.ckpt)
        self.acc.wait_for_everyone()

    def _read_checkpoint(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The checkpoint's tensors and trainer state, or an error naming the unreadable file."""
        files = self.ckpt / "trainable.safetensors", self.ckpt / "trainer_state.pt"
        try:
            saved = load_file(str(files[0]))
        except Exception as exc:
            raise CheckpointError(f"{files[0]}: unreadable ({exc}); {self._restart_hint()}") from exc
        try:
            state = torch.load(files[1], weights_only=False)
        except Exception as exc:
            raise CheckpointError(f"{files[1]}: unreadable ({exc}); {self._restart_hint()}") from exc
        return saved, state

    def _restart_hint(self) -> str:
        return _restart_hint(self.ckpt)

    def check_resume(self) -> bool:
        return resumable_checkpoint(self.run) is not None

    def try_resume(self) -> bool:
        if not self.check_resume():
            return False
        module = self.acc.unwrap_model(self.wrapped)
        saved, state = self._read_checkpoint()
        expected = _resumable_state(module)
        if set(saved) != set(expected):
            missing, extra = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
            raise CheckpointError(
                f"{self.ckpt}: checkpoint does not match this run's trainable parameters "
                f"(missing {missing[:5]}, unexpected {extra[:5]}); use a new train.output_dir or train.resume=false"
            )
        if self.deepspeed and self.acc.num_processes > 1:
            raise CheckpointError(
                f"{self.ckpt}: resuming a DeepSpeed run of several processes is not supported (each process's "
                "optimizer partition would be needed); set train.resume=false or use a new train.output_dir"
            )
        if bool(state.get("sharded", False)) != self.sharded:
            how = {True: "under FSDP", False: "without FSDP"}
            raise CheckpointError(
                f"{self.ckpt}: written {how[bool(state.get('sharded', False))]}, resumed {how[self.sharded]}: the "
                "optimizer state is laid out differently. Resume with the accelerate config it was written with, or "
                "use a new train.output_dir"
            )
        self._load_trainable_state(saved)
        self._load_optimizer_state(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
        if len(rngs) == self.acc.num_processes:
            _set_rng_state(rngs[self.acc.process_index])
        else:
            logger.warning("checkpoint written by %d processes, resumed on %d: random streams (dropout) restart "
                           "from the seed; the data order is unchanged", len(rngs), self.acc.num_processes)
        self.step, self.best = state["step"], state["best"]
        self._selected_at = state.get("selected_at")
        if self.step > self.run.train.max_steps:
            raise CheckpointError(
                f"{self.ckpt} is at step {self.step}, past train.max_steps={self.run.train.max_steps}: a run cannot "
                "be shortened after the fact. Raise train.max_steps, use a new train.output_dir, or evaluate a "
                f"saved model (keep-<step>/ with train.keep_every)")
        self.stage_best = state.get("stage_best")
        best_file = self.ckpt / "stage_best.safetensors"
        self.stage_best_state = load_file(str(best_file)) if self.stage_best is not None and best_file.exists() else None
        if self.acc.is_main_process and self.log_path.exists():
            every = read_jsonl(self.log_path, drop_torn_tail=True)
            rows = [r for r in every if r.get("step", 0) <= self.step]
            if len(rows) < len(every) or not self.log_path.read_bytes().endswith(b"\n"):  # rows past the checkpoint, a torn line
                atomic_write_text(self.log_path, "".join(json.dumps(r) + "\n" for r in rows))
        logger.info("resumed from %s at step %d", self.ckpt, self.step)
        return True

    def _start_fresh_log(self) -> None:
        """A fresh run in a folder an earlier run wrote to (``train.resume=false``, or its checkpoint
        gone) neither appends to that run's log nor leaves its models beside the new ones (a stale
        ``keep-<step>/`` would be taken as a reference, a stale ``best/`` read as this run's): all of
        it moves, whole, to ``previous-<time>/``."""
        if not self.acc.is_main_process or not self.out.is_dir():
            return
        earlier = [p for p in self.out.iterdir()
                   if (p.is_file() and p.name in ("log.jsonl", "train_summary.json", RUN_CONFIG_FILE))
                   or (p.is_dir() and (p.name in ("checkpoint", "checkpoint.old")
                                       or (p / RUN_CONFIG_FILE).exists() and not p.name.startswith("previous-")))]
        if all(p.name == RUN_CONFIG_FILE for p in earlier):  # a start that died before its first log line
            return
        kept = self.out / f"previous-{time.strftime('%Y%m%d-%H%M%S')}"
        n = 0
        while kept.exists():  # two fresh starts within a second
            n += 1
            kept = self.out / f"previous-{time.strftime('%Y%m%d-%H%M%S')}-{n}"
        kept.mkdir()
        for p in earlier:
            os.replace(p, kept / p.name)
        logger.info("starting a fresh run in %s; the earlier run's %s moved to %s", self.out,
                    ", ".join(sorted(p.name for p in earlier)), kept.name)

    def save_model(self, name: str) -> None:
        """``best/`` or ``final/``: what ``Method.from_pretrained`` and ``latentreason eval`` read."""
        states = None
        if self.sharded:  # whole weights of every part, gathered onto the main process
            module = self.acc.unwrap_model(self.wrapped)
            full = self._gathered_state()
            # A tied weight (output layer = input embedding) comes back under both names as two
            # tensors; the saved folder keeps it once, as save_pretrained does for a live model.
            aliases = ({n for n, _ in module.named_parameters(remove_duplicate=False)}
                       - {n for n, _ in module.named_parameters()})
            states = {part: {k[len(f"parts.{part}."):]: v for k, v in full.items()
                             if k.startswith(f"parts.{part}.") and k not in aliases}
                      for part in self.module.parts}
        if self.acc.is_main_process:
            self.method.save_pretrained(self.out / name, states=states)
        self.acc.wait_for_everyone()

    # -- the loop ------------------------------------------------------------------------------
    def _micro_batches(self, step: int) -> list[dict[str, Any]]:
        t, world, rank = self.run.train, self.acc.num_processes, self.acc.process_index
        idx = batch_indices(len(self.examples), step, t.global_batch_size, t.seed)
        per_rank = t.global_batch_size // world
        mine = idx[rank * per_rank: (rank + 1) * per_rank]
        chunks = [mine[i: i + t.micro_batch_size] for i in range(0, len(mine), t.micro_batch_size)]
        return [self.method.collate([self.examples[i] for i in c]) for c in chunks]

    def _sample(self, micro: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """On-policy step, first half: samples from the current weights (no gradients, eval mode);
        the unwrapped parts run it, so every process samples its own slice of the global batch.
        Under the same autocast as the loss's forward: log-probabilities sampled in float32 and
        scored in bfloat16 differ (for DLR's Gaussian over L x d latents, by ratios far outside the
        clip range at what should be ratio 1), and the clipped surrogate then drops most updates."""
        self.wrapped.eval()
        try:
            with torch.no_grad(), self.acc.autocast():
                return [self.method.sample(self.module.parts, b, self.step) for b in micro]
        finally:
            self._train_mode()

    def _train_mode(self) -> None:
        """Train mode, but dropout off for on-policy methods: the importance ratio of the first
        update is 1 only if the policy scored is the one that sampled (TRL disables dropout too)."""
        if self.method.on_policy:
            self.wrapped.eval()
        else:
            self.wrapped.train()

    def _current_stage(self) -> Stage | None:
        """The stage of the step last taken (the first stage before any step)."""
        if self.stages is None:
            return None
        return self.stages[stage_index_at(self.stages, max(self.step - 1, 0))]

    def _enter_stage(self) -> None:
        """Before the step at ``self.step``: reset the optimizer at a resetting stage's first step, then
        tell the method its stage when it changed (or was never given: a fresh start, a resume)."""
        assert self.stages is not None
        i = stage_index_at(self.stages, self.step)
        stage = self.stages[i]
        switch = i > 0 and stage.reset_optimizer and self.step == stage_start(self.stages, i)
        epoch = stage.reset_each_epoch and epoch_begins(self.step, self.run.train.global_batch_size,
                                                         len(self.examples))
        if switch or epoch:
            # AdamW moments and step counts go; the LR schedule stays global. Idempotent: a resume
            # at this step (its checkpoint holds the previous stage's state) clears it again.
            getattr(self.optimizer, "optimizer", self.optimizer).state.clear()
        if i != self.stage_index:
            self.method.set_stage(i, stage)
            self.stage_index = i

    def _drop_frozen_grads(self) -> None:
        """The current stage's frozen parts get no update: AdamW skips parameters without a gradient."""
        stage = self.stages[stage_index_at(self.stages, self.step)] if self.stages is not None else None
        for part in stage.frozen if stage is not None else ():
            for p in self.module.parts[part].parameters():
                p.grad = None

    def _restore_stage_best(self) -> None:
        """Load the current stage's best trainable state back (the next stage starts from it)."""
        if self.stage_best_state is None:
            return
        self._load_trainable_state(self.stage_best_state)
        if self.acc.is_main_process:
            self._log({"step": self.step, "restored_best_valid_metric": self.stage_best})
        self.stage_best, self.stage_best_state = None, None

    def _end_of_stage(self) -> bool:
        """After a step: save ``<stage.name>/`` when it was the stage's last; True if so."""
        if self.stages is None:
            return False
        i = stage_index_at(self.stages, self.step - 1)
        if self.step != stage_start(self.stages, i + 1):
            return False
        if self.stages[i].restore_best:
            self._maybe_select()  # the stage's last step is a candidate too (no-op if just validated)
            self._restore_stage_best()
        self.save_model(self.stages[i].name)
        if i + 1 < len(self.stages) and self.acc.is_main_process:
            self._log({"stage": self.stages[i + 1].name, "step": self.step})
        return True

    def _maybe_select(self) -> None:
        if self.select is None or self._selected_at == self.step:
            return
        stage = self._current_stage()
        for_run = stage is None or stage.select
        for_stage = stage is not None and stage.restore_best
        if not (for_run or for_stage):
            return
        self.wrapped.eval()
        with self._whole():
            metric = self.select(self.method)  # every process evaluates: cheap, and keeps them in step
        self._train_mode()
        self._selected_at = self.step
        if self.acc.is_main_process:
            self._log({"step": self.step, "valid_metric": metric})
        if for_stage and (self.stage_best is None or metric > self.stage_best):
            self.stage_best = metric
            self.stage_best_state = self._trainable_state()  # under FSDP: the main process's (empty elsewhere)
        if for_run and (self.best is None or metric > self.best):
            self.best = metric
            self.save_model("best")

    def _log(self, row: dict[str, Any]) -> None:
        stage = self._current_stage()
        if stage is not None and "stage" not in row:
            row = {**row, "stage": stage.name}
        with open(self.log_path, "a") as fh:
            fh.write(json.dumps(row) + "\n")

    def train(self) -> TrainResult:
        """Train to ``train.max_steps``, resuming ``<output_dir>/checkpoint``; the main process holds
        the output folder meanwhile (another run writing it is refused) and first deletes what a
        killed save left there."""
        with one_writer(self.out, "train.output_dir", enabled=self.acc.is_main_process):
            return self._train()

    def _train(self) -> TrainResult:
        t = self.run.train
        start = time.perf_counter()
        resumed = self.try_resume()  # first: refuses a checkpoint of other settings before writing
        if not resumed:
            self._start_fresh_log()
        first_step = self.step
        done = self.out / "train_summary.json"
        summary = json.loads(done.read_text()) if resumed and done.exists() else {}
        if resumed and self.step >= t.max_steps and summary.get("steps") == self.step and (self.out / "final").exists():
            # the same command again: nothing to train, and best/, final/ and the log stay as they were
            # (a summary of fewer steps is an earlier, shorter run's: this one's end is still to write)
            logger.info("%s: already trained to step %d (train_summary.json); nothing to do", self.out, self.step)
            loss = summary.get("final_loss")  # None where it was NaN (strict JSON)
            return TrainResult(self.out, self.step, float("nan") if loss is None else loss,
                               summary.get("best_valid_metric"), 0.0)
        if self.acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out / "run_config.yaml", yaml.safe_dump(to_dict(self.run), sort_keys=False))
        self._train_mode()
        bar = tqdm(total=t.max_steps, initial=self.step, desc=f"train {self.method.name}",
                   disable=not self.acc.is_main_process, dynamic_ncols=True)
        window_loss, window_steps, window_tokens, window_start = 0.0, 0, 0, time.perf_counter()
        last_loss, dropped = float("nan"), 0
        extras: dict[str, list[torch.Tensor]] = {}  # a method's own scalars (loss parts, latent statistics), per log window
        if self.stages is not None and self.step == 0 and self.acc.is_main_process:
            self._log({"stage": self.stages[0].name, "step": 0})
        while self.step < t.max_steps:
            if self.stages is not None:
                self._enter_stage()
            micro = self._micro_batches(self.step)
            if self.method.on_policy:
                micro = self._sample(micro)
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
                for key, value in out.items():
                    if key != "loss_sum" and torch.is_tensor(value) and value.dim() == 0:
                        extras.setdefault(key, []).append(value.detach().float())  # read at log time: no sync here
                dropped += batch.get("dropped", 0)
            self._drop_frozen_grads()
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
                if self.acc.num_processes > 1:  # every process's batches, not the main one's alone
                    dropped = int(self.acc.reduce(torch.tensor(dropped, device=self.acc.device), reduction="sum"))
                if self.acc.is_main_process:
                    self._log({"step": self.step, "loss": window_loss / max(1, window_steps),
                               "lr": self.scheduler.get_last_lr()[0], "targets_per_s": window_tokens / max(elapsed, 1e-9),
                               "dropped_examples": dropped, "elapsed_s": round(time.perf_counter() - start, 3),
                               **{k: float(torch.stack(v).mean()) for k, v in extras.items()}})
                extras, dropped = {}, 0
                window_loss, window_steps, window_tokens, window_start = 0.0, 0, 0, time.perf_counter()
            if (t.eval_every and self.step % t.eval_every == 0) or self.step == t.max_steps:
                self._maybe_select()  # the last step's too, before its checkpoint: a kill after it loses nothing
            stage_ended = self._end_of_stage()
            if t.keep_every and self.step % t.keep_every == 0:
                self.save_model(f"{KEEP_PREFIX}{self.step}")  # early and late models of one run (references)
            if self.step % t.save_every == 0 or self.step == t.max_steps or stage_ended:
                self.save_resumable()
        bar.close()
        if self.step == first_step and self.log_path.exists():
            # killed after its last checkpoint, before final/: no step ran now, the log has the last loss
            losses = [r["loss"] for r in read_jsonl(self.log_path, drop_torn_tail=True) if "loss" in r]
            last_loss = losses[-1] if losses else last_loss
        self.wrapped.eval()
        self._maybe_select()
        self.save_model("final")
        if self.acc.is_main_process:
            atomic_write_json(self.out / "train_summary.json", {
                "steps": self.step, "final_loss": None if math.isnan(last_loss) else last_loss, "best_valid_metric": self.best,
                "seconds_this_session": round(time.perf_counter() - start, 2), "processes": self.acc.num_processes,
                "distributed_type": str(self.acc.distributed_type).rsplit(".", 1)[-1], "device": str(self.acc.device),
                "global_batch_size": t.global_batch_size, "provenance": provenance(),
            })
        return TrainResult(self.out, self.step, last_loss, self.best, time.perf_counter() - start)
