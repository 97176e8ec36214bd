"""Rollout speed against transformers' generate, eager and compiled, on random weights of real shapes.

    python benchmarks/bench_rollout_gpu.py          # a GPU if there is one: bf16, both shapes, batch 1 32 128
    python benchmarks/bench_rollout_gpu.py --device cpu --dtype float32 --models smollm2-135m-shape \\
        --batch-sizes 1 8 --new-tokens 32 --reps 3 --out /tmp/rollout_cpu.json            # a CPU smoke run

Nothing is downloaded: the models are Llama configs built here with random weights (seeded), of
SmolLM2-135M's shape (``smollm2-135m-shape``: hidden 576, 30 layers, 9/3 heads, vocabulary 49152)
and Llama-3.2-1B's (``llama-3.2-1b-shape``: hidden 2048, 16 layers, 32/8 heads, vocabulary
128256), both with tied embeddings. No token ends a sequence (the configs have no eos; the rollout
gets ``eos_ids=[-1]``), so every method decodes exactly ``--new-tokens`` tokens, greedily, after
the same random ``--prompt-tokens``-token prompts (one per row, no padding).

Rows (``benchmarks/results/rollout_gpu.json``, or ``--out``), all measured in this one process:

- ``ms_per_token``, methods ``rollout-eager`` (``rollout.compile=false``), ``rollout-compiled``
  (``rollout.compile=true``: the one-column step compiled, CUDA graphs on a GPU),
  ``hf-generate`` (``model.generate``, its default dynamic cache) and ``hf-generate-static``
  (``cache_implementation="static"``: transformers compiles its one-token forward on a GPU, not on
  a CPU): wall time of one batch (prefill + every token; the device synchronised before and
  after) over ``--new-tokens``. ``tokens_per_s`` = batch x tokens / wall time. ``token_match``:
  the fraction of output tokens equal to ``rollout-eager``'s (in float32 all four should agree,
  ``identical``; in bf16 rounding flips near-ties, and a flip changes the rest of that row).
- ``latent_step_over_decode_step``, methods ``hidden`` (Coconut) and ``mixture`` (top-k 10
  mixture), for each ``mode`` (eager, compiled): one latent step's time over one decode step's,
  both with the prefill and fixed costs cancelled: latent = (T(K latent steps, 1 token) - T(1
  token)) / K, decode = (T(N tokens) - T(1 token)) / (N - 1), with K = N - 1 = ``--new-tokens`` - 1.
  A latent step includes the rollout's bookkeeping (the kept top-k distribution, masks).
  ``--compile-step`` adds mode ``compiled-step`` for ``mixture``: the compiled rollout with the
  step function itself also compiled (``torch.compile``, default mode: its ops fused into a few
  kernels), to measure what fusing a step's own ops would save.

Each value is the median over ``--reps`` repetitions, after one warm-up repetition (compilation
and CUDA-graph recording happen there; it is not timed); within a repetition the methods run in
an order that rotates, so drift on a shared machine spreads evenly.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from typing import Callable

import torch
from common import write_results  # also puts src/ on sys.path
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel

from latentreason.models.rollout import RolloutConfig, clear_compiled, rollout
from latentreason.models.steps import HiddenStateStep, LatentStep, MixtureStep, StepContext, StepResult

SHAPES = {
    "smollm2-135m-shape": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                               num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0,
                               max_position_embeddings=8192),
    "llama-3.2-1b-shape": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                               num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                               max_position_embeddings=131072),
}
METHODS = ["rollout-eager", "rollout-compiled", "hf-generate", "hf-generate-static"]
PAD = 0


def build(name: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> PreTrainedModel:
    config = LlamaConfig(**SHAPES[name], tie_word_embeddings=True, bos_token_id=None, eos_token_id=None,
                         pad_token_id=PAD, attn_implementation="sdpa")
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    gen = model.generation_config
    gen.eos_token_id, gen.bos_token_id, gen.pad_token_id = None, None, PAD
    gen.do_sample, gen.temperature, gen.top_p, gen.top_k = False, None, None, None
    return model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], list[list[int]]], device: torch.device) -> tuple[float, list[list[int]]]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


class _CompiledCall(LatentStep):
    """A step whose own ops run compiled (``--compile-step``): an experiment, not a rollout option."""

    def __init__(self, step: LatentStep) -> None:
        self.inner, self.needs_hidden, self.stop_token_id = step, step.needs_hidden, step.stop_token_id
        self.fn = torch.compile(step.__call__, dynamic=False)

    def validate(self, batch: int, num_steps: int, dim: int) -> None:
        self.inner.validate(batch, num_steps, dim)

    def __call__(self, ctx: StepContext) -> StepResult:
        return self.fn(ctx)


def jobs_for(model: PreTrainedModel, ids: torch.Tensor, new_tokens: int, latent: bool,
             compile_step: bool = False) -> dict[str, Callable[[], list[list[int]]]]:
    """Every timed call for one batch: the four decoders, and the latent-step runs of each rollout mode."""
    prompts = ids.tolist()
    width = ids.shape[1]
    mask = torch.ones_like(ids)

    def ours(step: LatentStep | None, k: int, tokens: int, compile: bool) -> Callable[[], list[list[int]]]:
        cfg = RolloutConfig(num_latent_steps=k, max_new_tokens=tokens, feed_eot=False, compile=compile)
        return lambda: rollout(model, prompts, step, cfg, eos_ids=[-1], pad_id=PAD).tokens

    def theirs(**kw: object) -> Callable[[], list[list[int]]]:
        return lambda: model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                                      pad_token_id=PAD, **kw)[:, width:].tolist()

    jobs = {
        "rollout-eager": ours(None, 0, new_tokens, False),
        "rollout-compiled": ours(None, 0, new_tokens, True),
        "hf-generate": theirs(),
        "hf-generate-static": theirs(cache_implementation="static"),
    }
    if latent:
        k = new_tokens - 1
        for mode, compile in (("eager", False), ("compiled", True)):
            jobs[f"{mode}:one-token"] = ours(None, 0, 1, compile)
            jobs[f"{mode}:hidden"] = ours(HiddenStateStep(), k, 1, compile)
            jobs[f"{mode}:mixture"] = ours(MixtureStep(top_k=10), k, 1, compile)
        if compile_step:
            jobs["compiled-step:mixture"] = ours(_CompiledCall(MixtureStep(top_k=10)), k, 1, True)
    return jobs


def measure(name: str, model: PreTrainedModel, batch: int, args: argparse.Namespace, device: torch.device) -> list[dict]:
    g = torch.Generator().manual_seed(batch)
    vocab = model.config.vocab_size
    ids = torch.randint(1, vocab, (batch, args.prompt_tokens), generator=g).to(device)
    jobs = jobs_for(model, ids, args.new_tokens, latent=not args.no_latent, compile_step=args.compile_step)
    order = list(jobs)
    times: dict[str, list[float]] = {job: [] for job in jobs}
    outputs: dict[str, list[list[int]]] = {}
    with torch.inference_mode():
        for rep in range(args.reps + 1):
            shift = rep % len(order)
            for job in order[shift:] + order[:shift]:
                seconds, out = timed(jobs[job], device)
                if rep == 0:
                    outputs[job] = out
                    print(f"  {name} batch {batch} warm-up {job}: {seconds:.2f}s", flush=True)
                else:
                    times[job].append(seconds)
            if rep:
                print(f"  {name} batch {batch} rep {rep}: " + ", ".join(
                    f"{m} {1000 * times[m][-1] / args.new_tokens:.2f}ms/tok" for m in METHODS), flush=True)
    base = {"task": "-", "model": name, "batch_size": batch, "device": device.type, "dtype": args.dtype_name,
            "n": args.reps, "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens}
    reference = outputs["rollout-eager"]
    total = sum(len(row) for row in reference)
    rows = []
    for method in METHODS:
        same = sum(a == b for ra, rb in zip(outputs[method], reference) for a, b in zip(ra, rb))
        wall = statistics.median(times[method])
        rows.append({**base, "method": method, "metric": "ms_per_token", "value": round(1000 * wall / args.new_tokens, 3),
                     "tokens_per_s": round(batch * args.new_tokens / wall, 1), "token_match": round(same / total, 4),
                     "identical": outputs[method] == reference,
                     "runs_ms_per_token": [round(1000 * t / args.new_tokens, 3) for t in times[method]]})
        if args.dtype_name == "float32" and outputs[method] != reference:
            print(f"WARNING: {method} differs from rollout-eager in float32 ({same}/{total} tokens equal)", flush=True)
    if not args.no_latent:
        k = args.new_tokens - 1
        modes = [("eager", "rollout-eager", "eager"), ("compiled", "rollout-compiled", "compiled")]
        if args.compile_step:
            modes.append(("compiled-step", "rollout-compiled", "compiled"))
        for mode, prefix, base_mode in modes:
            one = times[f"{base_mode}:one-token"]
            decode = [(t - o) / k for t, o in zip(times[prefix], one)]
            for step in ("hidden", "mixture"):
                if f"{mode}:{step}" not in times:
                    continue
                latent = [(t - o) / k for t, o in zip(times[f"{mode}:{step}"], one)]
                ratios = [lat / dec for lat, dec in zip(latent, decode)]
                rows.append({**base, "method": step, "metric": "latent_step_over_decode_step", "mode": mode,
                             "value": round(statistics.median(ratios), 3),
                             "latent_ms": round(1000 * statistics.median(latent), 3),
                             "decode_ms": round(1000 * statistics.median(decode), 3),
                             "ratio_min": round(min(ratios), 3), "ratio_max": round(max(ratios), 3),
                             "num_latent_steps": k})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cpu")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                    help="auto: bfloat16 on a GPU, float32 on a CPU")
    ap.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32, 128])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions (after one warm-up)")
    ap.add_argument("--no-latent", action="store_true", help="skip the latent-step / decode-step ratios")
    ap.add_argument("--compile-step", action="store_true",
                    help="also time the mixture step with its own ops compiled (mode compiled-step)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--out", default=None, help="result file (default: benchmarks/results/rollout_gpu.json)")
    args = ap.parse_args()
    if args.new_tokens < 2:
        ap.error("--new-tokens must be >= 2")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    args.dtype_name = args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, args.dtype_name)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device {device}, dtype {args.dtype_name}, threads {torch.get_num_threads()}", flush=True)

    rows: list[dict] = []
    command = "python benchmarks/bench_rollout_gpu.py " + " ".join(a for a in sys.argv[1:])
    for name in args.models:
        model = build(name, device, dtype)
        for batch in args.batch_sizes:
            rows += measure(name, model, batch, args, device)
            write_results("rollout_gpu", command, rows, path=args.out)  # a run stopped later keeps these
        clear_compiled(model)
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    path = write_results("rollout_gpu", command, rows, path=args.out)
    for row in rows:
        if row["metric"] == "ms_per_token":
            print(f"{row['model']:20} batch {row['batch_size']:4} {row['method']:19} {row['value']:9.3f} ms/token "
                  f"{row['tokens_per_s']:10.1f} tok/s  match {row['token_match']}")
        else:
            print(f"{row['model']:20} batch {row['batch_size']:4} {row['method']:8} ({row['mode']:8}) latent/decode "
                  f"{row['value']:.3f} ({row['latent_ms']} / {row['decode_ms']} ms)")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
