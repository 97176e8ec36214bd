"""The accelerator paths, on a GPU only (skipped without one; CI has none): the compiled rollout
(CUDA graphs) against the eager one for every kind of latent step, sampled groups, refinement's
references in lockstep, and the CLI's device. Run on a GPU machine with ``pytest tests/test_gpu.py``
(the default suite keeps models on the CPU there: LATENTREASON_DEVICE=cpu in conftest.py)."""
from __future__ import annotations

import json

import pytest
import torch

from latentreason.config import ModelConfig, RefineConfig
from latentreason.methods.refine import RefineStep
from latentreason.models.loading import load_model
from latentreason.models.rollout import RolloutConfig, clear_compiled, rollout
from latentreason.models.steps import HiddenStateStep, MixtureStep, ProbeStep, SoftThinkingStep

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

STEPS = ["none", "hidden", "mixture-top10", "mixture-full", "soft-thinking", "probe-noise", "refine"]


def _lm(seed: int):
    """A random tiny model whose weights are scaled up, so that its outputs depend on the input
    (rows write different tokens; at the default scale every row writes the same one)."""
    torch.manual_seed(seed)
    lm = load_model(ModelConfig(name_or_path="tiny-llama-l2-d64", device="cuda", dtype="float32"))
    with torch.no_grad():
        for p in lm.model.parameters():
            if p.dim() == 2:
                p.mul_(6.0)
    return lm


@pytest.fixture(scope="module")
def models():
    main, strong, weak = _lm(0), _lm(1), _lm(2)
    yield main, strong, weak
    for lm in (main, strong, weak):
        clear_compiled(lm.model)


def _prompts(lm) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    vocab = lm.model.get_input_embeddings().weight.shape[0]
    return [torch.randint(5, vocab, (n,), generator=g).tolist() for n in (7, 12, 3, 9, 5)]


def _step(kind: str, lm):
    return {
        "none": lambda: None,
        "hidden": lambda: HiddenStateStep(),
        "mixture-top10": lambda: MixtureStep(top_k=10),
        "mixture-full": lambda: MixtureStep(top_k=0),
        "soft-thinking": lambda: SoftThinkingStep(max_topk=5, entropy_threshold=4.3, cold_stop_steps=1),
        "probe-noise": lambda: ProbeStep(HiddenStateStep(), "noise", seed=3, row_keys=list(range(5))),
        "refine": lambda: RefineStep(HiddenStateStep(), RefineConfig(residual=True, alpha=0.5, contrastive=True, eta=40.0)),
    }[kind]()


@pytest.mark.parametrize("kind", STEPS)
def test_compiled_rollout_equals_eager_on_the_gpu(models, kind: str) -> None:
    main, strong, weak = models
    refs = [strong.model, weak.model] if kind == "refine" else None
    outs = []
    for compile in (False, True):
        cfg = RolloutConfig(num_latent_steps=0 if kind == "none" else 6, max_new_tokens=12, compile=compile,
                            keep_distributions="topk")
        with torch.inference_mode():
            outs.append(rollout(main.model, _prompts(main), _step(kind, main), cfg, eos_ids=main.eos_ids,
                                pad_id=main.pad_id, eot_id=main.eot_id, references=refs))
    eager, fast = outs
    assert fast.latents.device.type == "cuda"
    assert fast.tokens == eager.tokens
    # rows differ (a row-mixing bug would show): their answers, or their latents
    assert len({tuple(t) for t in eager.tokens}) >= 3 or len({tuple(z[0, :4].tolist()) for z in eager.latents}) == 5
    assert fast.num_latent_steps.tolist() == eager.num_latent_steps.tolist()
    torch.testing.assert_close(fast.latents, eager.latents, rtol=1e-4, atol=1e-4)
    if kind == "soft-thinking":
        assert len(set(eager.num_latent_steps.tolist())) >= 2, "rows should stop at different steps"


def test_sampled_groups_are_the_same_compiled_and_eager(models) -> None:
    main = models[0]
    outs = []
    for compile in (False, True):
        cfg = RolloutConfig(num_latent_steps=3, max_new_tokens=10, compile=compile, temperature=1.0, seed=7)
        with torch.inference_mode():
            outs.append(rollout(main.model, _prompts(main), HiddenStateStep(), cfg, eos_ids=main.eos_ids,
                                pad_id=main.pad_id, eot_id=main.eot_id, group_size=4, return_logprobs=True))
    eager, fast = outs
    assert len(fast.tokens) == 20 and fast.tokens == eager.tokens
    assert len({tuple(t) for t in fast.tokens[:4]}) >= 2, "a group's samples should differ"
    torch.testing.assert_close(fast.logprobs, eager.logprobs, rtol=1e-4, atol=1e-4)


def test_train_and_eval_run_on_the_gpu(tmp_path) -> None:
    """In fresh processes: one that already ran on the CPU keeps Accelerate's settings (no bf16)."""
    import subprocess
    import sys

    from tests.conftest import cli_args, subprocess_env, tiny_run

    env = {**subprocess_env(), "LATENTREASON_DEVICE": "cuda"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cfg = tiny_run(tmp_path)
    cli = [sys.executable, "-m", "latentreason.cli"]
    train = subprocess.run([*cli, "train", *cli_args(cfg)], env=env, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr[-3000:]
    trained = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert trained["device"].startswith("cuda")
    best = tmp_path / "run" / "best"
    ev = subprocess.run([*cli, "eval", *cli_args(cfg), f"model.name_or_path={best}", "rollout.compile=true"], env=env,
                        capture_output=True, text=True, timeout=300)
    assert ev.returncode == 0, ev.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "eval-valid" / "summary.json").read_text())
    assert summary["device"].startswith("cuda") and summary["n"] == 32
