"""The method contract: what the shared trainer and evaluation harness call.

A method owns (1) how examples become a training batch and its loss, and (2) how an example is
prompted and which latent step the shared rollout runs at evaluation. It owns no loop: training is
:mod:`latentreason.methods.trainer`, generation is :func:`latentreason.models.rollout.rollout`.
A new variant is a config subclass plus the one hook it changes.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from latentreason.config import MethodConfig
from latentreason.data.base import Example, Task
from latentreason.data.collate import encode_prompts
from latentreason.models.loading import LoadedModel
from latentreason.models.rollout import RolloutConfig
from latentreason.models.steps import LatentStep
from latentreason.registry import Registry

if TYPE_CHECKING:
    from latentreason.config import RunConfig


class Method:
    """Base class; subclasses set ``name``/``config_cls`` and override the hooks they need."""

    name: ClassVar[str] = ""
    config_cls: ClassVar[type[MethodConfig]] = MethodConfig
    #: False for evaluation-only methods (zero-shot, training-free latent methods).
    trainable: ClassVar[bool] = True
    paper: ClassVar[str] = ""

    def __init__(self, cfg: MethodConfig, run: RunConfig, loaded: LoadedModel, task: Task) -> None:
        self.cfg, self.run, self.loaded, self.task = cfg, run, loaded, task

    @classmethod
    def validate(cls, run: RunConfig) -> list[str]:
        """Cross-field checks of a run using this method (before any weights load)."""
        return []

    # -- training ------------------------------------------------------------------------------
    def extra_modules(self) -> dict[str, nn.Module]:
        """Modules trained beside the LM (projectors, assistants); saved with checkpoints."""
        return {}

    def trainable_parameters(self) -> Iterable[nn.Parameter]:
        yield from (p for p in self.loaded.model.parameters() if p.requires_grad)
        for module in self.extra_modules().values():
            yield from (p for p in module.parameters() if p.requires_grad)

    def collate(self, examples: list[Example]) -> dict[str, Any]:
        """A training micro-batch; must hold ``num_targets`` (the loss's normaliser, an int)."""
        raise NotImplementedError(f"method {self.name!r} does not train")

    def loss(self, modules: nn.ModuleDict, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``{"loss_sum": summed loss over the batch's num_targets, ...metrics}``."""
        raise NotImplementedError(f"method {self.name!r} does not train")

    # -- evaluation ----------------------------------------------------------------------------
    def prompt_ids(self, examples: list[Example]) -> list[list[int]]:
        """Token ids the rollout starts from (latent methods append <bot>)."""
        texts = [self.task.prompt(ex) for ex in examples]
        return encode_prompts(texts, self.loaded.tokenizer, self.run.model.use_chat_template)

    def latent_step(self, examples: list[Example]) -> LatentStep | None:
        """The step the rollout runs for this batch; None = plain decoding."""
        return None

    def rollout_config(self) -> RolloutConfig:
        return self.run.rollout


METHODS: Registry[type[Method]] = Registry("method", base=Method)
