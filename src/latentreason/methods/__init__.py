"""Methods: one module each, registered in ``METHODS`` by the name users type."""
from latentreason.methods.base import METHODS, Method
from latentreason.methods import sft  # noqa: F401  (registers cot-sft, nocot-sft, zero-shot)
from latentreason.methods import soft_thinking  # noqa: F401  (registers soft-thinking)
from latentreason.methods import coconut  # noqa: F401  (registers coconut, pause)
from latentreason.methods import softcot  # noqa: F401  (registers softcot)

__all__ = ["METHODS", "Method"]
from latentreason.methods import latent_sft  # noqa: F401  (registers latent-sft)
from latentreason.methods import dlr  # noqa: F401  (registers dlr)
from latentreason.methods import grpo  # noqa: F401  (registers grpo)
