"""The transformers API as this package uses it, across the versions it supports (see pyproject.toml).

Everything that differs between transformers 4.56/4.57 and 5.x lives here, detected from the
signatures and fields of the objects at hand rather than from version numbers, so a model class
whose ``forward`` still takes the old names (remote code written for 4.x) keeps working under 5.x:

- the KV cache argument of ``forward``: ``past_key_values`` up to the 5.x release that renamed it
  ``cache`` (5.24 still accepts the old name, with a FutureWarning announcing its removal in
  5.40), and the matching field of the output (``out.past_key_values`` logs the same deprecation);
- ``cache_position``: required with a static cache in 4.x, gone by 5.24 (the cache counts the
  columns it was given itself);
- ``logits_to_keep``: present in both, but not on every model class;
- repeating a cache's rows (one prefill, G samples): dynamic layers have
  ``batch_repeat_interleave``; static layers do not, and name their batch size ``max_batch_size``
  (4.x) or ``batch_size`` (5.x);
- rewinding a static cache: 5.x caches count the columns written (``cumulative_length``, per layer)
  and must be told to step back; 4.x ones are written where ``cache_position`` says;
- special tokens: ``additional_special_tokens`` / ``replace_additional_special_tokens`` in 4.x,
  ``extra_special_tokens`` / ``replace_extra_special_tokens`` in 5.x (passing the 5.x keyword to a
  4.x tokenizer is a TypeError).
"""
from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class ForwardArgs:
    """The keyword names a causal LM's ``forward`` takes for what the rollout passes."""

    cache: str  # "cache" or "past_key_values"
    cache_position: bool  # pass ``cache_position`` (4.x; 5.24 has no such argument)
    logits_to_keep: bool

    def kwargs(self, cache: Any, cache_position: torch.Tensor | None = None) -> dict[str, Any]:
        """Keyword arguments for ``model(...)`` that hand it ``cache`` (and where it is wanted, ``cache_position``)."""
        out: dict[str, Any] = {self.cache: cache}
        if self.cache_position and cache_position is not None:
            out["cache_position"] = cache_position
        if self.logits_to_keep:
            out["logits_to_keep"] = 1
        return out


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft or DistributedDataParallel wrapper (whose forward takes **kwargs)."""
    for _ in range(8):
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "get_base_model") and callable(model.get_base_model):
            base = model.get_base_model()
            if base is model:
                break
            model = base
        else:
            break
    return model


def _library_cache_name() -> str:
    """What this transformers calls the cache, for a forward whose signature does not say."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    fields = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
    return "cache" if "cache" in fields else "past_key_values"


def forward_args(model: torch.nn.Module) -> ForwardArgs:
    """Read the names ``model``'s forward takes (the model under a peft/DDP wrapper)."""
    params = inspect.signature(_unwrap(model).forward).parameters
    if "cache" in params:
        name = "cache"
    elif "past_key_values" in params:
        name = "past_key_values"
    else:
        name = _library_cache_name()
    return ForwardArgs(cache=name, cache_position="cache_position" in params, logits_to_keep="logits_to_keep" in params)


def returned_cache(output: Any) -> Any:
    """The KV cache a forward returned, read from the field this transformers has (no deprecated alias)."""
    fields = {f.name for f in dataclasses.fields(output)} if dataclasses.is_dataclass(output) else set(output.keys())
    return getattr(output, "cache" if "cache" in fields else "past_key_values", None)


def add_extra_special_tokens(tokenizer: PreTrainedTokenizerBase, tokens: list[str]) -> int:
    """Add ``tokens`` as special tokens, keeping the tokenizer's existing extra special tokens special."""
    params = inspect.signature(tokenizer.add_special_tokens).parameters
    if "replace_extra_special_tokens" in params:  # transformers 5
        return tokenizer.add_special_tokens({"extra_special_tokens": tokens}, replace_extra_special_tokens=False)
    return tokenizer.add_special_tokens(  # transformers 4
        {"additional_special_tokens": tokens}, replace_additional_special_tokens=False
    )


def rewind_static_cache(cache: Any, n: int) -> None:
    """Make the next write to a ``StaticCache`` land ``n`` columns earlier (the stale columns are
    overwritten). Needed where the cache counts its own columns (5.x); a 4.x static cache is
    written at the ``cache_position`` the caller passes, so there is nothing to do."""
    for layer in getattr(cache, "layers", []):
        length = getattr(layer, "cumulative_length", None)
        if torch.is_tensor(length):
            length.sub_(n)
        elif isinstance(length, int):
            layer.cumulative_length = length - n


def repeat_cache_rows(cache: Any, repeats: int) -> None:
    """Repeat every row of a filled KV cache ``repeats`` times in place (row b becomes rows
    b·repeats … b·repeats + repeats − 1): G samples that share one prefill of their prompt."""
    _map_cache_rows(cache, lambda t: t.repeat_interleave(repeats, dim=0),
                    lambda layer: layer.batch_repeat_interleave(repeats))


def select_cache_rows(cache: Any, index: torch.Tensor) -> bool:
    """Keep only rows ``index`` of a filled KV cache, in place: rows that finished leave the batch.
    False (nothing changed) for a cache not made of layers (a model's own cache class)."""
    return _map_cache_rows(cache, lambda t: t[index], lambda layer: layer.batch_select_indices(index))


def _map_cache_rows(cache: Any, rows: Any, growing: Any) -> bool:
    """Apply ``rows`` to every layer's keys and values (growing layers: their own method, ``growing``)."""
    if not hasattr(cache, "layers"):
        return False
    for layer in cache.layers:
        if hasattr(layer, "batch_repeat_interleave") and not hasattr(layer, "max_cache_len"):
            growing(layer)  # a growing layer
            continue
        keys = getattr(layer, "keys", None)
        if not torch.is_tensor(keys) or keys.numel() == 0:
            continue  # not written yet (a layer that never saw the prompt)
        layer.keys = rows(keys)
        layer.values = rows(layer.values)
        for name in ("max_batch_size", "batch_size"):
            if isinstance(getattr(layer, name, None), int):
                setattr(layer, name, layer.keys.shape[0])
    return True
