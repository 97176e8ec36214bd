"""Methods: one module each, registered in ``METHODS`` by the name users type."""
from latentreason.methods.base import METHODS, Method
from latentreason.methods import sft  # noqa: F401  (registers cot-sft, nocot-sft, zero-shot)

__all__ = ["METHODS", "Method"]
