"""Refinement (methods/refine.py) and the references the rollout runs in lockstep (models/rollout.py).

The lockstep contract: what a reference reports for a vector is its last hidden state when it reads,
alone and without a cache, the row's prompt, the vectors the main model was actually fed, and that
vector, for every row of a left-padded batch whose rows stop at different steps. The operators are
checked against the formulas computed by hand from such forwards.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from latentreason.config import RefineConfig, build_run_config
from latentreason.eval.harness import eval_fingerprint
from latentreason.methods.refine import RefineStep, auto_references, load_references
from latentreason.models.loading import LoadedModel
from latentreason.models.rollout import RolloutConfig, RolloutOutput, rollout
from latentreason.models.steps import ExternalStep, LatentStep, StepContext, StepResult
from tests.conftest import tiny_run
from tests.models.test_rollout import EXTERNAL_LENGTHS, NUM_LATENT, TEXTS, _assert_same, _load, _prompts

ARCHS = ["tiny-llama-l2-d64", "tiny-gpt2-l2-d64"]  # rotary and absolute positions
ATOL = 1e-5


@pytest.fixture(scope="module", params=ARCHS)
def trio(request: pytest.FixtureRequest) -> tuple[LoadedModel, LoadedModel, LoadedModel]:
    """The main model and two references of the same shape with other weights."""
    from tests.models.test_rollout import _randomise

    main, strong, weak = (_load(request.param) for _ in range(3))
    _randomise(strong.model, seed=1)
    _randomise(weak.model, seed=2)
    return main, strong, weak


def _vectors(lm: LoadedModel, seed: int = 5) -> torch.Tensor:
    dim = lm.model.get_input_embeddings().weight.shape[1]
    return torch.randn(len(TEXTS), NUM_LATENT, dim, generator=torch.Generator().manual_seed(seed)) * 0.3


def _run(lm: LoadedModel, step: LatentStep, refs: list[LoadedModel] | None, exact: bool = True,
         **cfg: object) -> RolloutOutput:
    cfg = {"num_latent_steps": NUM_LATENT, "max_new_tokens": 4, **cfg}
    with torch.no_grad():
        return rollout(lm.model, _prompts(lm), step, RolloutConfig(**cfg), eos_ids=lm.eos_ids, pad_id=lm.pad_id,
                       eot_id=lm.eot_id, references=None if refs is None else [r.model for r in refs],
                       exact_references=exact)


def _alone(ref: LoadedModel, prompt: list[int], vectors: list[torch.Tensor]) -> torch.Tensor:
    """``ref``'s last hidden state for one row read alone, uncached: the prompt, then ``vectors``."""
    with torch.no_grad():
        embeds = torch.cat([ref.model.get_input_embeddings()(torch.tensor([prompt]))[0], *[v[None] for v in vectors]])
        out = ref.model(inputs_embeds=embeds[None], output_hidden_states=True, use_cache=False)
    return out.hidden_states[-1][0, -1]


class _Asks(LatentStep):
    """Asks the references about the inner step's vector, then feeds half of it (so what a
    reference caches must be the fed vector, not the one it was asked about)."""

    def __init__(self, inner: LatentStep, twice: bool = False) -> None:
        self.inner, self.needs_hidden, self.seen, self.twice = inner, inner.needs_hidden, [], twice

    def __call__(self, ctx: StepContext) -> StepResult:
        result = self.inner(ctx)
        hidden = ctx.references.hidden(result.embeds, ctx.active, ctx.positions)
        if self.twice:  # a second question at the same step (a second search step)
            hidden = ctx.references.hidden(result.embeds * 2, ctx.active, ctx.positions)
        self.seen.append([h.clone() for h in hidden])
        return StepResult(result.embeds * 0.5, result.stop)


@pytest.mark.parametrize("cache", [{}, {"use_cache": False}, {"cache": "dynamic"}, {"compile": True}],
                         ids=["static", "uncached", "dynamic", "compiled"])
def test_references_report_what_each_reads_alone(trio, cache: dict) -> None:
    main, strong, weak = trio
    vectors = _vectors(main)
    step = _Asks(ExternalStep(vectors, lengths=torch.tensor(EXTERNAL_LENGTHS)))
    out = _run(main, step, [strong, weak], **cache)
    prompts = _prompts(main)
    checked = 0
    for t, hidden in enumerate(step.seen):
        for row, length in enumerate(EXTERNAL_LENGTHS):
            if t >= length:
                continue  # a stopped row's answer is masked; nothing to compare
            fed = [out.latents[row, s] for s in range(t)]
            assert torch.allclose(out.latents[row, t], vectors[row, t] * 0.5)
            for ref, h in zip((strong, weak), hidden):
                torch.testing.assert_close(h[row], _alone(ref, prompts[row], [*fed, vectors[row, t]]), atol=ATOL, rtol=0)
                checked += 1
    assert checked == 2 * sum(EXTERNAL_LENGTHS)
    assert out.timings["reference_forwards"] == 2 * len(step.seen)
    if cache.get("compile"):  # the references ran their compiled one-column steps too
        from latentreason.models.rollout import _COMPILED

        assert all(any(e.calls for e in _COMPILED[r.model].values()) for r in (strong, weak))


@pytest.mark.parametrize("cache", [{}, {"use_cache": False}, {"cache": "dynamic"}], ids=["static", "uncached", "dynamic"])
def test_references_run_without_their_output_layer(trio, cache: dict) -> None:
    """Only a reference's hidden state is read: its output layer (a fifth of SmolLM2's weights) never runs."""
    main, strong, weak = trio
    calls = {"main": 0, "refs": 0}
    hooks = [main.model.get_output_embeddings().register_forward_hook(lambda *_: calls.__setitem__("main", calls["main"] + 1))]
    hooks += [r.model.get_output_embeddings().register_forward_hook(lambda *_: calls.__setitem__("refs", calls["refs"] + 1))
              for r in (strong, weak)]
    try:
        step = _Asks(ExternalStep(_vectors(main), lengths=torch.tensor(EXTERNAL_LENGTHS)))
        out = _run(main, step, [strong, weak], **cache)
    finally:
        for h in hooks:
            h.remove()
    assert out.timings["reference_forwards"] > 0 and calls["main"] > 0
    assert calls["refs"] == 0
    assert out.timings["reference_prefill_s"] > 0


@pytest.mark.parametrize("cache", [{}, {"use_cache": False}], ids=["static", "uncached"])
def test_inexact_references_keep_the_last_vector_asked(trio, cache: dict) -> None:
    """exact_references=False: a reference's history holds, per step, the last vector it was asked
    about (here twice the step's vector) instead of the one fed (half of it)."""
    main, strong, weak = trio
    vectors = _vectors(main)
    step = _Asks(ExternalStep(vectors, lengths=torch.tensor(EXTERNAL_LENGTHS)), twice=True)
    out = _run(main, step, [strong, weak], exact=False, **cache)
    prompts = _prompts(main)
    for t, hidden in enumerate(step.seen):
        for row, length in enumerate(EXTERNAL_LENGTHS):
            if t < length:
                asked = [vectors[row, s] * 2 for s in range(t + 1)]
                for ref, h in zip((strong, weak), hidden):
                    torch.testing.assert_close(h[row], _alone(ref, prompts[row], asked), atol=ATOL, rtol=0)
    assert torch.allclose(out.latents[0, 0], vectors[0, 0] * 0.5)
    assert out.timings["reference_forwards"] == 2 * 2 * len(step.seen)


def test_references_change_nothing_the_step_does_not_ask_for(trio) -> None:
    main, strong, weak = trio
    vectors = _vectors(main)
    plain = _run(main, ExternalStep(vectors), None)
    with_refs = _run(main, ExternalStep(vectors), [strong, weak])
    assert plain.tokens == with_refs.tokens
    assert torch.equal(plain.latents, with_refs.latents)
    assert with_refs.timings["reference_forwards"] == 0


def test_references_must_match_the_model_width(trio) -> None:
    main, _, _ = trio
    other = _load("tiny-llama-l2-d32")
    with pytest.raises(ValueError, match="input width"):
        _run(main, _Asks(ExternalStep(_vectors(main))), [other])


# ---- the operators, by hand -------------------------------------------------------------------


def test_residual_mixes_the_fed_vector_with_the_steps_output(trio) -> None:
    main = trio[0]
    v, a = _vectors(main), 0.3
    out = _run(main, RefineStep(ExternalStep(v), RefineConfig(residual=True, alpha=a)), None)
    z = v[:, 0]
    torch.testing.assert_close(out.latents[:, 0], z)
    for t in range(1, NUM_LATENT):
        z = a * z + (1 - a) * v[:, t]
        torch.testing.assert_close(out.latents[:, t], z, atol=1e-6, rtol=0)


def test_momentum_form_by_hand(trio) -> None:
    main = trio[0]
    v, a = _vectors(main), 0.6
    out = _run(main, RefineStep(ExternalStep(v), RefineConfig(residual=True, alpha=a, momentum=True)), None)
    z, vel = v[:, 0], torch.zeros_like(v[:, 0])
    for t in range(1, NUM_LATENT):
        vel = a * vel + (1 - a) * (v[:, t] - z)
        z = z + vel
        torch.testing.assert_close(out.latents[:, t], z, atol=1e-6, rtol=0)
    assert not torch.allclose(out.latents[:, 2], a * out.latents[:, 1] + (1 - a) * v[:, 2])  # not the plain form


def test_residual_on_fed_back_hidden_states_uses_the_refined_input(trio) -> None:
    """Coconut: f(h(t-1)) is the model's output after reading the refined h(t-1), so refinement
    changes what the next step sees, and alpha = 0 is Coconut itself, bit for bit."""
    from latentreason.models.steps import HiddenStateStep

    main = trio[0]
    plain = _run(main, HiddenStateStep(), None)
    zero = _run(main, RefineStep(HiddenStateStep(), RefineConfig(residual=True, alpha=0.0)), None)
    assert torch.equal(plain.latents, zero.latents) and plain.tokens == zero.tokens
    half = _run(main, RefineStep(HiddenStateStep(), RefineConfig(residual=True, alpha=0.5)), None)
    torch.testing.assert_close(half.latents[:, 0], plain.latents[:, 0])
    # step 1 mixes h(0) with the model's output after h(0): that output is plain's latent 1
    torch.testing.assert_close(half.latents[:, 1], 0.5 * plain.latents[:, 0] + 0.5 * plain.latents[:, 1],
                               atol=1e-6, rtol=0)
    assert not torch.allclose(half.latents[:, 2], 0.5 * half.latents[:, 1] + 0.5 * plain.latents[:, 2], atol=1e-4)


@pytest.mark.parametrize("direction,search_steps", [("strong", 1), ("weak", 1), ("strong", 2)])
def test_contrastive_step_by_hand(trio, direction: str, search_steps: int) -> None:
    main, strong, weak = trio
    v, eta = _vectors(main), 40.0
    cfg = RefineConfig(contrastive=True, eta=eta, direction=direction, search_steps=search_steps)
    out = _run(main, RefineStep(ExternalStep(v), cfg), [strong, weak])
    dim, sign = v.shape[-1], 1.0 if direction == "strong" else -1.0
    prompts = _prompts(main)
    for row in range(len(TEXTS)):
        fed: list[torch.Tensor] = []
        for t in range(NUM_LATENT):
            z = v[row, t]
            for _ in range(search_steps):
                z = z + sign * 2 * eta / dim * (_alone(strong, prompts[row], [*fed, z]) - _alone(weak, prompts[row], [*fed, z]))
            torch.testing.assert_close(out.latents[row, t], z, atol=1e-5, rtol=0)
            fed.append(out.latents[row, t])
    moved = (out.latents - v).norm(dim=-1)
    assert bool((moved > 1e-3).all())  # the step did move every latent


def test_contrastive_first_order_by_hand(trio) -> None:
    main, strong, weak = trio
    v, eta, a = _vectors(main), 40.0, 0.4
    cfg = RefineConfig(residual=True, alpha=a, contrastive=True, eta=eta, order="contrastive-first")
    out = _run(main, RefineStep(ExternalStep(v), cfg), [strong, weak])
    prompts, c = _prompts(main), 2 * eta / v.shape[-1]
    for row in range(len(TEXTS)):
        fed: list[torch.Tensor] = []
        for t in range(NUM_LATENT):
            z = v[row, t] + c * (_alone(strong, prompts[row], [*fed, v[row, t]]) - _alone(weak, prompts[row], [*fed, v[row, t]]))
            z = z if t == 0 else a * fed[-1] + (1 - a) * z
            torch.testing.assert_close(out.latents[row, t], z, atol=1e-5, rtol=0)
            fed.append(out.latents[row, t])


def test_row_shifts_measure_each_operators_move_over_the_fed_latents(trio) -> None:
    """How far each operator moved a row's latents relative to their norm, by hand from the fed
    vectors, over the latents each row actually fed (rows stop at different steps, one at none)."""
    main, strong, weak = trio
    v, a, eta = _vectors(main), 0.4, 40.0
    lengths = torch.tensor(EXTERNAL_LENGTHS)
    step = RefineStep(ExternalStep(v, lengths=lengths), RefineConfig(residual=True, alpha=a, contrastive=True, eta=eta))
    out = _run(main, step, [strong, weak])
    shifts = step.row_shifts()
    assert set(shifts) == {"residual", "contrastive"}
    for row, n in enumerate(EXTERNAL_LENGTHS):
        res, con = [], []
        for t in range(n):
            mixed = v[row, 0] if t == 0 else a * out.latents[row, t - 1] + (1 - a) * v[row, t]
            res.append(float((mixed - v[row, t]).norm() / v[row, t].norm()))
            con.append(float((out.latents[row, t] - mixed).norm() / mixed.norm()))
        want_res = sum(res) / n if n else 0.0
        want_con = sum(con) / n if n else 0.0
        assert abs(float(shifts["residual"][row]) - want_res) < 1e-5
        assert abs(float(shifts["contrastive"][row]) - want_con) < 1e-5
    assert float(shifts["contrastive"][2]) > 1e-3 and float(shifts["residual"][2]) > 1e-3  # both moved something
    alone = RefineStep(ExternalStep(v), RefineConfig(residual=True, alpha=a))
    _run(main, alone, None)
    assert set(alone.row_shifts()) == {"residual"}  # an operator that is off reports nothing


@pytest.mark.parametrize("exact", [True, False])
def test_rows_that_stop_leave_the_references_and_nothing_changes(trio, exact: bool) -> None:
    """Rows that stopped reasoning step aside (rollout.compact), the references' rows with them:
    the same latents, answers and per-row operator moves as when every row steps to the end."""
    main, strong, weak = trio
    v, cfg = _vectors(main), RefineConfig(residual=True, alpha=0.4, contrastive=True, eta=40.0)
    outs, shifts = [], []
    for compact in (False, True):
        step = RefineStep(ExternalStep(v, lengths=torch.tensor(EXTERNAL_LENGTHS)), cfg)
        outs.append(_run(main, step, [strong, weak], exact=exact, compact=compact))
        shifts.append(step.row_shifts())
    _assert_same(outs[1], outs[0])
    for op in ("residual", "contrastive"):
        torch.testing.assert_close(shifts[1][op], shifts[0][op], atol=1e-5, rtol=0)
    assert outs[1].timings["latent_row_steps"] < outs[0].timings["latent_row_steps"]
    assert outs[1].timings["reference_forwards"] == outs[0].timings["reference_forwards"]


class _AsksOnEvenSteps(LatentStep):
    """Asks the references at even latent steps only and moves the vector by what they answer, so a
    commit waits (pending) through each odd step: where rows step aside at odd steps, the waiting
    column must be narrowed with them."""

    compactable = True

    def __init__(self, inner: ExternalStep) -> None:
        self.inner, self.needs_hidden, self.asked = inner, inner.needs_hidden, []

    def select_rows(self, index: torch.Tensor) -> None:
        self.inner.select_rows(index)

    def __call__(self, ctx: StepContext) -> StepResult:
        result = self.inner(ctx)
        if ctx.step % 2:
            return result
        pending = len(ctx.references.pending)
        strong, weak = ctx.references.hidden(result.embeds, ctx.active, ctx.positions)
        self.asked.append((ctx.step, pending, ctx.active.shape[0]))
        return StepResult(result.embeds + 0.5 * (strong - weak), result.stop)


def test_rows_step_aside_while_a_reference_column_waits(trio) -> None:
    """Rows 1 and 3 stop at steps 0 and 1, row 0 at step 3: the batch narrows at steps 1 and 3, odd
    steps, when the references hold the column committed at the step before, not yet fed. The same
    latents and answers as without compaction, which depend on what the references answered."""
    main, strong, weak = trio
    v = _vectors(main)
    runs = {}
    for compact in (False, True):
        step = _AsksOnEvenSteps(ExternalStep(v, lengths=torch.tensor(EXTERNAL_LENGTHS)))
        runs[compact] = (_run(main, step, [strong, weak], compact=compact), step.asked)
    (full, asked_full), (compacted, asked) = runs[False], runs[True]
    _assert_same(compacted, full)
    assert not torch.allclose(full.latents[2], v[2])  # the references moved the vectors fed
    # asked at steps 0, 2, 4; from step 2 on two columns went together (the one held back, the new one);
    # the batch asked about shrank from 4 rows to 2 (narrowed at step 1) to 1 (at step 3)
    assert asked_full == [(0, 0, 4), (2, 2, 4), (4, 2, 4)]
    assert asked == [(0, 0, 4), (2, 2, 2), (4, 2, 1)]
    assert compacted.timings["latent_row_steps"] < full.timings["latent_row_steps"]


def test_same_reference_twice_changes_nothing(trio) -> None:
    main, strong, _ = trio
    v = _vectors(main)
    out = _run(main, RefineStep(ExternalStep(v), RefineConfig(contrastive=True, eta=100.0)), [strong, strong])
    assert torch.equal(out.latents, v)
    # compiled, one object twice would share one compiled step and cache (the second reset the first's)
    for refs in ([strong, strong], [main, strong]):
        with pytest.raises(ValueError, match="one object twice"):
            _run(main, RefineStep(ExternalStep(v), RefineConfig(contrastive=True, eta=100.0)), refs, compile=True)


def test_contrastive_without_references_is_a_clear_error(trio) -> None:
    main = trio[0]
    with pytest.raises(ValueError, match="needs reference models"):
        _run(main, RefineStep(ExternalStep(_vectors(main)), RefineConfig(contrastive=True)), None)


# ---- references from a training run, the eval path, no weight changes -------------------------


@pytest.fixture(scope="module")
def cot_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny CoT-SFT run that keeps its models every 3 steps (keep-3/, keep-6/)."""
    from latentreason.recipes import run_train

    tmp = tmp_path_factory.mktemp("refine")
    run = build_run_config(tiny_run(tmp, train={"keep_every": 3, "max_steps": 6}))
    return run_train(run)


def test_trainer_keeps_models_and_auto_finds_them(cot_run: Path) -> None:
    assert sorted(p.name for p in cot_run.glob("keep-*")) == ["keep-3", "keep-6"]
    strong, weak = auto_references(str(cot_run / "best"))
    assert (Path(strong).name, Path(weak).name) == ("keep-6", "keep-3")
    with pytest.raises(ValueError, match="train.keep_every"):
        auto_references(str(cot_run / "keep-3" / "missing"))


def test_auto_references_skip_the_latent_runs_own_kept_models(cot_run: Path, tmp_path: Path) -> None:
    """A latent run that also kept models (train.keep_every) started from the CoT-SFT run: the references
    are the CoT run's checkpoints, not the latent run's (which would include the refined model)."""
    import shutil

    from latentreason.config import RUN_CONFIG_FILE

    latent = tmp_path / "coconut"
    shutil.copytree(cot_run, latent)
    for cfg_file in latent.rglob(RUN_CONFIG_FILE):
        saved = yaml.safe_load(cfg_file.read_text())
        saved["method"]["name"] = "coconut"
        saved["train"]["init_from"] = str(cot_run / "best")
        cfg_file.write_text(yaml.safe_dump(saved))
    assert len(list(latent.glob("keep-*"))) == 2
    strong, weak = auto_references(str(latent / "best"))
    assert (Path(strong), Path(weak)) == (cot_run / "keep-6", cot_run / "keep-3")


def _digest(models: list[torch.nn.Module]) -> list[str]:
    return [hashlib.sha256(b"".join(t.detach().cpu().numpy().tobytes() for t in m.state_dict().values())).hexdigest()
            for m in models]


def test_refinement_changes_no_weight_and_changes_answers(cot_run: Path, tmp_path: Path) -> None:
    from latentreason.config import load_run_config
    from latentreason.recipes import build_method, run_eval

    over = [f"model.name_or_path={cot_run / 'best'}", "method.name=coconut", "method.eval_thoughts=4",
            "eval.limit=32", "eval.split=valid"]
    base_run = load_run_config(None, [*over, f"eval.output_dir={tmp_path / 'base'}"], saved_base=True)
    refined = load_run_config(None, [*over, f"eval.output_dir={tmp_path / 'refined'}", "refine.residual=true",
                                     "refine.alpha=0.5", "refine.contrastive=true", "refine.eta=500"], saved_base=True)
    method = build_method(refined)
    refs = load_references(method)
    before = _digest([method.loaded.model, *refs])
    summary = run_eval(refined, method=method)
    assert _digest([method.loaded.model, *refs]) == before
    assert summary["refine"]["contrastive"] is True
    assert summary["seconds_by_phase"]["reference_prefill"] > 0  # the references read the prompts
    base = run_eval(base_run, method=method)
    assert "reference_prefill" not in base["seconds_by_phase"]
    rows = lambda p: [json.loads(x)["output"] for x in (p / "predictions.jsonl").read_text().splitlines()]  # noqa: E731
    assert rows(tmp_path / "base") != rows(tmp_path / "refined")
    assert "refine" not in base
    # a reference retrained in place (same folder, new weights) does not resume the old rows
    weak = Path(auto_references(str(cot_run / "best"))[1]) / "model.safetensors"
    weak.write_bytes(weak.read_bytes())  # new file, same bytes: as a retrained model would be
    os.utime(weak, ns=(weak.stat().st_atime_ns, weak.stat().st_mtime_ns + 10**9))
    with pytest.raises(ValueError, match=r"differs in refine.references"):
        run_eval(refined, method=method)


def test_fingerprint_holds_refinement_only_when_on() -> None:
    run = build_run_config({})
    from latentreason.config import to_dict

    assert not any(k.startswith("refine.") for k in eval_fingerprint(to_dict(run)))
    on = build_run_config({"refine": {"residual": True, "sweep_limit": 10}})
    keys = eval_fingerprint(to_dict(on))
    assert keys["refine.residual"] is True and keys["refine.alpha"] == 0.5 and "refine.sweep_limit" not in keys


def test_refine_verb_sweeps_on_valid_and_reports_once(cot_run: Path, tmp_path: Path) -> None:
    from latentreason.cli import main

    out = tmp_path / "refine"
    rc = main(["refine", f"model.name_or_path={cot_run / 'best'}", "method.name=coconut", "method.eval_thoughts=3",
               "refine.sweep_alphas=[0,0.5]", "refine.sweep_etas=[0,200]", "refine.sweep_limit=16",
               "eval.split=test", "eval.limit=16", f"eval.output_dir={out}"])
    assert rc == 0
    sweep = json.loads((out / "sweep.json").read_text())
    assert [(c["alpha"], c["eta"]) for c in sweep["cells"]] == [(0, 0), (0, 200), (0.5, 0), (0.5, 200)]
    assert all(c["n"] == 16 for c in sweep["cells"])
    shifts = {(c["alpha"], c["eta"]): c["refine_shift"] for c in sweep["cells"]}
    assert shifts[(0, 0)] == {} and set(shifts[(0.5, 200)]) == {"residual", "contrastive"}
    assert shifts[(0, 200)]["contrastive"] > 0 and shifts[(0.5, 0)]["residual"] > 0
    assert (out / "sweep.png").stat().st_size > 1000
    for cell in sweep["cells"]:
        config = json.loads((out / "sweep" / f"alpha{cell['alpha']:g}-eta{cell['eta']:g}" / "eval_config.json").read_text())
        assert config["eval.split"] == "valid"
    summary = json.loads((out / "refine_summary.json").read_text())
    assert summary["report_split"] == "test"
    report = summary["report"]
    assert set(report) == {"refined", "base", "residual", "contrastive", "both"}
    assert (report["base"]["alpha"], report["base"]["eta"]) == (0, 0)
    assert (report["residual"]["alpha"], report["residual"]["eta"]) == (0.5, 0)
    assert (report["both"]["alpha"], report["both"]["eta"]) == (0.5, 200)
    best = max(sweep["cells"], key=lambda c: c["accuracy"])
    assert (report["refined"]["alpha"], report["refined"]["eta"]) == (best["alpha"], best["eta"])
    for pick in report.values():
        assert pick["n"] == 16
        config = json.loads((Path(pick["output_dir"]) / "eval_config.json").read_text())
        assert config["eval.split"] == "test"
        assert config.get("refine.alpha", 0) == pick["alpha"]


def test_refine_step_never_waits_for_the_device() -> None:
    """The steps' rule (models/steps.py): no host sync, so a compiled rollout's queue never stalls."""
    from latentreason.models.steps import MixtureStep
    from tests.models.host_syncs import HostSyncs

    class FakeReferences:
        def hidden(self, z: torch.Tensor, active: torch.Tensor, positions: torch.Tensor) -> list[torch.Tensor]:
            return [z * 2, z + 1]

    step = RefineStep(MixtureStep(top_k=4), RefineConfig(residual=True, momentum=True, contrastive=True, eta=3.0,
                                                         search_steps=2))
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(12, 5, generator=g)
    for t in range(4):
        ctx = StepContext(t, None, torch.randn(3, 12, generator=g), emb, torch.tensor([True, t < 2, True]),
                          torch.full((3,), 7 + t), FakeReferences())
        with HostSyncs(forbid=True):
            out = step(ctx)
        assert out.embeds.shape == (3, 5)


def test_refine_finds_its_references_before_the_sweep_runs(tmp_path: Path) -> None:
    """No references to be found: refused before the first sweep cell (it evaluated the whole
    (0, 0) cell, 200 questions by default, first)."""
    from latentreason.config import load_run_config
    from latentreason.methods.refine import run_refine
    from latentreason.recipes import build_method

    folder = tmp_path / "model"
    build_method(load_run_config(base=tiny_run(tmp_path))).save_pretrained(folder)
    run = load_run_config(overrides=[f"model.name_or_path={folder}", "method.name=coconut", "method.eval_thoughts=2",
                                     f"eval.output_dir={tmp_path / 'refine'}", "refine.sweep_limit=4"], saved_base=True)
    with pytest.raises(ValueError, match="train.keep_every"):
        run_refine(run)
    assert not (tmp_path / "refine" / "sweep").exists()
