"""Text to token ids: prompts (with the tokenizer's chat template when it has one) and SFT targets.

Padding is done by length, never by comparing ids with the pad id: chat templates put end-of-turn
tokens inside prompts that often *are* the pad id.
"""
from __future__ import annotations

from typing import Any

import torch

IGNORE = -100


def render_prompt(text: str, tokenizer: Any, use_chat_template: bool = True) -> str:
    """The prompt string exactly as the model sees it, ending where the model starts writing."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
    return text + "\n"


def encode_prompts(texts: list[str], tokenizer: Any, use_chat_template: bool = True) -> list[list[int]]:
    """Token ids of rendered prompts; special tokens come from the template, not added twice."""
    templated = use_chat_template and getattr(tokenizer, "chat_template", None)
    rendered = [render_prompt(t, tokenizer, use_chat_template) for t in texts]
    return tokenizer(rendered, add_special_tokens=not templated)["input_ids"]


def encode_targets(texts: list[str], tokenizer: Any, eos_id: int) -> list[list[int]]:
    return [ids + [eos_id] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def pad_right(
    sequences: list[list[int]], labels: list[list[int]], pad_id: int
) -> dict[str, torch.Tensor]:
    """[B, T] input_ids, attention_mask and labels (IGNORE on padding)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    lab = torch.full((len(sequences), width), IGNORE, dtype=torch.long)
    for row, (seq, lbl) in enumerate(zip(sequences, labels)):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
        lab[row, : len(lbl)] = torch.tensor(lbl)
    return {"input_ids": ids, "attention_mask": mask, "labels": lab}
