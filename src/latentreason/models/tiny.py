"""Tiny models and a character-level tokenizer built in code, for tests and demos.

Names: ``tiny`` (= ``tiny-llama``), or ``tiny-<arch>[-l<layers>][-d<hidden>]`` with arch one of
llama, qwen2, gpt2, e.g. ``tiny-llama-l4-d128``. Several architectures exist so that tests show the
rollout works beyond Llama without model-specific code. Nothing is downloaded.
"""
from __future__ import annotations

import re
import string
from collections.abc import Sequence

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PreTrainedModel, PreTrainedTokenizerFast, Qwen2Config

BASE_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]
# Every printable ASCII character but the rare vertical whitespace, plus every 2-digit string.
CHARS = [c for c in string.printable if c not in "\x0b\x0c\r"]
DIGIT_PAIRS = [f"{i:02d}" for i in range(100)]
TINY_PATTERN = re.compile(r"^tiny(?:-(llama|qwen2|gpt2))?(?:-l(\d+))?(?:-d(\d+))?$")
TINY_ARCHS = ("llama", "qwen2", "gpt2")


def char_tokenizer(words: Sequence[str] = ()) -> PreTrainedTokenizerFast:
    """One token per character, except that digits go in pairs (``2026`` -> ``20``, ``26``), and
    each of ``words`` (with or without the space before it) is one token.

    Why pairs: a two-digit number is then one token, so one step of mod-100 arithmetic is a
    lookup a tiny model learns quickly, while several steps composed without a written chain
    stay hard: exactly the contrast the generated tasks are meant to show. Why words: a task
    written in a small closed vocabulary (ProsQA's names and concepts) would otherwise cost one
    position per character (a ProsQA question is ~940 characters, ~150 tokens with its words).
    No merges are learned, so tokenization is exact and the same on every machine; the ids of
    the characters do not depend on ``words``.
    """
    words = list(dict.fromkeys(w for w in words if w))
    bad = [w for w in words if not re.fullmatch(r"[A-Za-z]+", w)]
    if bad:
        raise ValueError(f"tiny tokenizer words must be ASCII letters only, got {bad[:5]}")
    specials = BASE_SPECIALS + CHARS + DIGIT_PAIRS
    extra = [t for w in words for t in (w, " " + w) if t not in specials]
    vocab = {tok: i for i, tok in enumerate(specials + extra)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    pattern = r"\d\d|[\s\S]"
    if words:  # longest first, so "an" is not read as "a" + "n"; whole words only
        alternatives = "|".join(sorted(words, key=lambda w: (-len(w), w)))
        pattern = rf" ?\b(?:{alternatives})\b|{pattern}"
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )


def is_tiny_name(name: str) -> bool:
    return TINY_PATTERN.match(name) is not None


def tiny_model(name: str, vocab_size: int, max_positions: int = 512, seed: int = 0) -> PreTrainedModel:
    """Build a randomly initialised tiny causal LM (deterministic for a given ``seed``)."""
    match = TINY_PATTERN.match(name)
    if match is None:
        raise ValueError(f"{name!r} is not a tiny model name; expected tiny-<{'|'.join(TINY_ARCHS)}>[-l<layers>][-d<hidden>]")
    arch = match.group(1) or "llama"
    layers = int(match.group(2) or 4)
    hidden = int(match.group(3) or 128)
    heads = max(1, hidden // 32)
    if arch == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size, n_positions=max_positions, n_embd=hidden, n_layer=layers, n_head=heads,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=2, eos_token_id=1, pad_token_id=0,
        )
    else:
        cls = LlamaConfig if arch == "llama" else Qwen2Config
        config = cls(
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max_positions,
            tie_word_embeddings=True, bos_token_id=2, eos_token_id=1, pad_token_id=0, rope_theta=10000.0,
        )
    config.attn_implementation = "sdpa"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model
