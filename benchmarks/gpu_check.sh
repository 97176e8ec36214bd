#!/usr/bin/env bash
# The GPU checks of one device lease, in one call (see benchmarks/RESULTS.md for what they gave):
#   bash benchmarks/gpu_check.sh OUT_DIR
# 1. the rollout benchmark in bf16, SmolLM2 shape: batch 1 with the latent-step ratios, then batch
# 32 and 128; 2. float32 identity of the four decoders, with the default test suite (on the CPU:
# the suite sets LATENTREASON_DEVICE=cpu) running beside it on 6 of the 16 cores; 3. the
# Llama-3.2-1B shape at batch 1 and 128. Each part has its own time limit and its own result file.
set -u
OUT="${1:-/tmp/gpu-check}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
B="python3 benchmarks/bench_rollout_gpu.py"
python3 -m pip install -q -e . --no-deps --no-build-isolation 2>&1 | tail -2
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name(0))" | tee "$OUT/versions.txt"
timeout 150 $B --models smollm2-135m-shape --batch-sizes 1 --reps 3 --out "$OUT/rollout_gpu_b1.json" 2>&1 | grep -v Warning | tail -8
timeout 200 $B --models smollm2-135m-shape --batch-sizes 32 128 --reps 2 --no-latent --out "$OUT/rollout_gpu_b32_128.json" 2>&1 | grep -v Warning | tail -10
(timeout 140 python3 -m pytest -q -p no:cacheprovider -n 6 > "$OUT/pytest.txt" 2>&1; echo "pytest rc $?" >> "$OUT/pytest.txt") &
timeout 60 $B --models smollm2-135m-shape --dtype float32 --batch-sizes 1 --new-tokens 32 --reps 1 --no-latent \
  --out "$OUT/rollout_gpu_fp32.json" 2>&1 | grep -v Warning | tail -6
timeout 90 $B --models llama-3.2-1b-shape --batch-sizes 1 128 --reps 1 --no-latent --out "$OUT/rollout_gpu_llama1b.json" 2>&1 \
  | grep -v Warning | tail -8
wait
tail -4 "$OUT/pytest.txt"
