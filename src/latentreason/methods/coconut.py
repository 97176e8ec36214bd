"""Coconut (Hao et al. 2024): continuous thoughts, the last hidden state fed back as the next input.

Training follows the paper's curriculum (../shared/docs/methods.md section 4): stage k replaces the
first k reasoning steps of the chain by k·c thoughts; a final stage drops every text step and
keeps max_stage·c thoughts (padded to that count, as the official ``pad_latent_to_max``). Labels
cover only what follows ``<eot>`` (the remaining steps, the answer, eos). Each stage is a trainer
stage: the optimizer may be reset at a switch, and every stage's model is kept (``stage-<k>/``).
Initialise from a CoT-SFT checkpoint (``train.init_from``) and start at stage 1 (the GSM8K recipe);
``method.first_stage=0`` trains a CoT stage first, the ProsQA recipe from a base model.

The gradient runs through every thought: :func:`~latentreason.models.latent_forward.latent_forward`
feeds them one pass each over a growing KV cache, then the targets in one pass. At evaluation
the shared rollout runs the same thoughts, batched and cached.

The pause control (``pause``) is this method with the thoughts replaced by learned constant
vectors, one per position, the same for every question: whatever it scores is what the extra
positions buy without carrying the question's reasoning.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from latentreason.config import MethodConfig
from latentreason.data.base import Example
from latentreason.data.collate import encode_targets
from latentreason.methods.base import METHODS, Method, Stage, stage_problems
from latentreason.models.latent_forward import latent_forward
from latentreason.models.rollout import RolloutConfig, max_positions
from latentreason.models.steps import ExternalStep, HiddenStateStep, LatentStep


@dataclass
class CoconutConfig(MethodConfig):
    name: str = "coconut"
    thoughts_per_step: int = field(default=2, metadata={"help": "c: thoughts that replace one text step (paper: 2 on GSM8K, 1 on ProsQA)"})
    max_stage: int = field(default=3, metadata={"help": "last curriculum stage k (k steps replaced); the final stage keeps max_stage·c thoughts"})
    first_stage: int = field(default=0, metadata={"help": "first curriculum stage trained (0 = a CoT stage with <bot><eot> and no thoughts)"})
    steps_per_stage: int = field(default=0, metadata={"help": "optimizer steps in each curriculum stage first_stage..max_stage; 0 = train.max_steps split evenly over every stage"})
    final_stage_steps: int = field(default=-1, metadata={"help": "optimizer steps in the final stage (every text step dropped); 0 = no final stage; -1 = as many as a curriculum stage"})
    reset_optimizer: bool = field(default=True, metadata={"help": "clear AdamW's state at each stage switch (what the official README says)"})
    reset_every_epoch: bool = field(default=False, metadata={"help": "also clear it whenever a new epoch of the training set begins (what the official code does)"})
    pad_thoughts: bool = field(default=True, metadata={"help": "final stage: max_stage·c thoughts for every question, even with fewer steps"})
    eval_thoughts: int | None = field(default=None, metadata={"help": "thoughts at evaluation; None = the trained stage's (saved with each stage's model)"})
    max_length: int = field(default=1024, metadata={"help": "training sequences longer than this (or than the model's context) are dropped"})

    def __post_init__(self) -> None:
        if self.thoughts_per_step < 1:
            raise ValueError(f"method.thoughts_per_step={self.thoughts_per_step}, must be >= 1")
        if self.steps_per_stage < 0:
            raise ValueError(f"method.steps_per_stage={self.steps_per_stage}, must be >= 0 (0 = auto)")
        if not 0 <= self.first_stage <= self.max_stage:
            raise ValueError(f"method.first_stage={self.first_stage} must be in [0, max_stage={self.max_stage}]")
        if self.final_stage_steps < -1:
            raise ValueError(f"method.final_stage_steps={self.final_stage_steps}, must be >= -1 (-1 = auto)")


def coconut_stages(c: CoconutConfig, max_steps: int) -> list[Stage]:
    """Curriculum stages first_stage..max_stage, then the final stage; best/ is chosen in the last.

    Automatic lengths (``steps_per_stage=0``) split ``train.max_steps`` evenly, the remainder going
    to the last stage; explicit ones must add up to it (checked before any weights load).
    """
    ks = list(range(c.first_stage, c.max_stage + 1))
    final = c.final_stage_steps != 0
    count = len(ks) + int(final)
    per = c.steps_per_stage or max(1, max_steps // count)
    lengths = [per] * len(ks) + ([per if c.final_stage_steps == -1 else c.final_stage_steps] if final else [])
    if not c.steps_per_stage:
        lengths[-1] += max(0, max_steps - sum(lengths))
    names = [f"stage-{k}" for k in ks] + (["stage-final"] if final else [])
    return [Stage(name, n, reset_optimizer=c.reset_optimizer, reset_each_epoch=c.reset_every_epoch,
                  select=i == count - 1)
            for i, (name, n) in enumerate(zip(names, lengths))]


@METHODS.register("coconut")
class Coconut(Method):
    """Continuous thoughts with the curriculum (Hao et al. 2024)."""

    name = "coconut"
    config_cls = CoconutConfig
    paper = "arXiv 2412.06769"
    cfg: CoconutConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.loaded.bot_id is None or self.loaded.eot_id is None:
            raise ValueError(f"method {self.name!r} needs <bot>/<eot>: keep model.add_latent_tokens=true")
        self.stage_index = len(self.stages()) - 1  # a loaded model runs as trained last: the final stage

    # -- the curriculum ------------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        return coconut_stages(self.cfg, self.run.train.max_steps)

    @classmethod
    def schedule_uses_max_steps(cls, run: Any) -> bool:
        return run.method.steps_per_stage == 0

    @classmethod
    def train_problems(cls, run: Any) -> list[str]:
        if run.method.first_stage == 0 and run.train.init_from:
            logging.getLogger("latentreason").warning(
                "method.first_stage=0 spends a stage of the budget on CoT (stage-0) again, from %s; the GSM8K "
                "recipe starts from a CoT-SFT model at stage 1: set method.first_stage=1", run.train.init_from)
        return stage_problems(coconut_stages(run.method, run.train.max_steps), run.train.max_steps)

    def _curriculum_stage(self) -> int | None:
        """k of the current stage; None = the final stage."""
        name = self.stages()[self.stage_index].name
        return None if name == "stage-final" else int(name.split("-")[1])

    def thoughts(self, num_steps: int) -> int:
        """Thoughts for a chain of ``num_steps`` text steps at the current stage: k·c at stage k even
        for a chain shorter than k (every step replaced), as the official code does and as a stage-k
        model is evaluated; the final stage pads to max_stage·c (or, unpadded, min(steps, max_stage)·c)."""
        c, k = self.cfg, self._curriculum_stage()
        if k is None:
            return c.max_stage * c.thoughts_per_step if c.pad_thoughts else min(num_steps, c.max_stage) * c.thoughts_per_step
        return k * c.thoughts_per_step

    def eval_thoughts(self) -> int:
        if self.cfg.eval_thoughts is not None:
            return self.cfg.eval_thoughts
        k = self._curriculum_stage()
        return (self.cfg.max_stage if k is None else k) * self.cfg.thoughts_per_step

    def saved_config(self) -> dict[str, Any]:
        """A stage's model evaluates with that stage's thoughts when loaded back."""
        data = super().saved_config()
        data["method"]["eval_thoughts"] = self.eval_thoughts()
        return data

    # -- training ------------------------------------------------------------------------------
    def collate(self, examples: list[Example]) -> dict[str, Any]:
        tok, k = self.loaded.tokenizer, self._curriculum_stage()
        prompts = self.bot_prompt_ids(examples)
        texts, counts = [], []
        for ex in examples:
            steps = self.task.chain_steps(ex)
            kept = [] if k is None else steps[min(k, len(steps)):]
            answer = self.task.answer_text(ex)
            texts.append(" ".join(kept + [answer]))
            counts.append(self.thoughts(len(steps)))
        targets = encode_targets(texts, tok, self.loaded.eos_ids[0])
        context = max_positions(self.loaded.model)
        limit = min(self.cfg.max_length, context) if context else self.cfg.max_length
        keep = [i for i in range(len(examples)) if len(prompts[i]) + counts[i] + 1 + len(targets[i]) <= limit]
        if not keep:
            raise ValueError(f"every example of this batch is longer than {limit} tokens (method.max_length="
                             f"{self.cfg.max_length}, model context {context})")
        return {"prompts": [prompts[i] for i in keep], "targets": [targets[i] for i in keep],
                "counts": [counts[i] for i in keep], "num_targets": sum(len(targets[i]) for i in keep),
                "dropped": len(examples) - len(keep)}

    def latent_inputs(self, modules: nn.ModuleDict, batch: dict[str, Any]) -> dict[str, Any]:
        """How the thoughts are supplied to the latent forward: fed-back hidden states."""
        return {"step": HiddenStateStep(), "num_steps": max(batch["counts"])}

    def loss(self, modules: nn.ModuleDict, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = latent_forward(modules["lm"], batch["prompts"], batch["targets"], eot_id=self.loaded.eot_id,
                             pad_id=self.loaded.pad_id, num_latents=batch["counts"], **self.latent_inputs(modules, batch))
        return {"loss_sum": out.loss_sum()}

    # -- evaluation ----------------------------------------------------------------------------
    def prompt_ids(self, examples: list[Example]) -> list[list[int]]:
        prompts = self.bot_prompt_ids(examples)
        if not self.eval_thoughts():  # stage 0 trains on [Q, <bot>, <eot>, chain]: the rollout feeds <eot> only
            prompts = [p + [self.loaded.eot_id] for p in prompts]  # after latents, so the prompt carries it here
        return prompts

    def latent_step(self, examples: list[Example]) -> LatentStep | None:
        return HiddenStateStep() if self.eval_thoughts() else None

    def rollout_config(self) -> RolloutConfig:
        from dataclasses import replace

        return replace(self.run.rollout, num_latent_steps=self.eval_thoughts())


@dataclass
class PauseConfig(CoconutConfig):
    name: str = "pause"


class PauseVectors(nn.Module):
    """K learned vectors, the same for every question (initialised from the <latent> token)."""

    def __init__(self, count: int, init: torch.Tensor) -> None:
        super().__init__()
        self.vectors = nn.Parameter(init.detach().clone().float()[None].repeat(count, 1))


@METHODS.register("pause")
class PauseControl(Coconut):
    """Control: Coconut's curriculum and budget with learned constant vectors in place of thoughts."""

    name = "pause"
    config_cls = PauseConfig
    paper = "pause tokens (Goyal et al. 2024) as Coconut's control"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        emb = self.loaded.model.get_input_embeddings().weight
        token = self.loaded.latent_id if self.loaded.latent_id is not None else self.loaded.bot_id
        count = max(self.cfg.max_stage * self.cfg.thoughts_per_step, self.cfg.eval_thoughts or 0)
        self.pause = PauseVectors(count, emb[token]).to(emb.device)

    def extra_modules(self) -> dict[str, nn.Module]:
        return {"pause": self.pause}

    def _vectors(self, module: PauseVectors, batch: int, k: int) -> torch.Tensor:
        dtype = self.loaded.model.get_input_embeddings().weight.dtype
        return module.vectors[:k].to(dtype)[None].expand(batch, k, -1)

    def latent_inputs(self, modules: nn.ModuleDict, batch: dict[str, Any]) -> dict[str, Any]:
        return {"vectors": self._vectors(modules["pause"], len(batch["prompts"]), max(batch["counts"]))}

    def latent_step(self, examples: list[Example]) -> LatentStep | None:
        k = self.eval_thoughts()
        return ExternalStep(self._vectors(self.pause, len(examples), k).detach()) if k else None
