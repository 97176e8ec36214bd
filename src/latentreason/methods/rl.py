"""What DLR and token-level GRPO share: the reward, group advantages, the clipped surrogate.

Both are on-policy methods of the shared trainer (``Method.on_policy``): in each step the trainer
calls ``Method.sample`` (no gradients, eval mode), which draws G answers per question with the
shared rollout and scores them here; then ``Method.loss`` computes the surrogate. One reward and
one surrogate for both, so the comparison of the two is engine-equal.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from latentreason.config import MethodConfig
from latentreason.data.base import Example, Task
from latentreason.models.rollout import derive_seed


@dataclass
class RLConfig(MethodConfig):
    """Fields every on-policy method has (DLR's and GRPO's configs extend it)."""

    group_size: int = field(default=8, metadata={"help": "G: answers sampled per question in a training step"})
    format_weight: float = field(default=0.2, metadata={"help": (
        "w_f: reward = correct + w_f * format; correct = the answer (method.correct_extraction) matches, "
        "format = the strict answer line (#### <answer>) is present")})
    correct_extraction: str = field(default="flexible", metadata={"help": (
        "which answer the correctness reward checks: flexible (the last number / option anywhere, so a chain cut "
        "off before its answer line can still score) or strict (the one after the last ####, what accuracy "
        "and best/ selection score)")})
    clip_eps: float = field(default=0.2, metadata={"help": "PPO/GRPO clip range of the importance ratio"})
    sample_seed: int = field(default=0, metadata={"help": (
        "seed of the training samples; each is keyed by (seed, step, question id, sample index), so a "
        "resumed or multi-process run draws the same samples")})

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise ValueError(f"method.group_size={self.group_size}, must be >= 2 (advantages compare samples of a group)")
        if self.format_weight < 0:
            raise ValueError(f"method.format_weight={self.format_weight}, must be >= 0")
        if not 0 < self.clip_eps < 1:
            raise ValueError(f"method.clip_eps={self.clip_eps}, must be in (0, 1)")
        if self.correct_extraction not in ("flexible", "strict"):
            raise ValueError(f"method.correct_extraction={self.correct_extraction!r}, must be flexible or strict")


def sample_seeds(seed: int, step: int, examples: list[Example], group_size: int) -> list[int]:
    """One seed per sample, rows in the rollout's group order (example b's are rows b·G ... b·G+G-1).

    Keyed by the training step too: a question met again in a later epoch gets new samples.
    """
    return [derive_seed(seed, f"{step}:{ex.id}#{g}") for ex in examples for g in range(group_size)]


@dataclass
class Rewards:
    """[B, G] tensors for one micro-batch."""

    total: torch.Tensor
    correct: torch.Tensor
    format: torch.Tensor


def score_samples(task: Task, texts: list[str], examples: list[Example], group_size: int,
                  format_weight: float, extraction: str = "flexible") -> Rewards:
    """reward = correct + w_f · format for each of the B·G decoded answers (group order)."""
    if len(texts) != len(examples) * group_size:
        raise ValueError(f"score_samples: {len(texts)} texts for {len(examples)} questions x G={group_size}")
    correct, fmt = [], []
    for i, text in enumerate(texts):
        score = task.score(text, examples[i // group_size])
        correct.append(float(score.correct_flexible if extraction == "flexible" else score.correct))
        fmt.append(float(score.prediction is not None))
    c = torch.tensor(correct).view(len(examples), group_size)
    f = torch.tensor(fmt).view(len(examples), group_size)
    return Rewards(c + format_weight * f, c, f)


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """(r − mean) / (std + eps) within each question's group ([B, G] in, [B, G] out).

    A group whose samples all scored alike has zero advantage: it carries no signal.
    """
    mean = rewards.mean(-1, keepdim=True)
    std = rewards.std(-1, keepdim=True, unbiased=False)
    return (rewards - mean) / (std + eps)


def top_k_mask(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """[B, G] bool: the k highest rewards of each group (ties: the lower sample index first)."""
    g = rewards.shape[-1]
    if k >= g:
        return torch.ones_like(rewards, dtype=torch.bool)
    # a stable sort of -reward keeps the earlier index first among ties: deterministic
    order = torch.sort(-rewards, dim=-1, stable=True).indices[..., :k]
    mask = torch.zeros_like(rewards, dtype=torch.bool)
    return mask.scatter(-1, order, True)


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                      clip_eps: float) -> torch.Tensor:
    """Elementwise −min(ρ·A, clip(ρ, 1−ε, 1+ε)·A), ρ = exp(logp − old_logp): the PPO/GRPO loss."""
    ratio = torch.exp(logp - old_logp)
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps)
    return -torch.minimum(ratio * advantages, clipped * advantages)


def reward_metrics(rewards: Rewards, kept: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Scalars the trainer logs per step (``reward`` is the training reward curve)."""
    out = {"reward": rewards.total.mean(), "reward_correct": rewards.correct.mean(),
           "reward_format": rewards.format.mean(),
           "groups_with_signal": (rewards.total.std(-1, unbiased=False) > 0).float().mean()}
    if kept is not None:
        out["reward_kept"] = (rewards.total * kept).sum() / kept.sum().clamp(min=1)
    return out
