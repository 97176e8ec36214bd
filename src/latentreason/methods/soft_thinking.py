"""Soft Thinking (Zhang et al., "Soft Thinking: Unlocking the Reasoning Potential of LLMs in
Continuous Concept Space", arXiv 2505.15778): training-free mixture reasoning on any model.

Nothing is trained. At each reasoning step the model is fed a "concept token": the
probability-weighted mixture of the input embeddings of its ``max_topk`` most probable next
tokens after temperature, top-k, top-p and min-p filtering (``SoftThinkingStep`` in
``models/steps.py``). A row stops reasoning when the entropy of its temperature-scaled
distribution stays below ``entropy_threshold`` for ``cold_stop_steps`` steps in a row (Cold Stop),
when ``<eot>`` or the answer delimiter ``####`` is its top token (``stop_at_answer``: for a model
that writes ``chain #### answer``, the delimiter plays the paper's ``</think>``), or after
``num_latent_steps`` steps; the answer is then decoded
by the shared rollout. Its authors find it weak on models of 7B-14B and below: on the small models
used here expect a weak baseline, and report it as measured.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from latentreason.config import MethodConfig
from latentreason.data.base import ANSWER_DELIMITER, Example
from latentreason.methods.base import METHODS, Method
from latentreason.models.rollout import RolloutConfig
from latentreason.models.steps import LatentStep, SoftThinkingStep

if TYPE_CHECKING:
    from latentreason.config import RunConfig

logger = logging.getLogger(__name__)


@dataclass
class SoftThinkingConfig(MethodConfig):
    """Soft Thinking's settings. Defaults are the paper's, except the two lengths (scaled to short tasks)."""

    name: str = "soft-thinking"
    temperature: float = field(default=0.6, metadata={"help": (
        "softmax temperature of the mixture; must be > 0: at T=0 the mixture collapses to the one-hot top "
        "token, i.e. plain greedy decoding (the official code's greedy mode)")})
    max_topk: int = field(default=10, metadata={"help": "tokens mixed per step: the most probable survivors of the filters, renormalised"})
    top_k: int = field(default=30, metadata={"help": "top-k filter applied after the temperature (0 = none)"})
    top_p: float = field(default=0.95, metadata={"help": "top-p (nucleus) filter applied after top-k"})
    min_p: float = field(default=0.001, metadata={"help": "min-p filter (p >= min_p * max p) applied after top-p"})
    num_latent_steps: int = field(default=64, metadata={"help": (
        "upper bound on soft-thinking steps per question: the method sets rollout.num_latent_steps to it "
        "(leave rollout.num_latent_steps at 0 or equal); cold stop and <eot> end rows earlier")})
    entropy_threshold: float = field(default=0.01, metadata={"help": (
        "cold stop's tau: a step is 'confident' when the entropy (nats) of softmax(logits / temperature) is below it")})
    cold_stop_steps: int = field(default=8, metadata={"help": (
        "cold stop's L: a row stops at its L-th consecutive confident step (that step's mixture is not fed). "
        "The paper uses 256 for math chains of thousands of tokens; scale to the task's chain length")})
    stop_at_answer: bool = field(default=True, metadata={"help": (
        "also end reasoning when the answer delimiter '####' (its first token) is the top token: for a model "
        "that writes 'chain #### answer' this is the paper's </think>. Without it the mixtures run on through "
        "the answer itself (it is confident, so cold stop comes late) and the decoder is left with nothing "
        "to write")})
    append_bot: bool = field(default=False, metadata={"help": (
        "end the prompt with <bot> (and feed <eot> after reasoning, when rollout.feed_eot). Only for a model "
        "trained with them (latent-sft, coconut): a CoT-SFT or off-the-shelf model never saw these tokens, whose "
        "embeddings are then untrained, and was taught to start its chain right after the prompt; so by "
        "default neither is fed")})

    def __post_init__(self) -> None:
        problems = []
        if self.temperature <= 0:
            problems.append(f"method.temperature={self.temperature}, must be > 0 (T=0 is plain greedy decoding; "
                            "use method.name=cot-sft for that)")
        if self.max_topk < 1:
            problems.append(f"method.max_topk={self.max_topk}, must be >= 1")
        if self.top_k < 0:
            problems.append(f"method.top_k={self.top_k}, must be >= 0 (0 = no top-k filter)")
        if not 0 < self.top_p <= 1:
            problems.append(f"method.top_p={self.top_p}, must be in (0, 1]")
        if not 0 <= self.min_p < 1:
            problems.append(f"method.min_p={self.min_p}, must be in [0, 1)")
        if self.num_latent_steps < 1:
            problems.append(f"method.num_latent_steps={self.num_latent_steps}, must be >= 1")
        if self.entropy_threshold < 0:
            problems.append(f"method.entropy_threshold={self.entropy_threshold}, must be >= 0 (0 disables cold stop)")
        if self.cold_stop_steps < 1:
            problems.append(f"method.cold_stop_steps={self.cold_stop_steps}, must be >= 1")
        if problems:
            raise ValueError("; ".join(problems))


@METHODS.register("soft-thinking")
class SoftThinking(Method):
    """Training-free: reason with probability-weighted mixtures of token embeddings (arXiv 2505.15778)."""

    name = "soft-thinking"
    config_cls = SoftThinkingConfig
    trainable = False
    paper = "https://arxiv.org/abs/2505.15778"
    cfg: SoftThinkingConfig

    @classmethod
    def validate(cls, run: RunConfig) -> list[str]:
        cfg = run.method
        problems = []
        steps = run.rollout.num_latent_steps
        if steps not in (0, cfg.num_latent_steps):
            problems.append(
                f"rollout.num_latent_steps={steps} but method.num_latent_steps={cfg.num_latent_steps}: soft-thinking "
                "sets the rollout's bound from method.num_latent_steps; set that one (leave the rollout's at 0)"
            )
        if cfg.append_bot and not run.model.add_latent_tokens:
            problems.append("method.append_bot=true needs <bot>, but model.add_latent_tokens=false; "
                            "set method.append_bot=false or model.add_latent_tokens=true")
        return problems

    def prompt_ids(self, examples: list[Example]) -> list[list[int]]:
        """The task prompt the model was trained on, plus ``<bot>`` when ``append_bot`` (see its help)."""
        ids = super().prompt_ids(examples)
        if not self.cfg.append_bot:
            return ids
        if self.loaded.bot_id is None:
            raise ValueError(f"method.append_bot=true but model {self.loaded.name!r} has no <bot> token "
                             "(model.add_latent_tokens=false); set method.append_bot=false")
        return [p + [self.loaded.bot_id] for p in ids]

    def stop_ids(self) -> list[int]:
        """Token ids whose argmax ends reasoning: ``<eot>`` and, with ``stop_at_answer``, the first
        non-blank token of the answer delimiter as the tokenizer writes it alone, after a space or
        after a newline (the forms a chain can end with)."""
        ids = [] if self.loaded.eot_id is None else [self.loaded.eot_id]
        if self.cfg.stop_at_answer:
            tok = self.loaded.tokenizer
            for text in (ANSWER_DELIMITER, " " + ANSWER_DELIMITER, "\n" + ANSWER_DELIMITER):
                first = next((i for i in tok(text, add_special_tokens=False)["input_ids"] if tok.decode([i]).strip()), None)
                if first is not None and first not in ids:
                    ids.append(first)
        return ids

    def latent_step(self, examples: list[Example]) -> LatentStep:
        if self.loaded.eot_id is None and not self.cfg.stop_at_answer and not getattr(self, "_warned_no_eot", False):
            logger.warning("soft-thinking: model %r has no latent tokens (model.add_latent_tokens=false) and "
                           "method.stop_at_answer=false: only cold stop and method.num_latent_steps end reasoning",
                           self.loaded.name)
            self._warned_no_eot = True
        c = self.cfg
        return SoftThinkingStep(
            temperature=c.temperature, max_topk=c.max_topk, top_k=c.top_k, top_p=c.top_p, min_p=c.min_p,
            entropy_threshold=c.entropy_threshold, cold_stop_steps=c.cold_stop_steps, stop_token_id=self.stop_ids() or None,
        )

    def rollout_config(self) -> RolloutConfig:
        """The run's rollout with the method's step bound; ``<eot>`` is fed only after an appended ``<bot>``."""
        base = self.run.rollout
        return dataclasses.replace(base, num_latent_steps=self.cfg.num_latent_steps,
                                   feed_eot=base.feed_eot and self.cfg.append_bot, keep_distributions="topk",
                                   distribution_topk=max(base.distribution_topk, 100))

    def superposition_rate(self) -> int | None | bool:
        """Mixture latents with no compression rate: steps align to the gold chain cut in #L parts."""
        return None
