"""DeepLatent Reasoning, DLR (arXiv 2601.17275): a light assistant samples latent chains, a frozen
main model decodes them, and only the assistant learns, by contrastive RL.

The flow (../shared/docs/methods.md section 3; every choice the paper leaves open is ours):

- The **assistant** (a causal LM's body, by default a copy of the main model's starting weights,
  ``method.assistant_layers`` keeps only its first blocks) reads the question followed by L
  ``<latent>`` placeholders; a latent head maps its last hidden states there to μ ∈ R^{L×d}
  (d = ``method.latent_dim``, 512 in the paper) and a projector maps latents to the main model's
  width. They are written between ``<bot>`` and ``<eot>``; the frozen main model decodes the answer.
- **Warm start** (the first ``method.warm_start_steps`` steps, SoftCoT's ``answer`` objective):
  cross-entropy of the gold answer through the frozen main model given the projected latents,
  with the policy's noise applied (so RL starts from latents that survive it).
- **RL** (the remaining steps, on-policy through the trainer's ``sample`` hook): the policy is
  Gaussian, z ~ N(μ, σ²I) with exact log-densities; G chains per question; the main model decodes
  all G answers greedily in one batched rollout (one prefill per question); reward = correct +
  w_f·format; group-normalised advantages; the clipped surrogate on the chains' log-densities over
  the top ``keep_fraction`` of each group (0.18 in the paper; 1 = all G); plus an InfoNCE term in
  which a question's high-reward chains attract each other and repel its low-reward ones.
- RL moves the assistant and the latent head; the projector keeps its warm-start weights (the
  surrogate is a density in latent space, and the reward does not differentiate through the main
  model's decoding).
- The main model never changes: it has no gradients and no optimizer state (tested bit-identical).

Evaluation feeds the mean latents μ (no noise) and decodes greedily.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from latentreason.data.base import Example
from latentreason.data.collate import encode_prompts, encode_targets
from latentreason.methods.base import METHODS, Method, Stage, task_model_config
from latentreason.methods.rl import (
    RLConfig, clipped_surrogate, group_advantages, reward_metrics, sample_seeds, score_samples, top_k_mask,
)
from latentreason.models.latent_forward import latent_forward
from latentreason.models.loading import decoder_body, load_model
from latentreason.models.rollout import RolloutConfig, left_pad, mask_positions, max_positions, rollout
from latentreason.models.steps import ExternalStep, LatentStep


@dataclass
class DLRConfig(RLConfig):
    name: str = "dlr"
    assistant: str | None = field(default=None, metadata={"help": "the assistant LM (name or folder); None = a copy of the main model's starting weights"})
    assistant_layers: int = field(default=0, metadata={"help": "keep the assistant's first N blocks (a shallow model from a deep one); 0 = all"})
    latent_dim: int = field(default=512, metadata={"help": "d: width of the latent head (the policy's space)"})
    num_latents: int = field(default=8, metadata={"help": "L: latent vectors per chain"})
    warm_start_steps: int = field(default=100, metadata={"help": "supervised warm-start steps (stage warm-start); the rest of train.max_steps is RL. 0 = RL only (train.init_from = a DLR folder)"})
    warm_start_noise: bool = field(default=True, metadata={"help": "apply the policy's noise during the warm start"})
    sigma: float = field(default=0.3, metadata={"help": "σ: the Gaussian policy's standard deviation in latent space, where μ has unit scale (a layer norm), so σ is the exploration noise relative to the latent"})
    keep_fraction: float = field(default=0.18, metadata={"help": "k_keep/G: the top share of each group by reward in the RL update (paper ~0.18; 1 = all G)"})
    contrastive_weight: float = field(default=0.1, metadata={"help": "λ_con: weight of the InfoNCE term (0 = off)"})
    contrastive_temperature: float = field(default=0.1, metadata={"help": "τ of the InfoNCE term"})
    with_chain: bool = field(default=False, metadata={"help": "the main model writes the chain after the latents, then the answer (the warm start's targets too); false = the answer follows <eot> directly"})
    max_length: int = field(default=1024, metadata={"help": "training sequences longer than this (or the model's context) are dropped"})

    def __post_init__(self) -> None:
        super().__post_init__()
        for key, low in (("latent_dim", 1), ("num_latents", 1), ("warm_start_steps", 0), ("assistant_layers", 0)):
            if getattr(self, key) < low:
                raise ValueError(f"method.{key}={getattr(self, key)}, must be >= {low}")
        if self.sigma <= 0:
            raise ValueError(f"method.sigma={self.sigma}, must be > 0")
        if not 0 < self.keep_fraction <= 1:
            raise ValueError(f"method.keep_fraction={self.keep_fraction}, must be in (0, 1]")
        if self.contrastive_weight < 0 or self.contrastive_temperature <= 0:
            raise ValueError("method.contrastive_weight must be >= 0 and method.contrastive_temperature > 0")

    @property
    def keep_top(self) -> int:
        """k_keep: at least one chain per question."""
        return max(1, min(self.group_size, round(self.keep_fraction * self.group_size)))


class LatentPolicy(nn.Module):
    """The assistant body, the latent head (μ) and the projector to the main model's width."""

    def __init__(self, body: nn.Module, width: int, latent_dim: int, main_width: int) -> None:
        super().__init__()
        self.body = body
        self.head = nn.Linear(width, latent_dim)
        self.projector = nn.Linear(latent_dim, main_width)
        with torch.no_grad():  # near-zero latents at the start, as in SoftCoT
            self.projector.weight.mul_(0.1)
            self.projector.bias.zero_()

    def mean(self, prompts: list[list[int]], n: int, pad_id: int) -> torch.Tensor:
        """μ: [B, n, d] for prompts ending with their n placeholders (positions ignore the padding,
        so a row's latents do not depend on its batch)."""
        device = self.head.weight.device
        ids, mask = left_pad(prompts, pad_id, device)
        positions = mask_positions(mask)
        hidden = self.body(input_ids=ids, attention_mask=mask, position_ids=positions,
                           use_cache=False).last_hidden_state[:, -n:]
        mu = self.head(hidden.to(self.head.weight.dtype))
        # Unit-scale latents (no learned gain): σ is then the noise-to-signal ratio, which the
        # policy cannot shrink by growing μ; the projector sets the scale the main model sees.
        return F.layer_norm(mu, mu.shape[-1:])


def gaussian_logp(z: torch.Tensor, mu: torch.Tensor, sigma: float) -> torch.Tensor:
    """log N(z; μ, σ²I) of each chain, summed over its L×d dimensions: [N, L, d] -> [N]."""
    n = z[0].numel()
    return (-0.5 * ((z - mu) / sigma).pow(2).sum((-1, -2))
            - n * (math.log(sigma) + 0.5 * math.log(2 * math.pi)))


def contrastive_loss(embeddings: torch.Tensor, rewards: torch.Tensor, temperature: float) -> tuple[torch.Tensor, int]:
    """InfoNCE within each group ([B, G, d] chain embeddings, [B, G] rewards): every chain above its
    group's mean reward is an anchor whose positives are the group's other high chains and whose
    negatives are its chains below the mean. Returns (sum over groups of the mean anchor loss, the
    number of groups that had anchors); a group without two high chains and one low adds nothing."""
    e = F.normalize(embeddings, dim=-1)
    sim = e @ e.transpose(1, 2) / temperature  # [B, G, G]
    mean = rewards.mean(-1, keepdim=True)
    high, low = rewards > mean, rewards < mean
    eye = torch.eye(rewards.shape[-1], dtype=torch.bool, device=rewards.device)
    candidates = (high | low)[:, None, :] & ~eye
    positives = high[:, :, None] & high[:, None, :] & ~eye
    log_prob = sim - torch.logsumexp(sim.masked_fill(~candidates, float("-inf")), -1, keepdim=True)
    n_pos = positives.sum(-1)
    per_anchor = -(log_prob.masked_fill(~positives, 0)).sum(-1) / n_pos.clamp(min=1)
    anchors = high & (n_pos > 0) & low.any(-1, keepdim=True)
    n_anchor = anchors.sum(-1)
    per_group = (per_anchor * anchors).sum(-1) / n_anchor.clamp(min=1)
    return per_group.sum(), int((n_anchor > 0).sum())


@METHODS.register("dlr")
class DLR(Method):
    """An assistant's Gaussian latent policy, trained by contrastive RL for a frozen main model."""

    name = "dlr"
    config_cls = DLRConfig
    paper = "arXiv 2601.17275"
    on_policy = True
    cfg: DLRConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.loaded.bot_id is None or self.loaded.eot_id is None:
            raise ValueError(f"method {self.name!r} needs <bot>/<eot>: keep model.add_latent_tokens=true")
        c = self.cfg
        if c.assistant is None:  # a copy of the main model's starting weights, sharing its tokenizer
            lm, self.helper_tokenizer = copy.deepcopy(self.loaded.model), self.loaded.tokenizer
            self.helper_latent, self.helper_pad = self.loaded.latent_id, self.loaded.pad_id
        else:
            # training=True: full-precision weights (auto = bfloat16 on a GPU), cast below to the main model's dtype
            helper = load_model(task_model_config(dataclasses.replace(self.run.model, name_or_path=c.assistant), self.task),
                                training=True)
            lm, self.helper_tokenizer = helper.model, helper.tokenizer
            self.helper_latent, self.helper_pad = helper.latent_id, helper.pad_id
        if self.helper_latent is None:
            raise ValueError(f"method.assistant={c.assistant!r} has no <latent> placeholder: keep model.add_latent_tokens=true")
        body = decoder_body(lm, c.assistant_layers)
        body.requires_grad_(True)
        width = lm.get_input_embeddings().weight.shape[1]
        main_width = self.loaded.model.get_input_embeddings().weight.shape[1]
        with torch.random.fork_rng(devices=[]):  # the head's initialisation is a function of the seed
            torch.manual_seed(self.run.train.seed)
            self.policy = LatentPolicy(body, width, c.latent_dim, main_width).to(
                self.loaded.model.device, self.loaded.model.dtype)
        self.loaded.model.requires_grad_(False)  # the main model never trains
        self.phase = "warm-start" if c.warm_start_steps else "rl"

    @classmethod
    def validate(cls, run: Any) -> list[str]:
        if run.lora.enabled:
            return ["lora.enabled=true would train adapters on DLR's main model, which stays frozen; set "
                    "lora.enabled=false (the assistant trains in full; method.assistant_layers makes it shallow)"]
        return []

    @classmethod
    def schedule_uses_max_steps(cls, run: Any) -> bool:
        return True  # the RL stage is train.max_steps − warm_start_steps

    @classmethod
    def train_problems(cls, run: Any) -> list[str]:
        c = run.method
        if c.warm_start_steps > run.train.max_steps:
            return [f"method.warm_start_steps={c.warm_start_steps} exceeds train.max_steps={run.train.max_steps}"]
        return []

    def stages(self) -> list[Stage]:
        warm, total = self.cfg.warm_start_steps, self.run.train.max_steps
        # validation picks best/ among RL checkpoints; a warm-start-only run selects among its own
        stages = [Stage("warm-start", warm, select=total == warm)] if warm else []
        if total > warm:
            stages.append(Stage("rl", total - warm, reset_optimizer=bool(warm)))
        return stages

    def set_stage(self, index: int, stage: Stage) -> None:
        super().set_stage(index, stage)
        self.phase = stage.name

    def extra_modules(self) -> dict[str, nn.Module]:
        return {"policy": self.policy}

    def _helper_prompts(self, examples: list[Example]) -> list[list[int]]:
        texts = [self.task.prompt(ex) for ex in examples]
        n = self.cfg.num_latents
        return [p + [self.helper_latent] * n
                for p in encode_prompts(texts, self.helper_tokenizer, self.run.model.use_chat_template)]

    def _vectors(self, policy: LatentPolicy, z: torch.Tensor) -> torch.Tensor:
        return policy.projector(z).to(self.loaded.model.get_input_embeddings().weight.dtype)

    # -- training ------------------------------------------------------------------------------
    def collate(self, examples: list[Example]) -> dict[str, Any]:
        n = self.cfg.num_latents
        prompts, helper = self.bot_prompt_ids(examples), self._helper_prompts(examples)
        texts = [f"{self.task.chain_text(ex)} {self.task.answer_text(ex)}" if self.cfg.with_chain
                 else self.task.answer_text(ex) for ex in examples]
        targets = encode_targets(texts, self.loaded.tokenizer,
                                 self.loaded.eos_ids[0])
        context = max_positions(self.loaded.model)
        limit = min(self.cfg.max_length, context) if context else self.cfg.max_length
        keep = [i for i in range(len(examples)) if len(prompts[i]) + n + 1 + len(targets[i]) <= limit]
        if not keep:
            raise ValueError(f"every example of this batch is longer than {limit} tokens (method.max_length)")
        return {"examples": [examples[i] for i in keep], "prompts": [prompts[i] for i in keep],
                "helper_prompts": [helper[i] for i in keep], "targets": [targets[i] for i in keep],
                "num_targets": sum(len(targets[i]) for i in keep), "dropped": len(examples) - len(keep)}

    def sample(self, modules: nn.ModuleDict, batch: dict[str, Any], step: int) -> dict[str, Any]:
        """G chains per question around μ, all G answers decoded by the frozen main model, scored."""
        if self.phase != "rl":
            return batch
        c, policy = self.cfg, modules["policy"]
        examples, G, L = batch["examples"], c.group_size, c.num_latents
        mu = policy.mean(batch["helper_prompts"], L, self.helper_pad).repeat_interleave(G, 0)
        noise = torch.stack([
            torch.randn(L, c.latent_dim, generator=torch.Generator().manual_seed(s))  # CPU: the same draws on any device
            for s in sample_seeds(c.sample_seed, step, examples, G)]).to(mu.device, mu.dtype)
        z = mu + c.sigma * noise
        cfg = dataclasses.replace(self.run.rollout, num_latent_steps=L, temperature=0.0, keep_distributions="none")
        lm = modules["lm"]
        out = rollout(lm, batch["prompts"], ExternalStep(self._vectors(policy, z)), cfg,
                      eos_ids=self.loaded.eos_ids, pad_id=self.loaded.pad_id, eot_id=self.loaded.eot_id, group_size=G)
        texts = self.loaded.tokenizer.batch_decode(out.tokens, skip_special_tokens=True)
        rewards = score_samples(self.task, texts, examples, G, c.format_weight, c.correct_extraction)
        kept = top_k_mask(rewards.total, c.keep_top)
        return {**batch, "z": z, "noise": c.sigma * noise, "old_logp": gaussian_logp(z, mu, c.sigma),
                "advantages": group_advantages(rewards.total).flatten().to(mu.device),
                "rewards": rewards.total.to(mu.device), "kept": kept.flatten().to(mu.device),
                "metrics": reward_metrics(rewards, kept), "num_targets": int(kept.sum())}

    def loss(self, modules: nn.ModuleDict, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        c, policy = self.cfg, modules["policy"]
        mu = policy.mean(batch["helper_prompts"], c.num_latents, self.helper_pad)
        if self.phase != "rl":  # the warm start: SoftCoT's answer objective through the frozen main model
            z = mu + c.sigma * torch.randn_like(mu) if c.warm_start_noise else mu
            out = latent_forward(modules["lm"], batch["prompts"], batch["targets"], eot_id=self.loaded.eot_id,
                                 pad_id=self.loaded.pad_id, vectors=self._vectors(policy, z))
            return {"loss_sum": out.loss_sum()}
        G = c.group_size
        mu = mu.repeat_interleave(G, 0)
        z, kept = batch["z"], batch["kept"]
        surrogate = clipped_surrogate(gaussian_logp(z, mu, c.sigma), batch["old_logp"], batch["advantages"], c.clip_eps)
        rl_sum = (surrogate * kept).sum()
        loss_sum = rl_sum
        metrics = {k: v.to(mu.device) for k, v in batch["metrics"].items()}
        if c.contrastive_weight > 0:
            # chain embeddings, reparameterised: μ + σε with the drawn ε, so the gradient reaches μ;
            # the L latents concatenated (a mean over them would let the policy raise every similarity,
            # reward aside, by making its L latents alike)
            chains = (mu + batch["noise"]).flatten(1).view(len(batch["examples"]), G, -1)
            con_sum, groups = contrastive_loss(chains, batch["rewards"], c.contrastive_temperature)
            loss_sum = loss_sum + c.contrastive_weight * con_sum * c.keep_top  # per kept chain after normalising
            metrics["loss_contrastive"] = con_sum.detach() / max(groups, 1)
        metrics["loss_rl"] = rl_sum.detach() / kept.sum().clamp(min=1)
        return {"loss_sum": loss_sum, **metrics}

    # -- evaluation ----------------------------------------------------------------------------
    def prompt_ids(self, examples: list[Example]) -> list[list[int]]:
        return self.bot_prompt_ids(examples)

    def latent_step(self, examples: list[Example]) -> LatentStep | None:
        mu = self.policy.mean(self._helper_prompts(examples), self.cfg.num_latents, self.helper_pad)
        return ExternalStep(self._vectors(self.policy, mu))

    def rollout_config(self) -> RolloutConfig:
        return dataclasses.replace(self.run.rollout, num_latent_steps=self.cfg.num_latents)
