"""SoftCoT (Xu et al. 2025): a frozen assistant's hidden states, projected, as soft thoughts.

The assistant LM reads the task prompt followed by N placeholder tokens; its last hidden states
at those N positions, mapped by a trained linear projection to the main model's width, are written
between ``<bot>`` and ``<eot>`` in the main model's input. Only the projection trains by default
(``train_main=false``): the main model and the assistant stay frozen, and the gradient reaches the
projection through the frozen main model (one parallel pass of the shared latent forward).

Two modes (../shared/docs/methods.md section 4): ``chain`` as published (after the soft thoughts
the main model still writes its explicit chain, then the answer: a soft prompt) and ``answer``
(latent only: the answer follows ``<eot>`` directly). DLR's supervised warm start reuses the
``answer`` mode's module.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from latentreason.config import MethodConfig
from latentreason.data.base import Example
from latentreason.data.collate import encode_prompts, encode_targets
from latentreason.methods.base import METHODS, Method, task_model_config
from latentreason.models.latent_forward import latent_forward
from latentreason.models.loading import LoadedModel, load_model
from latentreason.models.rollout import RolloutConfig, left_pad, mask_positions, max_positions
from latentreason.models.steps import ExternalStep, LatentStep


@dataclass
class SoftCoTConfig(MethodConfig):
    name: str = "softcot"
    mode: str = field(default="answer", metadata={"help": "answer (latent only: the answer follows <eot>) or chain (as published: the main model still writes its chain)"})
    assistant: str | None = field(default=None, metadata={"help": "the assistant LM (name or folder); None = the main model's own starting checkpoint"})
    num_thoughts: int = field(default=4, metadata={"help": "N: placeholder positions the assistant fills (official: 32 in training, 4 at evaluation)"})
    eval_thoughts: int | None = field(default=None, metadata={"help": "N at evaluation; None = num_thoughts"})
    train_main: bool = field(default=False, metadata={"help": "also fine-tune the main model (SoftCoT keeps it frozen)"})
    max_length: int = field(default=1024, metadata={"help": "training sequences longer than this (or the model's context) are dropped"})

    def __post_init__(self) -> None:
        if self.mode not in ("answer", "chain"):
            raise ValueError(f"method.mode={self.mode!r}, must be answer or chain")
        if self.num_thoughts < 1:
            raise ValueError(f"method.num_thoughts={self.num_thoughts}, must be >= 1")


class Assistant(nn.Module):
    """The frozen assistant LM and the trained projection to the main model's width."""

    def __init__(self, lm: LoadedModel, main_width: int) -> None:
        super().__init__()
        self.lm = [lm]  # a list: not a submodule, so it is neither trained nor saved with the method
        width = lm.model.get_input_embeddings().weight.shape[1]
        self.projection = nn.Linear(width, main_width)
        with torch.no_grad():  # small outputs at the start: the main model first sees near-zero thoughts
            self.projection.weight.mul_(0.1)
            self.projection.bias.zero_()

    def forward(self, prompts: list[list[int]], n: int) -> torch.Tensor:
        """[B, n, D_main] soft thoughts for prompts that end with their n placeholder tokens."""
        lm = self.lm[0]
        ids, mask = left_pad(prompts, lm.pad_id, lm.model.device)
        positions = mask_positions(mask)  # GPT-2's thoughts would otherwise move with the batch's padding
        with torch.no_grad():
            hidden = lm.model(input_ids=ids, attention_mask=mask, position_ids=positions, output_hidden_states=True,
                              use_cache=False).hidden_states[-1][:, -n:]
        return self.projection(hidden.to(self.projection.weight.dtype))


@METHODS.register("softcot")
class SoftCoT(Method):
    """Soft thoughts from a frozen assistant through a trained projection (Xu et al. 2025)."""

    name = "softcot"
    config_cls = SoftCoTConfig
    paper = "arXiv 2502.12134"
    cfg: SoftCoTConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.loaded.bot_id is None or self.loaded.eot_id is None:
            raise ValueError(f"method {self.name!r} needs <bot>/<eot>: keep model.add_latent_tokens=true")
        source = self.cfg.assistant or self.run.train.init_from or self.run.model.name_or_path
        self.assistant_source = source
        model_cfg = dataclasses.replace(self.run.model, name_or_path=source)
        helper = load_model(task_model_config(model_cfg, self.task))
        helper.model.requires_grad_(False)
        helper.model.eval()
        if helper.latent_id is None:
            raise ValueError(f"method.assistant={source!r} has no <latent> placeholder token: keep model.add_latent_tokens=true")
        main_width = self.loaded.model.get_input_embeddings().weight.shape[1]
        self.assistant = Assistant(helper, main_width).to(self.loaded.model.device)
        if not self.cfg.train_main:
            self.loaded.model.requires_grad_(False)

    @classmethod
    def validate(cls, run: Any) -> list[str]:
        if run.lora.enabled and not getattr(run.method, "train_main", False):
            return ["lora.enabled=true would attach trainable adapters to SoftCoT's frozen main model; set "
                    "lora.enabled=false (only the projection trains), or method.train_main=true"]
        return []

    def extra_modules(self) -> dict[str, nn.Module]:
        return {"assistant": self.assistant}

    def saved_config(self) -> dict[str, Any]:
        """The assistant that was used, by name: the saved main model may differ from it (train_main)."""
        data = super().saved_config()
        data["method"]["assistant"] = self.assistant_source
        return data

    def _assistant_prompts(self, examples: list[Example], n: int) -> list[list[int]]:
        helper = self.assistant.lm[0]
        texts = [self.task.prompt(ex) for ex in examples]
        return [p + [helper.latent_id] * n for p in encode_prompts(texts, helper.tokenizer, self.run.model.use_chat_template)]

    # -- training ------------------------------------------------------------------------------
    def collate(self, examples: list[Example]) -> dict[str, Any]:
        n = self.cfg.num_thoughts
        texts = []
        for ex in examples:
            chain = self.task.chain_text(ex) if self.cfg.mode == "chain" else ""
            answer = self.task.answer_text(ex)
            texts.append(f"{chain} {answer}" if chain else answer)
        prompts, helper_prompts = self.bot_prompt_ids(examples), self._assistant_prompts(examples, n)
        targets = encode_targets(texts, self.loaded.tokenizer, self.loaded.eos_ids[0])
        context = max_positions(self.loaded.model)
        limit = min(self.cfg.max_length, context) if context else self.cfg.max_length
        keep = [i for i in range(len(examples)) if len(prompts[i]) + n + 1 + len(targets[i]) <= limit]
        if not keep:
            raise ValueError(f"every example of this batch is longer than {limit} tokens (method.max_length)")
        return {"prompts": [prompts[i] for i in keep], "helper_prompts": [helper_prompts[i] for i in keep],
                "targets": [targets[i] for i in keep], "num_targets": sum(len(targets[i]) for i in keep),
                "dropped": len(examples) - len(keep)}

    def loss(self, modules: nn.ModuleDict, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        vectors = modules["assistant"](batch["helper_prompts"], self.cfg.num_thoughts)
        out = latent_forward(modules["lm"], batch["prompts"], batch["targets"], eot_id=self.loaded.eot_id,
                             pad_id=self.loaded.pad_id, vectors=vectors)
        return {"loss_sum": out.loss_sum()}

    # -- evaluation ----------------------------------------------------------------------------
    def eval_thoughts(self) -> int:
        return self.cfg.eval_thoughts or self.cfg.num_thoughts

    def prompt_ids(self, examples: list[Example]) -> list[list[int]]:
        return self.bot_prompt_ids(examples)

    def latent_step(self, examples: list[Example]) -> LatentStep | None:
        n = self.eval_thoughts()
        vectors = self.assistant(self._assistant_prompts(examples, n), n)
        return ExternalStep(vectors.to(self.loaded.model.get_input_embeddings().weight.dtype))

    def rollout_config(self) -> RolloutConfig:
        return dataclasses.replace(self.run.rollout, num_latent_steps=self.eval_thoughts())
