#!/usr/bin/env bash
# One GPU call, several stages: bash benchmarks/gpu_session.sh STAGE [STAGE ...]
#   setup    install the plugin (entry points), build SmolLM2 HF + DMS fields
#   kernels  kernel tests at real shapes (native Triton)
#   correct  vllm.LLM + dms_fp8 vs the exact reference on SmolLM2 (and eager vs graphs)
#   bench-llama / bench-qwen  side-by-side speed benchmark on the synthetic checkpoints
# Logs and results go to $OUT. Expects .gpu/ staged as in shared/gpu/README.md.
set -uo pipefail
export VLLM_DMS_TEXT_DIR=$PWD/.gpu/texts VLLM_DMS_CACHE=$HOME/.cache/vllm_dms
export VLLM_DMS_COMMIT=${VLLM_DMS_COMMIT:-unknown}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
SMOL=$HOME/models/smollm2-dms
for stage in "$@"; do
  echo "=== $stage $(date +%T)"
  case $stage in
    setup)
      python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
      [ -d $HOME/models/smollm2 ] || python3 .gpu/make_smollm2_hf.py $HOME/models/smollm2 $HOME/models 2>&1 | tail -2
      python3 -c "from vllm_dms.checkpoints import add_dms_fields as a; print(a('$HOME/models/smollm2', '$SMOL', window=64))"
      python3 -c "import vllm, vllm_dms; print('vllm', vllm.__version__)" ;;
    kernels)
      python3 -m pytest -q -x tests/kernels 2>&1 | tee $OUT/kernels.log | tail -15 ;;
    correct)
      python3 benchmarks/correctness.py --model $SMOL --name smollm2-135m-dms-w64 \
        --out $OUT/correctness.json 2>&1 | tee $OUT/correct.log | grep -v "^INFO\|^WARNING" | tail -40 ;;
    bench-llama)
      python3 benchmarks/bench_speed.py --model .gpu/ckpt/llama-3.2-1b-dms-cr8 --name llama-3.2-1b \
        --out-dir $OUT --conc ${CONC:-1 8 32} --engines ${ENGINES:-vllm-bf16 vllm-fp8 dms_fp8} 2>&1 | tee $OUT/bench-llama.log | tail -30 ;;
    bench-qwen)
      python3 benchmarks/bench_speed.py --model .gpu/ckpt/qwen3-8b-dms-cr8 --name qwen3-8b \
        --out-dir $OUT --conc ${CONC:-1 8 32} --engines ${ENGINES:-vllm-bf16 vllm-fp8 dms_fp8} 2>&1 | tee $OUT/bench-qwen.log | tail -30 ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
