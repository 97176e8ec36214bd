"""The one latent rollout every method uses: batched, left-padded, KV-cached.

    prompt ──prefill──► K latent steps (next input = step(hidden, logits)) ──► [<eot>] ──► decode

Research code breaks exactly here (batch size 1, answers decoded without the cache, shifted
positions after padding), so the loop lives once. Batching: prompts are left-padded; a sequence
that stops reasoning early keeps "holes" in its KV cache that the attention mask hides and that do
not advance its position ids, so every row computes what it would compute alone. ``use_cache=False``
recomputes the whole prefix each step: a slow reference used by the tests, not a mode to run.

Speed: after the prefill every forward feeds one column per row (a latent vector or a token's
embedding) through the same static cache, so one function serves latent and answer positions;
``rollout.compile`` compiles it (CUDA graphs on a GPU, where the eager loop is bound by kernel
launches). Each forward runs the decoder and applies the output layer to the last position only
(no per-layer hidden states). The host reads a device value ("every row stopped?") only every
``rollout.sync_every`` steps; rows that stop in between are masked, so results do not change.
"""
from __future__ import annotations

import hashlib
import inspect
import time
import types
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel, StaticCache

from latentreason.models.compat import (
    forward_args,
    repeat_cache_rows,
    returned_cache,
    rewind_static_cache,
    select_cache_rows,
)
from latentreason.models.steps import LatentStep, StepContext, input_embedding_table


@dataclass
class RolloutConfig:
    """How to run the latent phase and decode the answer."""

    num_latent_steps: int = field(default=0, metadata={"help": "latent steps (an upper bound when the step can stop sequences)"})
    max_new_tokens: int = field(default=64, metadata={"help": "tokens decoded after the latent phase"})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy decoding; > 0 samples"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling threshold when temperature > 0"})
    seed: int | None = field(default=None, metadata={"help": "sampling seed (reproducible sampled answers)"})
    feed_eot: bool = field(default=True, metadata={"help": "feed <eot> after the latent phase (when it ran)"})
    keep_distributions: str = field(default="topk", metadata={"help": "per latent step vocabulary distribution kept: topk, full or none"})
    distribution_topk: int = field(default=10, metadata={"help": "k for keep_distributions=topk"})
    use_cache: bool = field(default=True, metadata={"help": "False recomputes the prefix each step (reference for tests only)"})
    cache: str = field(default="static", metadata={"help": "static (preallocated KV cache, written by index) or dynamic (transformers' growing cache)"})
    compile: bool = field(default=False, metadata={"help": (
        "compile the one-column step (latent and answer positions alike) with torch.compile: CUDA graphs on a GPU, "
        "where the eager loop is launch-bound; needs cache=static and applies under no_grad/inference_mode "
        "(with grad enabled the rollout runs eagerly). The first batch of each shape bucket (batch and length "
        "rounded up to powers of two) compiles, taking tens of seconds; later ones reuse it")})
    compact: bool = field(default=True, metadata={"help": (
        "once at most half of a batch (rollout.compact_at) is still reasoning (or writing its answer), the rows that stopped step aside "
        "(at the sync_every checks): stopped reasoning rows wait, their cache kept for the answer, finished answers "
        "leave. Without it a batch pays every step for all its rows until its longest chain or answer ends. Each "
        "row's output is the same either way; not under compile (fixed shapes), nor for a step that cannot narrow "
        "its state (the shuffle probe)")})
    compact_at: float = field(default=0.5, metadata={"help": (
        "rollout.compact's trigger: the done rows step aside once at most this share of the rows served is still "
        "going, and again each time the share of the rest falls as low (0.5: at half, a quarter, ...). Higher "
        "reaches batches whose rows end close together, at the price of one copy of the served rows' cache per "
        "narrowing; 1 narrows at every host check where a row stopped")})
    sync_every: int = field(default=0, metadata={"help": (
        "steps between host checks of 'every row stopped' (each check waits for the device); rows that stop "
        "in between are masked, so results do not change. 0 = auto: 1 on CPU (a check is free), 8 elsewhere")})

    def __post_init__(self) -> None:
        if self.num_latent_steps < 0:
            raise ValueError(f"rollout.num_latent_steps={self.num_latent_steps}, must be >= 0")
        if self.max_new_tokens < 0:
            raise ValueError(f"rollout.max_new_tokens={self.max_new_tokens}, must be >= 0")
        if self.temperature < 0:
            raise ValueError(f"rollout.temperature={self.temperature}, must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"rollout.top_p={self.top_p}, must be in (0, 1]")
        if self.cache not in ("static", "dynamic"):
            raise ValueError(f"rollout.cache={self.cache!r}, must be static or dynamic")
        if self.keep_distributions not in ("topk", "full", "none"):
            raise ValueError(f"rollout.keep_distributions={self.keep_distributions!r}, must be topk, full or none")
        if self.distribution_topk < 1:
            raise ValueError(f"rollout.distribution_topk={self.distribution_topk}, must be >= 1")
        if not 0 < self.compact_at <= 1:
            raise ValueError(f"rollout.compact_at={self.compact_at}, must be in (0, 1]")
        if self.sync_every < 0:
            raise ValueError(f"rollout.sync_every={self.sync_every}, must be >= 0 (0 = auto)")
        if self.compile and (self.cache != "static" or not self.use_cache):
            raise ValueError("rollout.compile=true needs the static cache (rollout.cache=static, rollout.use_cache=true)")


@dataclass
class RolloutOutput:
    """Everything a method or the harness needs from one batch. B batch, K latent bound, D hidden."""

    tokens: list[list[int]]  # decoded answer tokens per sequence, eos excluded (B·G rows with group_size G)
    finished: torch.Tensor  # [B] bool: the answer ended with an eos token
    num_latent_steps: torch.Tensor  # [B] long: latent vectors actually fed
    latents: torch.Tensor  # [B, K, D] fed vectors (zeros after a sequence stopped)
    dist_probs: torch.Tensor | None  # [B, K, k] (topk) or [B, K, V] (full): p(· | prefix) that produced step t
    dist_ids: torch.Tensor | None  # [B, K, k] token ids for topk
    #: seconds per phase (prefill_s, latent_s, decode_s; reference_prefill_s: the references reading
    #: the prompts) and counts (forwards; reference_forwards; latent_steps_run and decode_steps_run:
    #: the steps each loop ran, its longest row's; latent_row_steps and decode_row_steps: the rows
    #: computed, summed over those steps, fewer where done rows stepped aside under cfg.compact)
    timings: dict[str, float] = field(default_factory=dict)
    #: [B, T] log-probability of each decoded token under the distribution it was drawn from
    #: (softmax(logits / temperature); greedy: temperature 1), 0 after a row ended; with return_logprobs
    logprobs: torch.Tensor | None = None
    #: the eos id that ended each row (None: it ran to max_new_tokens); a model may have several
    stop_ids: list[int | None] = field(default_factory=list)


class ContextLengthError(ValueError):
    """A prompt plus the latent and answer budget does not fit the model's context."""


class NonFiniteLatentError(ValueError):
    """A reasoning row was fed a latent vector with NaN or inf (it would silently decode garbage)."""


def derive_seed(seed: int, key: int | str) -> int:
    """A well-mixed 63-bit seed for one row from a base seed and a key (row index, example id).

    Why hashed: ``seed + index`` makes nearby (seed, index) pairs collide across runs.
    """
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def max_positions(model: PreTrainedModel) -> int | None:
    cfg = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_context(model: PreTrainedModel, prompt_lengths: list[int], extra: int) -> None:
    """Raise before any compute if a sequence would run past the model's positions."""
    limit = max_positions(model)
    if limit is None:
        return
    worst = max(prompt_lengths, default=0)  # no prompts: left_pad reports that, clearly
    if worst + extra > limit:
        index = prompt_lengths.index(worst)
        raise ContextLengthError(
            f"prompt {index} has {worst} tokens; with {extra} more for latent steps and answer it needs "
            f"{worst + extra} positions but the model has {limit}. Shorten the prompt, lower "
            "rollout.max_new_tokens / rollout.num_latent_steps, or use a model with a longer context."
        )


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] ids and mask, left-padded so every prompt ends at the same column."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("rollout needs at least one prompt and no empty prompt")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
        mask[row, width - len(p):] = 1
    return ids, mask


def mask_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch: each row's real tokens count from 0, so no row's
    positions (and, for absolute-position models such as GPT-2, its states) depend on its batch."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


# ---- one forward over new input columns -------------------------------------------------------


@dataclass(frozen=True)
class _Split:
    """The model as its decoder stack plus its output layer (checked to compute what the model does)."""

    base: torch.nn.Module  # the decoder: inputs_embeds -> last hidden state (after the final norm)
    head: torch.nn.Module  # the output layer: hidden state -> logits


_SPLITS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> _Split | None


def _split(model: PreTrainedModel, probe: torch.Tensor) -> _Split | None:
    """Decoder + output layer of ``model``, or None where running them is not what the model runs.

    Why: the rollout needs the last position's logits and last hidden state. Asking the model for
    hidden states (``output_hidden_states=True``) materialises every layer's; running the decoder
    and applying the output layer to the last position gives both at the price of the logits. It is
    generic (``base_model`` and ``get_output_embeddings`` exist on every transformers model; a peft
    wrapper is looked through, its LoRA layers live inside), but some models post-process between
    the two (logit softcapping or scaling, a rescaled hidden state): a check on a short probe,
    once per model object, compares both ways exactly and keeps the model's own forward where they
    differ.
    """
    if model in _SPLITS:
        return _SPLITS[model]
    get_base = getattr(model, "get_base_model", None)  # peft
    hf = get_base() if callable(get_base) else model
    base = getattr(hf, "base_model", None)
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    split = None
    if base is not None and base is not hf and head is not None:
        params = inspect.signature(base.forward).parameters
        if "inputs_embeds" in params and ("cache" in params or "past_key_values" in params):
            split = _Split(base, head)
    if split is not None:
        modes = [(m, m.training) for m in model.modules()]
        model.eval()  # dropout would make the two ways differ
        same = False
        try:
            with torch.no_grad():
                full = model(inputs_embeds=probe, output_hidden_states=True, use_cache=False)
                try:
                    hidden = split.base(inputs_embeds=probe, use_cache=False)[0]
                    logits = split.head(hidden)
                except Exception:  # noqa: BLE001 - a decoder that cannot run alone: the model's forward
                    hidden = logits = None
            same = (
                logits is not None and full.hidden_states is not None
                and hidden.shape == full.hidden_states[-1].shape and logits.shape == full.logits.shape
                and logits.dtype == full.logits.dtype
                and torch.equal(hidden, full.hidden_states[-1]) and torch.equal(logits, full.logits)
            )
        finally:
            for m, training in modes:
                m.training = training
        if not same:
            split = None
    _SPLITS[model] = split
    return split


class _Forward:
    """One forward over new columns: last-position logits [B, V], last hidden state [B, D] (or None),
    and the cache transformers returns. Keyword names are looked up once, here, so that the call
    itself traces cleanly under torch.compile.

    ``need_logits=False`` (a reference model, which only lends its hidden state) skips the output
    layer where the model splits (the logits are then None): it holds 28M of SmolLM2-135M's 135M
    weights, which counts where a step is bound by reading weights (a GPU at small batch); at batch
    32 on 2 CPU cores it saved 1.5% of a reference's two-column step."""

    def __init__(self, model: PreTrainedModel, split: _Split | None, need_hidden: bool, need_logits: bool = True) -> None:
        # Only the fallback holds the model itself: a compiled step kept for a model (weakly keyed)
        # then holds only its submodules, so dropping the model frees its compiled steps too.
        self.model = model if split is None else None
        self.split, self.need_hidden = split, need_hidden
        self.need_logits = need_logits or split is None  # the model's own forward always computes them
        # The cache's keyword and cache_position differ across transformers versions: compat.py.
        self.args = forward_args(split.base if split is not None else model)
        self.takes_cache_position = self.args.cache_position

    def __call__(
        self, feed: torch.Tensor, attention: torch.Tensor, positions: torch.Tensor, cache: object, use_cache: bool,
        cache_position: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, object]:
        kw = self.args.kwargs(cache, cache_position)
        if self.split is not None:
            kw.pop("logits_to_keep", None)  # a decoder has no output layer
            out = self.split.base(inputs_embeds=feed, attention_mask=attention, position_ids=positions,
                                  use_cache=use_cache, **kw)
            hidden = out[0][:, -1]
            logits = self.split.head(hidden) if self.need_logits else None
        else:
            out = self.model(inputs_embeds=feed, attention_mask=attention, position_ids=positions, use_cache=use_cache,
                             output_hidden_states=self.need_hidden, **kw)
            hidden = out.hidden_states[-1][:, -1] if self.need_hidden else None
            logits = out.logits[:, -1]
        return logits, hidden, returned_cache(out) if use_cache else None


def _bucket(n: int, floor: int = 1) -> int:
    """The power of two >= max(n, floor): shapes that share a compiled step."""
    return 1 << (max(n, floor) - 1).bit_length()


class _CompiledStep:
    """A compiled one-column forward with its own static cache, reused by every rollout of its shape.

    One function serves latent and answer positions: both feed one [B, 1, D] column (a latent vector
    or a token's embedding) through the same cache. Shapes are bucketed (batch and cache length
    rounded up to powers of two) so that batches of nearby shapes share one compilation: the
    padded rows (zero inputs, every column visible: finite, never read) and the cache columns past
    the end (masked) change no real row's result. The cache, the attention-mask buffer and the
    input buffers keep their addresses across rollouts (CUDA graphs replay on fixed addresses);
    a rollout resets them. Not re-entrant: one rollout at a time per model and shape.
    """

    def __init__(self, model: PreTrainedModel, split: _Split | None, need_hidden: bool, batch: int, max_len: int,
                 need_logits: bool = True) -> None:
        device, dtype = model.device, model.get_input_embeddings().weight.dtype
        self.forward = forward = _Forward(model, split, need_hidden, need_logits)
        self.batch, self.max_len, self.rows = batch, max_len, batch
        self.cuda = device.type == "cuda"
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        dim = model.get_input_embeddings().weight.shape[1]
        self.mask = torch.zeros(batch, max_len, dtype=torch.long, device=device)
        self.embeds = torch.zeros(batch, 1, dim, dtype=dtype, device=device)
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.cache_position = torch.zeros(1, dtype=torch.long, device=device) if forward.takes_cache_position else None
        for t in (self.mask, self.embeds, self.positions, self.cache_position):
            if t is not None:
                torch._dynamo.mark_static_address(t)
        self.offset = 0
        self.calls = 0  # compiled calls, over every rollout

        cache = self.cache

        def one_column(embeds: torch.Tensor, attention: torch.Tensor, positions: torch.Tensor,
                       cache_position: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
            logits, hidden, _ = forward(embeds, attention, positions, cache, True, cache_position)
            return logits, hidden

        options: dict = {"fullgraph": True, "dynamic": False}
        if self.cuda:
            options["mode"] = "reduce-overhead"  # CUDA graphs: one launch per step
        # Each shape compiles its own entry: dynamo counts compilations per code object against a
        # limit (8 by default; with fullgraph=True, going past it raises), so shapes must not share.
        fn = one_column
        if "isolate_recompiles" in inspect.signature(torch.compile).parameters:
            options["isolate_recompiles"] = True
        else:  # older torch: a code object of its own
            code = one_column.__code__.replace(co_name=f"one_column_{len(_COMPILED_NAMES)}")
            _COMPILED_NAMES.append(code.co_name)
            fn = types.FunctionType(code, one_column.__globals__, code.co_name, None, one_column.__closure__)
        self.fn = torch.compile(fn, **options)

    def begin(self, rows: int) -> None:
        """Start a rollout of ``rows`` real rows (<= the bucket): empty cache, padded rows see everything."""
        self.rows, self.offset = rows, 0
        self.cache.reset()
        self.mask.zero_()
        self.mask[rows:] = 1
        self.embeds.zero_()
        self.positions.zero_()

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        """Rows up to the bucket: zeros (zero embeddings, position 0) for the padded rows."""
        if x.shape[0] == self.batch:
            return x
        return torch.cat([x, x.new_zeros((self.batch - x.shape[0], *x.shape[1:]))])

    def __call__(self, embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        n, rows, end = embeds.shape[1], self.rows, self.offset + embeds.shape[1]
        self.mask[:rows, self.offset: end] = mask
        cache_position = None
        if self.cache_position is not None:
            cache_position = torch.arange(self.offset, end, device=embeds.device) if n > 1 else self.cache_position
            if n == 1:
                self.cache_position.fill_(self.offset)
        if n > 1:  # the prefill: prompt widths vary, so it runs eagerly
            logits, hidden, _ = self.forward(self._pad(embeds), self.mask, self._pad(positions), self.cache, True,
                                             cache_position)
            self.offset = end
            return None if logits is None else logits[:rows], None if hidden is None else hidden[:rows]
        self.embeds[:rows].copy_(embeds)
        self.positions[:rows].copy_(positions)
        if self.cuda:
            torch.compiler.cudagraph_mark_step_begin()
        logits, hidden = self.fn(self.embeds, self.mask, self.positions, cache_position)
        self.offset, self.calls = end, self.calls + 1
        # CUDA graph outputs are overwritten by the next replay: keep copies of the real rows.
        if logits is not None:
            logits = logits[:rows].clone() if self.cuda else logits[:rows]
        if hidden is not None:
            hidden = hidden[:rows].clone() if self.cuda else hidden[:rows]
        return logits, hidden


MAX_COMPILED_PER_MODEL = 8
_COMPILED_NAMES: list[str] = []
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> OrderedDict[key, _CompiledStep]


def clear_compiled(model: PreTrainedModel | None = None) -> None:
    """Drop the compiled steps (and their KV caches) kept for ``model``, or for every model.

    They go with the model otherwise, except for a model whose own forward runs (see ``_split``):
    its steps hold it, so call this before dropping such a model to free the device memory."""
    if model is None:
        _COMPILED.clear()
    else:
        _COMPILED.pop(model, None)


def _compiled_step(model: PreTrainedModel, split: _Split | None, need_hidden: bool, batch: int, max_len: int,
                   need_logits: bool = True) -> _CompiledStep:
    """The compiled step for this model and shape bucket, built on first use (the least recently used
    of more than ``MAX_COMPILED_PER_MODEL`` is dropped, with its cache)."""
    rows, length = _bucket(batch), _bucket(max_len, 64)
    limit = max_positions(model)
    if limit is not None and max_len <= limit < length:
        length = limit  # no more cache than the model has positions
    key = (rows, length, split is None and need_hidden, split is None or need_logits, str(model.device),
           model.get_input_embeddings().weight.dtype, torch.is_inference_mode_enabled(), model.training)
    entries = _COMPILED.setdefault(model, OrderedDict())
    if key not in entries:
        entries[key] = _CompiledStep(model, split, need_hidden or split is not None, rows, length, need_logits)
        while len(entries) > MAX_COMPILED_PER_MODEL:
            entries.popitem(last=False)
    entries.move_to_end(key)
    return entries[key]


class _Runner:
    """Runs the model on new input columns and returns last-position logits (and hidden state).

    Four modes: a preallocated static KV cache written by index (default: no per-step copy of
    the whole cache, which a growing cache pays on every token), the same with the one-column
    step compiled (``cfg.compile``: see ``_CompiledStep``), transformers' growing
    ``DynamicCache``, or no cache at all (re-runs the whole sequence: the tests' reference).
    The static cache is written in place, which autograd cannot differentiate through, so it (and
    the compiled step) is only used while grad is disabled; with grad enabled the growing cache
    (new tensors per step) takes its place.
    """

    def __init__(
        self, model: PreTrainedModel, cfg: RolloutConfig, need_hidden: bool, batch: int, max_len: int,
        probe: torch.Tensor, need_logits: bool = True,
    ) -> None:
        self.model, self.use_cache, self.need_hidden = model, cfg.use_cache, need_hidden
        self.static = (
            cfg.use_cache and cfg.cache == "static" and not torch.is_grad_enabled()
            and getattr(model, "_can_compile_fullgraph", False)
        )
        split = _split(model, probe)
        self.forward = _Forward(model, split, need_hidden, need_logits)
        self.compiled = (_compiled_step(model, split, need_hidden, batch, max_len, need_logits)
                         if self.static and cfg.compile else None)
        if self.compiled is not None:
            self.compiled.begin(batch)
        use_static = self.static and self.compiled is None
        self.cache = StaticCache(config=model.config, max_cache_len=max_len) if use_static else None
        self.mask_buf = torch.zeros(batch, max_len, dtype=torch.long, device=model.device) if use_static else None
        self.cache_position = use_static and self.forward.takes_cache_position
        self.offset = 0  # columns fed so far
        self.embeds: torch.Tensor | None = None  # uncached: everything fed so far
        self.mask: torch.Tensor | None = None  # [B, L] attention mask over everything fed (dynamic/uncached)
        self.positions: torch.Tensor | None = None
        self.forwards = 0
        #: while narrowed (:meth:`narrow`): the rows run, and the whole batch's tensors set aside
        self._narrow: tuple[torch.Tensor, list[tuple[Any, torch.Tensor, torch.Tensor]], torch.Tensor] | None = None

    def __call__(self, embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        n = embeds.shape[1]
        self.forwards += 1
        if self.compiled is not None:
            logits, hidden = self.compiled(embeds, mask, positions)
            return logits, hidden if self.need_hidden else None
        cache_position = None
        if self.static:
            self.mask_buf[:, self.offset: self.offset + n] = mask
            attention, feed, pos = self.mask_buf, embeds, positions
            if self.cache_position:
                cache_position = torch.arange(self.offset, self.offset + n, device=embeds.device)
        else:
            self.mask = mask if self.mask is None else torch.cat([self.mask, mask], dim=1)
            attention = self.mask
            if self.use_cache:
                feed, pos = embeds, positions
            else:
                self.embeds = embeds if self.embeds is None else torch.cat([self.embeds, embeds], dim=1)
                self.positions = positions if self.positions is None else torch.cat([self.positions, positions], dim=1)
                feed, pos = self.embeds, self.positions
        logits, hidden, cache = self.forward(feed, attention, pos, self.cache, self.use_cache, cache_position)
        self.offset += n
        if self.use_cache and not self.static:
            self.cache = cache
        return logits, hidden if self.need_hidden else None

    def select_rows(self, index: torch.Tensor) -> bool:
        """Keep only rows ``index`` (cache included): rows that finished leave the batch. False
        (nothing changed) where the cache cannot drop rows (the compiled step, a model's own cache)."""
        if self.compiled is not None:
            return False
        if self.use_cache:
            if not select_cache_rows(self.cache, index):
                return False
            if self.static:
                self.mask_buf = self.mask_buf[index]
            else:
                self.mask = self.mask[index]
        else:
            self.embeds, self.mask, self.positions = self.embeds[index], self.mask[index], self.positions[index]
        return True

    def can_narrow(self) -> bool:
        """Whether :meth:`narrow` can set rows aside: an eager KV cache whose layers hold plain
        key and value tensors (a model's own cache class, or the compiled step, cannot)."""
        layers = getattr(self.cache, "layers", None)
        return (self.compiled is None and self.use_cache and layers is not None
                and all(type(layer).__name__ in ("DynamicLayer", "StaticLayer") for layer in layers))

    def narrow(self, rows: torch.Tensor) -> None:
        """Run only ``rows`` (indices into the whole batch) until :meth:`widen`; the others wait aside,
        their cache untouched, as rows that stopped reasoning still have an answer to write."""
        if self._narrow is not None:
            self.widen()
        saved = []
        for layer in self.cache.layers:
            keys, values = layer.keys, layer.values
            saved.append((layer, keys, values))
            if torch.is_tensor(keys) and keys.numel():
                layer.keys, layer.values = keys[rows], values[rows]
                _set_rows(layer, len(rows))
        mask = self.mask_buf if self.static else self.mask
        self._narrow = (rows, saved, mask)
        if self.static:
            self.mask_buf = mask[rows]
        else:
            self.mask = mask[rows]

    def widen(self) -> None:
        """Back to the whole batch: the rows run while narrowed bring their new columns; the rows set
        aside get holes there (masked), as a stopped row does."""
        if self._narrow is None:
            return
        rows, saved, mask = self._narrow
        self._narrow = None
        for layer, keys, values in saved:
            if not (torch.is_tensor(keys) and keys.numel()):
                continue
            layer.keys, layer.values = _widen(keys, layer.keys, rows), _widen(values, layer.values, rows)
            _set_rows(layer, keys.shape[0])
        if self.static:
            self.mask_buf = _widen(mask, self.mask_buf, rows)
        else:
            self.mask = _widen(mask, self.mask, rows)

    def repeat_rows(self, repeats: int) -> None:
        """Every row ``repeats`` times (row b -> rows b·repeats ...), cache included: after one
        prefill, G samples per prompt. Not for the compiled step (its buffers have fixed shapes)."""
        if self.compiled is not None:
            raise ValueError("repeat_rows: the compiled step's buffers have fixed shapes")
        if self.static:
            repeat_cache_rows(self.cache, repeats)
            self.mask_buf = self.mask_buf.repeat_interleave(repeats, 0)
        elif self.use_cache:
            repeat_cache_rows(self.cache, repeats)
            self.mask = self.mask.repeat_interleave(repeats, 0)
        else:
            self.embeds = self.embeds.repeat_interleave(repeats, 0)
            self.mask = self.mask.repeat_interleave(repeats, 0)
            self.positions = self.positions.repeat_interleave(repeats, 0)

    def retract(self, n: int) -> None:
        """Forget the last ``n`` columns fed: the next feed takes their place (a peek at a vector
        that is not kept). The static cache is overwritten in place; without a cache the stored
        columns are trimmed; transformers' growing cache is not supported."""
        if n <= 0:
            return
        if self.compiled is not None:
            self.compiled.offset -= n
            rewind_static_cache(self.compiled.cache, n)
        elif self.static:
            self.offset -= n
            rewind_static_cache(self.cache, n)
        elif not self.use_cache:
            self.offset -= n
            self.embeds, self.mask, self.positions = self.embeds[:, :-n], self.mask[:, :-n], self.positions[:, :-n]
        else:
            raise ValueError("retract needs the static cache or no cache (rollout.cache=static or use_cache=false)")

    def forward_all(self, embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                    need_hidden: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Every new column's logits (and last hidden states) over the cache: teacher forcing after
        the latent phase, in one pass. Needs the growing cache (``cache=dynamic``, or grad enabled)."""
        if self.static or not self.use_cache:
            raise ValueError("forward_all needs the growing cache: rollout.cache=dynamic with use_cache=true")
        self.forwards += 1
        attention = mask if self.mask is None else torch.cat([self.mask, mask], dim=1)
        kw = forward_args(self.model).kwargs(self.cache)
        kw.pop("logits_to_keep", None)  # every position
        out = self.model(inputs_embeds=embeds, attention_mask=attention, position_ids=positions, use_cache=True,
                         output_hidden_states=need_hidden, **kw)
        self.mask, self.cache = attention, returned_cache(out)
        self.offset += embeds.shape[1]
        return out.logits, out.hidden_states[-1] if need_hidden else None


def _set_rows(layer: Any, rows: int) -> None:
    for name in ("max_batch_size", "batch_size"):  # static layers record their batch size (4.x / 5.x)
        if isinstance(getattr(layer, name, None), int):
            setattr(layer, name, rows)


def _widen(whole: torch.Tensor, part: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``whole`` [B, ...] with rows ``rows`` replaced by ``part`` [len(rows), ...]; where ``part`` grew
    along dim 2 of a cache or dim 1 of a mask (a growing cache), the other rows get zeros there."""
    grow = 2 if whole.dim() == 4 else 1
    if part.shape[grow] != whole.shape[grow]:
        shape = list(whole.shape)
        shape[grow] = part.shape[grow]
        grown = whole.new_zeros(shape)
        grown.narrow(grow, 0, whole.shape[grow]).copy_(whole)
        whole = grown
    return whole.index_copy_(0, rows, part)  # in place: nothing else holds the tensors set aside


class References:
    """Extra models run in lockstep with the main one over the latent phase (refinement's strong and
    weak references): each with its own KV cache, the same left padding, positions and holes.

    A step asks :meth:`hidden` "what would each reference's last hidden state be with this vector
    fed next?"; the rollout then commits the vector actually fed with :meth:`commit`. A commit is
    held back and fed together with the next question (two columns, one forward), so a reference
    costs one forward per latent step it is asked about, and nothing for steps it is not (nor for
    the answer, which references never see), plus its prefill of the prompts: where prompts are long
    and latents few, those prefills dominate (two references: about three times the unrefined
    prefill). A reference runs without its output layer (only its hidden state is read). Forwards run without gradients (the references only
    define a direction). Models must share the main model's vocabulary and input width.

    ``exact=False`` keeps the last vector a step asked about in the references' caches in place of
    the vector then fed (refinement moves it by a step of a few percent): one column per reference
    per step instead of two, at the price of references reading a slightly different history
    (what that saves depends on the model and hardware; their prefill is the same either way).
    """

    def __init__(self, models: list[PreTrainedModel], ids: torch.Tensor, mask: torch.Tensor, cfg: RolloutConfig,
                 max_len: int, dim: int, exact: bool = True) -> None:
        from dataclasses import replace

        self.models, self.exact = models, exact
        self.asked = False  # exact=False: a vector asked about at this step sits in the caches
        self.runners: list[_Runner] = []
        self.pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # committed, not yet fed
        self.forwards = 0
        positions = mask_positions(mask)
        batch = ids.shape[0]
        for i, ref in enumerate(models):
            width = ref.get_input_embeddings().weight.shape[1]
            if width != dim:
                raise ValueError(f"reference model {i} has input width {width}; the main model's is {dim}: "
                                 "references must share the main model's hidden size")
            with torch.no_grad():
                embed = ref.get_input_embeddings()
                if int(ids.max()) >= embed.weight.shape[0]:
                    raise ValueError(f"reference model {i} has {embed.weight.shape[0]} token embeddings but the "
                                     f"prompts use id {int(ids.max())}: references must share the main model's tokenizer")
                ref_ids = ids.to(ref.device)
                static_ok = getattr(ref, "_can_compile_fullgraph", False) and cfg.use_cache
                ref_cfg = replace(cfg, cache="static", use_cache=bool(static_ok), compile=cfg.compile and bool(static_ok))
                runner = _Runner(ref, ref_cfg, True, batch, max_len, probe=embed(ref_ids[:1, -4:]), need_logits=False)
                runner(embed(ref_ids), mask.to(ref.device), positions.to(ref.device))  # the prompt
            self.runners.append(runner)

    def can_select(self) -> bool:
        """Whether rows can leave the references' batch (:meth:`select_rows`)."""
        return all(r.compiled is None and hasattr(r.cache, "layers") for r in self.runners)

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` of the current batch: the references serve only the latent phase, so
        rows that stopped reasoning leave them for good."""
        for runner in self.runners:
            runner.select_rows(index.to(runner.model.device))
        self.pending = [tuple(c[index.to(c.device)] for c in col) for col in self.pending]

    def commit(self, fed: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> None:
        """The [B, 1, D] column the main model was fed (mask and positions [B, 1]), fed later."""
        if self.asked:  # exact=False: the vector last asked about stays in its place
            self.asked = False
            return
        self.pending.append((fed, mask, positions))

    @torch.no_grad()
    def hidden(self, vectors: torch.Tensor, active: torch.Tensor, positions: torch.Tensor) -> list[torch.Tensor]:
        """Each reference's [B, D] last hidden state with ``vectors`` [B, D] fed at ``positions`` [B]
        (rows not ``active`` are masked, as the main model's holes). Nothing is kept of the vector
        (with ``exact=False``, it is kept until the step's next question or the commit)."""
        if self.asked:  # exact=False, a second question at this step: forget the first
            for runner in self.runners:
                runner.retract(1)
        cols = [*self.pending, (vectors[:, None], active.long()[:, None], positions[:, None])]
        together = [tuple(torch.cat([c[i] for c in cols], 1) for i in range(3))]
        out = []
        for ref, runner in zip(self.models, self.runners):
            dtype = ref.get_input_embeddings().weight.dtype
            # Compiled (rollout.compile): one replay of the one-column step per column beats an
            # eager forward of two columns on a launch-bound GPU; otherwise one forward.
            for embeds, mask, pos in cols if runner.compiled is not None else together:
                _, h = runner(embeds.to(ref.device, dtype), mask.to(ref.device), pos.to(ref.device))
            if self.exact:
                runner.retract(1)
            out.append(h.to(vectors.device, vectors.dtype))
        self.pending, self.asked = [], not self.exact
        self.forwards += 1
        return out


def _select(logits: torch.Tensor, cfg: RolloutConfig, generators: list[torch.Generator] | None) -> torch.Tensor:
    """Next token per row: argmax, or a sample (top-p filtered) from each row's own generator.

    One generator per row makes a row's sample independent of the rest of the batch; without
    generators the global RNG samples the whole batch at once (not reproducible).
    """
    if cfg.temperature == 0:
        return logits.argmax(-1)
    probs = (logits.float() / cfg.temperature).softmax(-1)
    if cfg.top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        keep = (sorted_probs.cumsum(-1) - sorted_probs) < cfg.top_p
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    if generators is None:
        return torch.multinomial(probs, 1).squeeze(-1)
    return torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)])


def _row_generators(
    cfg: RolloutConfig, row_seeds: list[int] | None, batch: int, device: torch.device
) -> list[torch.Generator] | None:
    """One seeded generator per row, or None (greedy, or sampling with no seed at all)."""
    if row_seeds is not None and len(row_seeds) != batch:
        raise ValueError(f"rollout: row_seeds has {len(row_seeds)} seeds for {batch} prompts; pass one per prompt")
    if cfg.temperature == 0:
        return None
    if row_seeds is None:
        if cfg.seed is None:
            return None
        row_seeds = [derive_seed(cfg.seed, row) for row in range(batch)]
    return [torch.Generator(device=device).manual_seed(int(s)) for s in row_seeds]


@dataclass
class LatentPhase:
    """The state after the latent phase: where answer decoding (or teacher forcing) continues."""

    logits: torch.Tensor  # [B, V] last real output of each row
    hidden: torch.Tensor | None  # [B, D]
    lengths: torch.Tensor  # [B] next real position id
    latents: torch.Tensor  # [B, K, D] fed vectors (zeros in holes)
    num_latent_steps: torch.Tensor  # [B]
    dist_probs: torch.Tensor | None
    dist_ids: torch.Tensor | None
    row_steps: int = 0  # rows computed, summed over the steps run (fewer once stopped rows step aside)


def _put_rows(whole: torch.Tensor | None, rows: torch.Tensor, part: torch.Tensor | None) -> torch.Tensor | None:
    """``whole`` with rows ``rows`` replaced by ``part`` (None stays None)."""
    return None if whole is None else whole.index_copy(0, rows, part)


def _narrows(left: int, width: int, at: float) -> bool:
    """Whether a batch of ``width`` rows, ``left`` of them still going, sets the others aside."""
    return left < width and left <= width * at + 1e-9  # 0.29 * 100 is 28.999999999999996


def _whole_rows(entries: list[torch.Tensor], rows: list[torch.Tensor | None], batch: int) -> list[torch.Tensor]:
    """Per-step tensors of the rows served at each step, back at their place in the whole batch
    (zeros, or False, for the rows set aside: they were stopped)."""
    out = []
    for entry, index in zip(entries, rows):
        if index is not None:
            entry = entry.new_zeros((batch, *entry.shape[1:])).index_copy(0, index, entry)
        out.append(entry)
    return out


def latent_phase(
    runner: _Runner, step: LatentStep | None, num_steps: int, logits: torch.Tensor, hidden: torch.Tensor | None,
    lengths: torch.Tensor, embedding: torch.Tensor, *, keep: str = "none", keep_topk: int = 10, sync_every: int = 1,
    references: References | None = None, compact: bool = False, compact_at: float = 0.5,
) -> LatentPhase:
    """Up to ``num_steps`` latent steps after a prefill: the loop shared by the rollout (inference)
    and :func:`latentreason.models.latent_forward.latent_forward` (training, with gradients).

    Per step only what the next forward needs runs; the non-finite check, the kept distributions'
    masking and the stacking run once after the loop (each op here is a kernel launch per step,
    and on a GPU the step is launch-bound).

    ``compact``: once at most ``compact_at`` of the rows still reason (at a host check), the others wait
    aside (:meth:`_Runner.narrow`: their cache untouched, holes where the rest go on) and the
    step, the references and the loop serve the rest; the whole batch comes back after the loop
    for the answer. Where the step (``compactable``) or a cache cannot, every row keeps stepping.
    """
    batch, dim, device = logits.shape[0], embedding.shape[1], logits.device
    n_latent = torch.zeros(batch, dtype=torch.long, device=device)
    active = torch.ones(batch, dtype=torch.bool, device=device)
    keep = keep if num_steps else "none"
    latent_list: list[torch.Tensor] = []
    active_list: list[torch.Tensor] = []  # [B] rows fed at each step
    kept: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    compact = (compact and step is not None and step.compactable and runner.can_narrow()
               and (references is None or references.can_select()))
    rows: torch.Tensor | None = None  # while narrowed: the whole-batch index of each row served
    row_list: list[torch.Tensor | None] = []  # the rows of each step's entries above (None: all)
    whole: list[torch.Tensor | None] = []  # while narrowed: logits, hidden, lengths of the whole batch
    row_steps = 0
    for t in range(num_steps):
        result = step(StepContext(t, hidden, logits, embedding, active, lengths, references))
        if result.stop is not None:
            active = active & ~result.stop
        z = result.embeds
        if tuple(z.shape) != (active.shape[0], dim):
            raise ValueError(
                f"{type(step).__name__} returned vectors of shape {tuple(z.shape)} at latent step {t}; "
                f"expected ({active.shape[0]}, {dim}) (batch, hidden size)"
            )
        # A host check waits for the device, so it runs every sync_every steps; until it runs, a
        # stopped batch keeps stepping with every row masked: holes in the cache, nothing recorded.
        if t % sync_every == 0:
            left = int(active.sum())
            if left == 0:
                break
            if compact and _narrows(left, active.shape[0], compact_at):  # the stopped rows step aside
                served = active.nonzero()[:, 0]
                if rows is None:
                    rows, whole = torch.arange(batch, device=device), [logits, hidden, lengths]
                else:  # bring the whole batch up to date with the rows served so far
                    whole = [_put_rows(w, rows, c) for w, c in zip(whole, (logits, hidden, lengths))]
                step.select_rows(served)
                if references is not None:
                    references.select_rows(served)
                rows = rows[served]
                runner.narrow(rows)
                z, active, logits, lengths = z[served], active[served], logits[served], lengths[served]
                hidden = None if hidden is None else hidden[served]
        # Stopped rows get zeros, not the raw vector: under a zero mask 0 * NaN is still NaN.
        fed = torch.where(active[:, None], z, torch.zeros_like(z)).to(embedding.dtype)
        latent_list.append(fed)
        active_list.append(active)
        row_list.append(rows)
        if keep != "none":
            with torch.no_grad():
                probs = logits.detach().float().softmax(-1)
                if keep == "topk":
                    top = probs.topk(keep_topk, dim=-1)
                    kept.append((top.values, top.indices))
                else:
                    kept.append((probs, None))
        step_long = active.long()
        new_logits, new_hidden = runner(fed[:, None], step_long[:, None], lengths[:, None])
        row_steps += active.shape[0]
        if references is not None:
            references.commit(fed[:, None], step_long[:, None], lengths[:, None])
        # Stopped rows keep their last real outputs: that is where their answer continues from.
        logits = torch.where(active[:, None], new_logits, logits)
        if new_hidden is not None:
            hidden = torch.where(active[:, None], new_hidden, hidden)
        lengths = lengths + step_long  # a new tensor: the positions fed above are never overwritten
        n_latent = n_latent + step_long if rows is None else n_latent.index_add(0, rows, step_long)
    if rows is not None:  # the whole batch again, for the answer
        runner.widen()
        logits, hidden, lengths = (_put_rows(w, rows, c) for w, c in zip(whole, (logits, hidden, lengths)))
        latent_list, active_list = _whole_rows(latent_list, row_list, batch), _whole_rows(active_list, row_list, batch)
        if kept:
            ids = _whole_rows([i for _, i in kept], row_list, batch) if kept[0][1] is not None else [None] * len(kept)
            kept = list(zip(_whole_rows([p for p, _ in kept], row_list, batch), ids))
    latents = torch.zeros(batch, num_steps, dim, device=device, dtype=embedding.dtype)
    dist_probs = dist_ids = None
    if latent_list:
        ran = len(latent_list)
        fed_all = torch.stack(latent_list, 1)  # [B, ran, D]
        was_active = torch.stack(active_list, 1)  # [B, ran]
        bad = was_active & ~torch.isfinite(fed_all).all(-1)
        if bool(bad.any()):  # one sync for the whole latent phase
            rows = bad.any(-1).nonzero()[:, 0].tolist()
            first = bad.long().argmax(-1).tolist()
            where = ", ".join(f"row {r} at latent step {first[r]}" for r in rows[:5])
            more = f" (and {len(rows) - 5} more rows)" if len(rows) > 5 else ""
            raise NonFiniteLatentError(
                f"{type(step).__name__} fed a NaN or inf latent vector to a reasoning row: {where}{more} (steps 0-based)"
            )
        latents = torch.cat([fed_all, latents[:, ran:]], 1)
        if keep != "none":
            with torch.no_grad():
                on = was_active[..., None]
                width = keep_topk if keep == "topk" else logits.shape[-1]
                dist_probs = torch.zeros(batch, num_steps, width, device=device)
                dist_probs[:, :ran] = torch.stack([p for p, _ in kept], 1) * on
                if keep == "topk":
                    # ids of a stopped row are 0, as if it ran alone (topk of zeros picks any ids)
                    dist_ids = torch.zeros(batch, num_steps, width, dtype=torch.long, device=device)
                    dist_ids[:, :ran] = torch.stack([i for _, i in kept], 1) * on
    elif keep == "topk":
        dist_probs = torch.zeros(batch, num_steps, keep_topk, device=device)
        dist_ids = torch.zeros(batch, num_steps, keep_topk, dtype=torch.long, device=device)
    elif keep == "full":
        dist_probs = torch.zeros(batch, num_steps, logits.shape[-1], device=device)
    return LatentPhase(logits, hidden, lengths, latents, n_latent, dist_probs, dist_ids, row_steps)


def rollout(
    model: PreTrainedModel,
    prompts: list[list[int]],
    step: LatentStep | None,
    cfg: RolloutConfig,
    *,
    eos_ids: list[int],
    pad_id: int,
    eot_id: int | None = None,
    row_seeds: list[int] | None = None,
    references: list[PreTrainedModel] | None = None,
    exact_references: bool = True,
    group_size: int = 1,
    return_logprobs: bool = False,
) -> RolloutOutput:
    """Run prompts (token id lists, any lengths) through latent steps and answer decoding.

    Gradients: with grad enabled the latent phase keeps the graph, so ``latents`` is
    differentiable in the model's parameters and in vectors a step returns; the KV cache is then
    transformers' ``DynamicCache`` whatever ``cfg.cache`` says (the static cache is written in
    place, which breaks backward). Under ``no_grad`` / ``inference_mode`` (evaluation) the static
    cache is used. Answer decoding never tracks gradients.

    Sampling: ``row_seeds`` (one per prompt) gives each row its own generator, so a row's sampled
    answer does not depend on the batch it is in or its position; without it ``cfg.seed`` seeds
    row i with ``derive_seed(cfg.seed, i)``. Greedy decoding ignores both.

    Raises ``NonFiniteLatentError`` (checked once, after the latent phase: no per-step sync) if a
    reasoning row was fed NaN or inf; rows that stopped are fed zeros, whatever the step returned.

    Groups (RL: G answers per question): ``group_size`` G runs every prompt G times, rows
    b·G … b·G + G − 1 (``row_seeds``, the step and every output have B·G rows). The prompts are
    prefilled once and the cache's rows repeated, not prefilled G times (under ``cfg.compile`` the
    compiled step's buffers have fixed shapes, so the prompts are repeated before the prefill: the
    same outputs, G prefills). ``return_logprobs`` fills ``RolloutOutput.logprobs``.

    References: models run in lockstep with this one over the latent phase (see
    :class:`References`, and its ``exact`` for ``exact_references``); a step reaches them through
    ``StepContext.references``.

    Speed: ``cfg.compile`` runs each one-column forward compiled (under no_grad/inference_mode;
    with grad enabled the rollout stays eager); a step function runs between two compiled
    forwards and must not sync the host (see ``steps.py``). "Every row stopped" is checked every
    ``cfg.sync_every`` steps (auto: every step on CPU, every 8 elsewhere); in between, stopped rows
    keep stepping masked (holes in the cache, pad tokens cut from the answer), so the outputs are
    those of a check at every step (``timings["forwards"]`` counts the extra forwards). Once at
    most half of the rows (``cfg.compact_at``) still reason, the stopped ones wait aside until the
    latent phase ends (:func:`latent_phase`), and once at most that share still write, the finished answers leave the
    batch, cache rows and all (``cfg.compact``; not under ``cfg.compile``): a batch no longer pays
    every step for rows that are done (``timings["latent_row_steps"]`` / ``"decode_row_steps"``
    count the row-steps computed).
    """
    device = model.device
    embed = model.get_input_embeddings()
    num_steps = cfg.num_latent_steps if step is not None else 0
    feed_eot = cfg.feed_eot and num_steps > 0 and eot_id is not None
    extra = num_steps + int(feed_eot) + cfg.max_new_tokens
    check_context(model, [len(p) for p in prompts], extra)
    if group_size < 1:
        raise ValueError(f"rollout: group_size={group_size}, must be >= 1")
    if cfg.compile and references and len({id(m) for m in (model, *references)}) < 1 + len(references):
        # one compiled step and static cache per model object: a second runner on it would reset the first's
        raise ValueError("rollout.compile: a reference is the main model or another reference (one object twice); "
                         "pass distinct models (copy.deepcopy), or rollout.compile=false")
    ids, mask = left_pad(prompts, pad_id, device)
    shared = group_size > 1 and not (cfg.compile and not torch.is_grad_enabled())  # compiled: fixed shapes
    if group_size > 1 and not shared:  # the compiled step: G prefills, the same outputs
        ids, mask = ids.repeat_interleave(group_size, 0), mask.repeat_interleave(group_size, 0)
    prefill_rows = ids.shape[0]
    batch = prefill_rows * (group_size if shared else 1)
    dim = embed.weight.shape[1]
    generators = _row_generators(cfg, row_seeds, batch, device)
    if step is not None:
        step.validate(batch, num_steps, dim)
    runner = _Runner(model, cfg, step is not None and step.needs_hidden, prefill_rows,
                     max_len=ids.shape[1] + extra, probe=embed(ids[:1, -4:]))
    sync_every = cfg.sync_every or (1 if device.type == "cpu" else 8)
    timings: dict[str, float] = {}
    ones = torch.ones(batch, 1, dtype=torch.long, device=device)

    t0 = time.perf_counter()
    positions = mask_positions(mask)
    lengths = mask.sum(-1)  # [B] real tokens so far: the next real token's position id
    logits, hidden = runner(embed(ids), mask, positions)
    if shared:  # one prefill, G rows per prompt from here on
        runner.repeat_rows(group_size)
        ids, mask, lengths = (t.repeat_interleave(group_size, 0) for t in (ids, mask, lengths))
        logits = logits.repeat_interleave(group_size, 0)
        hidden = None if hidden is None else hidden.repeat_interleave(group_size, 0)
    timings["prefill_s"] = time.perf_counter() - t0

    # ---- latent phase -------------------------------------------------------------------------
    refs = None
    if references and num_steps:  # each reference reads the prompts: a prefill of its own
        t0 = time.perf_counter()
        refs = References(references, ids, mask, cfg, max_len=ids.shape[1] + num_steps + 1, dim=dim,
                          exact=exact_references)
        timings["reference_prefill_s"] = time.perf_counter() - t0
    t0, before = time.perf_counter(), runner.forwards
    phase = latent_phase(runner, step, num_steps, logits, hidden, lengths, input_embedding_table(model),
                         keep=cfg.keep_distributions, keep_topk=cfg.distribution_topk, sync_every=sync_every,
                         references=refs, compact=cfg.compact and not torch.is_grad_enabled(),
                         compact_at=cfg.compact_at)
    timings["latent_steps_run"] = float(runner.forwards - before)
    timings["latent_row_steps"] = float(phase.row_steps)
    logits, lengths = phase.logits, phase.lengths
    latents, n_latent, dist_probs, dist_ids = phase.latents, phase.num_latent_steps, phase.dist_probs, phase.dist_ids
    if feed_eot:
        eot = embed(torch.full((batch, 1), eot_id, dtype=torch.long, device=device))
        logits, _ = runner(eot, ones, lengths[:, None])
        lengths = lengths + 1
    timings["latent_s"] = time.perf_counter() - t0

    # ---- answer decoding, same cache ----------------------------------------------------------
    t0 = time.perf_counter()
    eos = torch.tensor(eos_ids, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)  # every row's, whatever the loop holds
    rows = torch.arange(batch, device=device)  # the rows the loop still holds (all, until a compaction)
    pads = torch.full((batch,), pad_id, dtype=torch.long, device=device)
    out = torch.full((batch, cfg.max_new_tokens), pad_id, dtype=torch.long, device=device)
    logps = torch.zeros(batch, cfg.max_new_tokens, device=device) if return_logprobs else None
    compact = cfg.compact
    produced, row_steps = 0, 0
    with torch.no_grad():
        for i in range(cfg.max_new_tokens):
            nxt = torch.where(done, pads[: len(rows)], _select(logits, cfg, generators))
            out[rows, i] = nxt
            if logps is not None:
                scaled = logits.float() / (cfg.temperature or 1.0)
                chosen = scaled.log_softmax(-1).gather(-1, nxt[:, None])[:, 0]
                logps[rows, i] = torch.where(done, torch.zeros_like(chosen), chosen)
            produced, row_steps = i + 1, row_steps + len(rows)
            done = done | torch.isin(nxt, eos)
            if i == cfg.max_new_tokens - 1:
                break
            if (i + 1) % sync_every == 0:  # rows done before a check decode pad, cut below
                left = int((~done).sum())
                if left == 0:
                    break
                keep = (~done).nonzero()[:, 0] if compact and _narrows(left, len(rows), cfg.compact_at) else None
                if keep is not None and not runner.select_rows(keep):
                    compact = False  # the compiled step's fixed shapes, or a cache that cannot drop rows
                elif keep is not None:  # finished rows leave the batch: they stop costing
                    finished[rows[done]] = True
                    rows, nxt, logits, lengths, done = rows[keep], nxt[keep], logits[keep], lengths[keep], done[keep]
                    generators = None if generators is None else [generators[k] for k in keep.tolist()]
            logits, _ = runner(embed(nxt[:, None]), ones[: len(rows)], lengths[:, None])
            lengths = lengths + 1
    finished[rows] = done
    timings["decode_s"] = time.perf_counter() - t0
    timings["decode_steps_run"] = float(produced)
    timings["decode_row_steps"] = float(row_steps)
    timings["forwards"] = float(runner.forwards)
    if refs is not None:
        timings["reference_forwards"] = float(refs.forwards * len(refs.runners))

    tokens, stops = [], []
    eos_set = set(eos_ids)
    for row in out[:, :produced].tolist():
        cut = next((j for j, tok in enumerate(row) if tok in eos_set), len(row))
        tokens.append(row[:cut])
        stops.append(row[cut] if cut < len(row) else None)
    if logps is not None:
        logps = logps[:, :produced]
    return RolloutOutput(tokens, finished, n_latent, latents, dist_probs, dist_ids, timings, logps, stops)
