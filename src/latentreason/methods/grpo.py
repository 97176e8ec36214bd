"""Token-level GRPO (Shao et al. 2024): the model writes its chain, G samples per question, the
clipped surrogate on every sampled token. The baseline DLR claims to beat, on the same engine.

Same reward, same G, same rollout and trainer as DLR (``methods/rl.py``), so cost and stability
compare like with like. Choices: loss normalised by the sampled tokens of the global batch (the
"token-level" normaliser of DAPO / Dr. GRPO; ``method.loss_aggregation=sequence`` is the paper's mean
of per-sequence means); one update
per sampled batch; optional KL to the starting weights (k3 estimator, ``method.kl_coef``; 0 = off,
as in DAPO). Evaluation decodes greedily, the chain then the answer, like CoT-SFT.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from latentreason.data.base import Example
from latentreason.data.collate import pad_right
from latentreason.methods.base import METHODS, Method
from latentreason.methods.rl import (
    RLConfig, clipped_surrogate, group_advantages, reward_metrics, sample_seeds, score_samples,
)
from latentreason.models.latent_forward import IGNORE
from latentreason.models.rollout import rollout


@dataclass
class GRPOConfig(RLConfig):
    name: str = "grpo"
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of the training samples (evaluation follows rollout.*)"})
    max_new_tokens: int | None = field(default=None, metadata={"help": "longest sampled chain + answer; None = rollout.max_new_tokens"})
    kl_coef: float = field(default=0.0, metadata={"help": "β of the KL to the starting weights (k3 estimator); 0 = no reference model"})
    loss_aggregation: str = field(default="token", metadata={"help": (
        "token: one mean over every sampled token of the global batch (DAPO / Dr. GRPO: a long sample weighs "
        "more); sequence: each sample's mean over its tokens, then the mean over samples (the GRPO paper)")})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.temperature <= 0:
            raise ValueError(f"method.temperature={self.temperature}, must be > 0 (GRPO samples)")
        if self.kl_coef < 0:
            raise ValueError(f"method.kl_coef={self.kl_coef}, must be >= 0")
        if self.loss_aggregation not in ("token", "sequence"):
            raise ValueError(f"method.loss_aggregation={self.loss_aggregation!r}, must be token or sequence")


@METHODS.register("grpo")
class GRPO(Method):
    """The model samples chain + answer G times per question; the sampled tokens are reinforced."""

    name = "grpo"
    config_cls = GRPOConfig
    paper = "arXiv 2402.03300"
    on_policy = True
    cfg: GRPOConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reference: list[nn.Module] = []  # a list: never trained, never saved
        if self.cfg.kl_coef > 0:
            ref = copy.deepcopy(self.loaded.model).requires_grad_(False).eval()
            self.reference.append(ref)

    def collate(self, examples: list[Example]) -> dict[str, Any]:
        return {"examples": examples, "prompts": self.prompt_ids(examples), "num_targets": 0}

    def sample(self, modules: nn.ModuleDict, batch: dict[str, Any], step: int) -> dict[str, Any]:
        """G sampled completions per question from the current weights, their log-probabilities, scores."""
        c, G = self.cfg, self.cfg.group_size
        examples, prompts = batch["examples"], batch["prompts"]
        cfg = dataclasses.replace(self.run.rollout, num_latent_steps=0, temperature=c.temperature, top_p=1.0,
                                  max_new_tokens=c.max_new_tokens or self.run.rollout.max_new_tokens,
                                  keep_distributions="none")
        out = rollout(modules["lm"], prompts, None, cfg, eos_ids=self.loaded.eos_ids, pad_id=self.loaded.pad_id,
                      row_seeds=sample_seeds(c.sample_seed, step, examples, G), group_size=G, return_logprobs=True)
        texts = self.loaded.tokenizer.batch_decode(out.tokens, skip_special_tokens=True)
        rewards = score_samples(self.task, texts, examples, G, c.format_weight, c.correct_extraction)
        seqs, labels, spans = [], [], []
        for i, toks in enumerate(out.tokens):
            stop = out.stop_ids[i]  # the eos that ended a row was sampled too: score that one, not eos_ids[0]
            completion = toks + ([stop] if stop is not None else [])
            prompt = prompts[i // G]
            seqs.append(prompt + completion)
            labels.append([IGNORE] * len(prompt) + completion)
            spans.append((len(prompt) - 1, len(completion)))  # index j of the shifted logits predicts token j + 1
        padded = pad_right(seqs, labels, self.loaded.pad_id)
        old = torch.zeros(padded["labels"].shape[0], padded["labels"].shape[1] - 1)
        logps = out.logprobs.cpu()
        for i, (start, n) in enumerate(spans):
            old[i, start: start + n] = logps[i, :n]
        num = int((padded["labels"][:, 1:] != IGNORE).sum())
        return {**batch, **padded, "old_logp": old, "advantages": group_advantages(rewards.total).flatten(),
                "metrics": {**reward_metrics(rewards), "sampled_tokens": torch.tensor(float(num) / len(seqs))},
                "num_targets": num if c.loss_aggregation == "token" else len(seqs)}

    def loss(self, modules: nn.ModuleDict, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        c = self.cfg
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"][:, 1:]
        logits = modules["lm"](input_ids=ids, attention_mask=mask).logits[:, :-1].float() / c.temperature
        targets = labels.clamp(min=0)
        logp = logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0]
        valid = labels != IGNORE
        per_token = clipped_surrogate(logp, batch["old_logp"], batch["advantages"][:, None], c.clip_eps)
        metrics = {k: v.to(logp.device) for k, v in batch["metrics"].items()}
        if self.reference:
            with torch.no_grad():
                ref_logits = self.reference[0](input_ids=ids, attention_mask=mask).logits[:, :-1].float() / c.temperature
                ref = ref_logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0]
            delta = ref - logp
            kl = delta.exp() - delta - 1  # k3: unbiased, >= 0
            per_token = per_token + c.kl_coef * kl
            metrics["kl"] = (kl * valid).sum().detach() / valid.sum().clamp(min=1)
        ratio_gap = ((logp - batch["old_logp"]).abs() * valid).amax().detach()
        per_row = (per_token * valid).sum(-1)
        if c.loss_aggregation == "sequence":  # the trainer divides by the global batch's sample count
            per_row = per_row / valid.sum(-1).clamp(min=1)
        return {"loss_sum": per_row.sum(), "max_logratio_at_sampling": ratio_gap, **metrics}
