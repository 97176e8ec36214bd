#!/usr/bin/env bash
# The GPU checks of one device lease, in one call (see benchmarks/RESULTS.md for what they gave):
#   bash benchmarks/gpu_check.sh OUT_DIR
# 1. `latentreason eval` on the GPU (what it reports as its device), 2. the rollout benchmark in
# bf16 (SmolLM2 shape, batch 1/32/128), 3. float32 identity of the four decoders, 4. the default
# test suite, 5. the Llama-3.2-1B shape with what time is left. Each part has its own time limit.
set -u
OUT="${1:-/tmp/gpu-check}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q -e . --no-deps --no-build-isolation 2>&1 | tail -2
python3 -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, torch.cuda.get_device_name(0))" | tee "$OUT/versions.txt"
timeout 60 python3 -m latentreason.cli eval model.name_or_path=tiny-llama-l2-d64 data.task=arith eval.limit=64 \
  eval.output_dir=/tmp/ev train.output_dir=/tmp/run > "$OUT/eval_device.txt" 2>&1; echo "eval rc $?"; tail -16 "$OUT/eval_device.txt"
timeout 270 python3 benchmarks/bench_rollout_gpu.py --models smollm2-135m-shape --batch-sizes 1 32 128 --reps 3 \
  --out "$OUT/rollout_gpu.json" 2>&1 | grep -v Warning | tee "$OUT/bench_bf16.txt" | tail -20
timeout 60 python3 benchmarks/bench_rollout_gpu.py --models smollm2-135m-shape --dtype float32 --batch-sizes 1 --new-tokens 32 \
  --reps 1 --no-latent --out "$OUT/rollout_gpu_fp32.json" 2>&1 | grep -v Warning | tail -6
timeout 100 python3 -m pytest -q -x -p no:cacheprovider -n 8 > "$OUT/pytest.txt" 2>&1; echo "pytest rc $?"; tail -5 "$OUT/pytest.txt"
timeout 60 python3 benchmarks/bench_rollout_gpu.py --models llama-3.2-1b-shape --batch-sizes 1 32 --reps 2 --no-latent \
  --out "$OUT/rollout_gpu_llama1b.json" 2>&1 | grep -v Warning | tail -8
