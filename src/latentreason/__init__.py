"""latentreason: latent reasoning for Hugging Face causal LMs (Latent-SFT, DLR, refinement)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from latentreason.methods.base import Method

__version__ = "0.1.0"


def load(path: str | Path, overrides: list[str] | None = None) -> Method:
    """A saved run folder (``best/``, ``final/``, a stage folder) as the method it trained, ready to
    ``generate``; ``overrides`` (``section.field=value``) change its saved config, e.g. the rollout.

    Imported lazily so ``import latentreason`` stays cheap (no torch, no transformers).
    """
    from latentreason.methods.base import Method

    return Method.from_pretrained(path, overrides)
