"""Supervised fine-tuning baselines: ``cot-sft`` (explicit chain, then the answer), ``nocot-sft``
(the answer directly), and ``zero-shot`` (no training; the instruction alone).

Every latent method is measured against these: CoT-SFT sets the accuracy to match and the
reasoning length to beat; no-CoT shows what the task costs without reasoning. Also the usual
starting point of Latent-SFT and Coconut.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from latentreason.config import MethodConfig
from latentreason.data.base import Example
from latentreason.data.collate import IGNORE, encode_prompts, encode_targets, pad_right
from latentreason.methods.base import METHODS, Method
from latentreason.models.rollout import max_positions

logger = logging.getLogger(__name__)


@dataclass
class SFTConfig(MethodConfig):
    name: str = "cot-sft"
    with_chain: bool = field(default=True, metadata={"help": "train on chain + answer (CoT) or the answer alone"})
    max_length: int = field(default=1024, metadata={"help": "training sequences longer than this, or than the model's context, are dropped (counted in the log)"})


@dataclass
class NoCoTConfig(SFTConfig):
    name: str = "nocot-sft"
    with_chain: bool = False


@METHODS.register("cot-sft")
class CoTSFT(Method):
    """Supervised fine-tuning on chain + answer: the explicit-CoT baseline every latent method starts from."""

    name = "cot-sft"
    config_cls = SFTConfig
    cfg: SFTConfig

    def target_text(self, ex: Example) -> str:
        answer = self.task.answer_text(ex)
        chain = self.task.chain_text(ex) if self.cfg.with_chain else ""
        return f"{chain} {answer}" if chain else answer

    def collate(self, examples: list[Example]) -> dict[str, Any]:
        tok = self.loaded.tokenizer
        prompts = self.prompt_ids(examples)
        targets = encode_targets([self.target_text(ex) for ex in examples], tok, self.loaded.eos_ids[0])
        # The same rule as evaluation (rollout.check_context): no position past the model's table.
        context = max_positions(self.loaded.model)
        limit = min(self.cfg.max_length, context) if context else self.cfg.max_length
        seqs, labels = [], []
        for p, t in zip(prompts, targets):
            if len(p) + len(t) > limit:
                continue
            seqs.append(p + t)
            labels.append([IGNORE] * len(p) + t)
        if not seqs:
            longest = max(len(p) + len(t) for p, t in zip(prompts, targets))
            raise ValueError(
                f"every example of this batch is longer than {limit} tokens (method.max_length="
                f"{self.cfg.max_length}, model context {context}); the longest has {longest}. Raise "
                "method.max_length, use a model with a longer context, or a task with shorter examples"
            )
        batch = pad_right(seqs, labels, self.loaded.pad_id)
        # Each label predicts from the previous position: count the shifted targets.
        batch["num_targets"] = int((batch["labels"][:, 1:] != IGNORE).sum())
        batch["dropped"] = len(examples) - len(seqs)
        return batch

    def loss(self, modules: nn.ModuleDict, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = modules["lm"](input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        logits = out.logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        loss_sum = nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, reduction="sum"
        )
        return {"loss_sum": loss_sum}


@METHODS.register("nocot-sft")
class NoCoTSFT(CoTSFT):
    """Supervised fine-tuning on the answer alone: the no-reasoning baseline."""

    name = "nocot-sft"
    config_cls = NoCoTConfig


@dataclass
class ZeroShotConfig(MethodConfig):
    name: str = "zero-shot"
    prompt: str = field(default="auto", metadata={"help": (
        "instruction (the task's format instruction + question), bare (the question alone), or auto: "
        "bare for a chat model (chat template in use), instruction otherwise")})

    def __post_init__(self) -> None:
        if self.prompt not in ("auto", "instruction", "bare"):
            raise ValueError(f"method.prompt={self.prompt!r}, must be auto, instruction or bare")


@METHODS.register("zero-shot")
class ZeroShot(Method):
    """Evaluate a model as it is (no training), prompted with or without the task's instruction.

    Why a bare option (the default for chat models): a small instruct model does not follow the
    task's format instruction (``<<a=b>>`` annotations, a ``####`` line) and scores lower with it
    than with the question alone; a baseline handicapped by its prompt flatters every method
    compared with it. Strict and flexible scoring are both reported.
    """

    name = "zero-shot"
    config_cls = ZeroShotConfig
    trainable = False
    cfg: ZeroShotConfig

    def uses_instruction(self) -> bool:
        if self.cfg.prompt != "auto":
            return self.cfg.prompt == "instruction"
        chat = self.run.model.use_chat_template and getattr(self.loaded.tokenizer, "chat_template", None)
        return not chat

    def prompt_ids(self, examples: list[Example]) -> list[list[int]]:
        instruction = self.uses_instruction()
        texts = [self.task.prompt(ex, instruction=instruction) for ex in examples]
        return encode_prompts(texts, self.loaded.tokenizer, self.run.model.use_chat_template)
