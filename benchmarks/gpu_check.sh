#!/usr/bin/env bash
# The GPU checks of one device lease, in one call (see benchmarks/RESULTS.md for what they gave):
#   bash benchmarks/gpu_check.sh OUT_DIR
# Part 1, alone on the machine (batch 1 is launch-bound: CPU load would disturb it):
#   the rollout benchmark in bf16, SmolLM2 shape, batch 1 with the latent-step ratios (and the
#   mixture step with its own ops compiled); the Llama-3.2-1B shape at batch 128.
# Part 2, side by side (correctness, not timing): float32 identity of the four decoders; the
#   default suite as CI runs it (models on the CPU); the demo on the GPU; CoT-SFT then Latent-SFT
#   stage 1 under `accelerate launch` with the FSDP config (one process; the ZeRO-2 one too if
#   deepspeed is installed), the CoT model evaluated on the GPU; tests/test_gpu.py (compiled =
#   eager on CUDA for every step kind, train and eval on the GPU). Each part has its own time
#   limit; logs and result files land in OUT_DIR.
# PARTS picks parts (default all but cudasuite): bench (part 1), fp32, suite, demo, scale, gputests,
# cudasuite (the whole suite with models on the GPU: most tests build their inputs on the CPU); e.g.
#   PARTS="suite scale gputests" bash benchmarks/gpu_check.sh OUT_DIR
set -u
PARTS="${PARTS:-bench fp32 suite demo scale gputests}"
on() { [[ " $PARTS " == *" $1 "* ]]; }
OUT="${1:-/tmp/gpu-check}"; mkdir -p "$OUT"
L=/tmp/gpulogs; mkdir -p "$L"  # folded into OUT/logs.tgz at the end (few files come back)
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
B="python3 benchmarks/bench_rollout_gpu.py"
python3 -m pip install -q -e . --no-deps --no-build-isolation > "$L/pip.txt" 2>&1
python3 -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__,
'accelerate', accelerate.__version__, torch.cuda.get_device_name(0))" > "$L/versions.txt" 2>&1
python3 -c "import deepspeed; print('deepspeed', deepspeed.__version__)" >> "$L/versions.txt" 2>&1
cat "$L/versions.txt"

echo "== part 1 $(date +%T)"
if on bench; then
timeout 150 $B --models smollm2-135m-shape --batch-sizes 1 --reps 2 --compile-step --out "$OUT/rollout_gpu_b1.json" \
  > "$L/bench_b1.log" 2>&1; echo "b1 rc $?"; grep -v Warning "$L/bench_b1.log" | tail -9
timeout 120 $B --models llama-3.2-1b-shape --batch-sizes 128 --reps 1 --no-latent --out "$OUT/rollout_gpu_llama_b128.json" \
  > "$L/bench_llama.log" 2>&1; echo "llama rc $?"; grep -v Warning "$L/bench_llama.log" | tail -4
fi

echo "== part 2 $(date +%T)"
on suite && (OMP_NUM_THREADS=1 timeout 220 python3 -m pytest -q -p no:cacheprovider -n 6 > "$L/pytest_cpu.txt" 2>&1
 echo "pytest-cpu rc $?" >> "$L/pytest_cpu.txt") &
on cudasuite && (LATENTREASON_DEVICE=cuda OMP_NUM_THREADS=1 timeout 230 python3 -m pytest -q -p no:cacheprovider -n 4 --timeout 150 \
  > "$L/pytest_cuda.txt" 2>&1; echo "pytest-cuda rc $?" >> "$L/pytest_cuda.txt") &
on fp32 && (timeout 150 $B --models smollm2-135m-shape --dtype float32 --batch-sizes 1 --new-tokens 32 --reps 1 --no-latent \
  --out "$OUT/rollout_gpu_fp32.json" > "$L/bench_fp32.log" 2>&1; echo "fp32 rc $?" >> "$L/bench_fp32.log") &
on demo && (timeout 190 python3 -m latentreason.cli demo --no-latent-sft --output-dir /tmp/demo > "$L/demo.log" 2>&1; echo "demo rc $?" >> "$L/demo.log"
 timeout 45 python3 -m latentreason.cli eval model.name_or_path=/tmp/demo/cot-sft/best rollout.compile=true \
   eval.output_dir=/tmp/demo/cot-sft/eval-compiled >> "$L/demo.log" 2>&1; echo "compiled eval rc $?" >> "$L/demo.log"
 tar czf "$OUT/demo.tgz" --exclude='*.safetensors' --exclude='*.pt' --exclude='*.bin' -C /tmp demo 2>/dev/null) &
on scale && (T=/tmp/scale; R=configs/latent_sft_arith_stage1.yaml; F=configs/accelerate/fsdp.yaml
 timeout 60 accelerate launch --config_file $F --num_processes 1 -m latentreason.cli train --config configs/cot_sft_arith.yaml \
   train.max_steps=100 train.output_dir=$T/cot train.eval_every=50 train.save_every=50 > "$L/scale.log" 2>&1
 echo "cot-fsdp rc $?" >> "$L/scale.log"
 timeout 40 python3 -m latentreason.cli eval model.name_or_path=$T/cot/best eval.limit=200 \
   eval.output_dir=$T/cot/eval-best >> "$L/scale.log" 2>&1; echo "cot eval rc $?" >> "$L/scale.log"
 S="method.steps_per_step=20 train.max_steps=60 train.eval_every=10 train.save_every=20 train.init_from=$T/cot/best"
 timeout 90 accelerate launch --config_file $F --num_processes 1 -m latentreason.cli train \
   --config $R $S train.output_dir=$T/fsdp >> "$L/scale.log" 2>&1; echo "fsdp rc $?" >> "$L/scale.log"
 if [ -d .whl ] && ! python3 -c "import deepspeed" 2>/dev/null; then  # carried wheels (device README), kept apart
   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/ds .whl/*.whl >> "$L/scale.log" 2>&1
   python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/ds .whl/deepspeed-*.tar.gz \
     >> "$L/scale.log" 2>&1; export PYTHONPATH=/tmp/ds; fi
 if python3 -c "import deepspeed" 2>/dev/null; then
   timeout 90 accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml --num_processes 1 -m latentreason.cli \
     train --config $R $S train.output_dir=$T/ds >> "$L/scale.log" 2>&1; echo "deepspeed rc $?" >> "$L/scale.log"
 else echo "deepspeed: not installed" >> "$L/scale.log"; fi
 find $T -maxdepth 3 -name "*.json*" | sort > "$L/scale_files.txt"
 tar czf "$OUT/scale.tgz" --exclude='*.safetensors' --exclude='*.pt' --exclude='*.bin' -C /tmp scale 2>/dev/null) &
on gputests && (timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py > "$L/pytest_gpu.txt" 2>&1
 echo "pytest-gpu rc $?" >> "$L/pytest_gpu.txt") &
wait
echo "== done $(date +%T)"
for f in pytest_cpu pytest_cuda pytest_gpu; do [ -f "$L/$f.txt" ] && { echo "-- $f"; grep -E "^(FAILED|ERROR)" "$L/$f.txt" | head -12; tail -2 "$L/$f.txt"; }; done
[ -f "$L/bench_fp32.log" ] && grep -v Warning "$L/bench_fp32.log" | tail -6
[ -f "$L/demo.log" ] && tail -3 "$L/demo.log"
[ -f "$L/scale.log" ] && grep -E "rc |deepspeed|FSDP|fsdp|Error|trained" "$L/scale.log" | tail -12
tar czf "$OUT/logs.tgz" -C /tmp gpulogs
