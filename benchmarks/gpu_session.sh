#!/usr/bin/env bash
# One GPU call, several stages: bash benchmarks/gpu_session.sh STAGE [STAGE ...]
# The whole gpu-marked test suite is three stages (JUnit XML + log each, under $OUT):
#   suite1    gpu kernel tests at real shapes, in parallel (no vLLM needed)
#   suite2    gpu engine tests (tests/reliability, or the files in $SUITE2_TESTS): one random
#             Llama built once, engines in
#             parallel (xdist workers; engines a test compares start together)
#   suite3    the gpu quality test through dms_fp8 (needs smollm2 first)
#   kernels   GPU kernel tests at real shapes (native Triton; no vLLM needed)
#   kbench    kernel timings vs dense SDPA (benchmarks/kernel_bench.py; no vLLM needed)
#   setup     install the plugin (entry points); unpack .gpu/pack/ckpt.tar.xz (ckpts + texts)
#   smollm2   build SmolLM2 HF + DMS fields (needs the GGUF staged)
#   correct-llama / correct-qwen  vllm.LLM + dms_fp8 vs the exact reference (engine weights)
#   correct-llama-v1              the same with VLLM_USE_V2_MODEL_RUNNER=0 (vLLM's V1 runner)
#   correct-llama-chunked         the same with --enable-chunked-prefill, 256-token chunks
#   quality-smollm2               vllm-dms eval through dms_fp8 (needs smollm2 first)
#   train-smollm2                 the DMS retrofit on the H200 (7 min cap), then both quality
#                                 paths on the new checkpoint (needs smollm2 first)
#   bench-llama / bench-qwen      side-by-side speed benchmark, decode profile at c=8
#   serve-llama                   vllm serve + vllm bench serve, dms_fp8 vs BF16
#   multiturn-llama               follow-up chat turns, --enable-prefix-caching off vs on
#   serve-prefix-llama            vllm bench serve, shared 4096-token prefix, caching off vs on
#   chunked-prefix-gpu            GPU tests: chunked prefill vs one-shot, 4K shared prefix
#   correct-chunked               correctness rows, 3 x 3000-token prompts: one-shot (with the
#                                 live-count gap analysis), chunk budgets 256 and 2048 vs it;
#                                 Llama then Qwen3 ($MODELS)
#   serve-workloads               issue 15: serve_bench --workload $WORKLOADS (default
#                                 decode-heavy) for BF16, FP8 and dms_fp8 on $MODEL (llama-3.2-1b)
#   serve-defaults                `vllm serve CKPT --kv-cache-dtype dms_fp8`, no other flag:
#                                 its start-up log line (what is on by default)
# Each stage runs under `timeout $STAGE_S` (default 300). Logs and results go to $OUT.
set -uo pipefail
export VLLM_DMS_TEXT_DIR=$PWD/.gpu/texts VLLM_DMS_CACHE=$HOME/.cache/vllm_dms
export VLLM_DMS_COMMIT=${VLLM_DMS_COMMIT:-unknown}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
# an ignored path a call does not carry is removed on the device: re-extract the pack each call
[ -d .gpu/ckpt ] || [ ! -f .gpu/pack/ckpt.tar.xz ] || tar -xJf .gpu/pack/ckpt.tar.xz -C .gpu
SMOL=$HOME/models/smollm2-dms
RANDOM_CKPT=$HOME/ckpt/random-llama-dms
T="timeout ${STAGE_S:-300}"
random_ckpt() {  # the engine tests' checkpoint, built once per machine
  [ -f $RANDOM_CKPT/config.json ] || python3 benchmarks/make_random_llama.py $RANDOM_CKPT \
    .gpu/ckpt/llama-3.2-1b-dms-cr8 > /dev/null
}
suite() {  # suite NAME TIMEOUT PYTEST_ARGS...: JUnit + log under $OUT, engine logs tarred
  local name=$1 t=$2; shift 2
  rm -rf /tmp/gpu-logs-$name
  # per-test timeout (pytest-timeout): a hung test fails alone and the JUnit file is still written
  VLLM_DMS_GPU_LOG_DIR=/tmp/gpu-logs-$name PYTHONPATH=$PWD:${PYTHONPATH:-} timeout $t python3 -m pytest -q \
    -m gpu -p no:cacheprovider --timeout=${TEST_S:-300} --durations=20 --junitxml=$OUT/junit-gpu-$name.xml "$@" 2>&1 \
    | tee $OUT/$name.log | tail -25
  [ -d /tmp/gpu-logs-$name ] && tar -czf $OUT/engine-logs-$name.tgz -C /tmp gpu-logs-$name
  return 0
}
for stage in "$@"; do
  echo "=== $stage $(date +%T)"
  case $stage in
    suite1)
      # one CPU thread per worker: 14 workers x 16 torch threads starved the reference checks
      OMP_NUM_THREADS=1 suite suite1 ${SUITE_S:-540} tests/kernels -n ${NPROC:-14} ;;
    suite2)
      random_ckpt
      # the soak: server start + 120 s of aborts + drain, over the default per-test 300 s
      TEST_S=${TEST_S:-450} VLLM_DMS_TEST_CKPT=$RANDOM_CKPT VLLM_DMS_TOKENIZER_DIR=$RANDOM_CKPT \
        suite suite2 ${SUITE_S:-480} ${SUITE2_TESTS:-tests/reliability} -n ${NPROC:-6} --dist loadgroup ;;
    suite3)
      suite suite3 ${SUITE_S:-300} tests/test_quality_vllm.py ;;
    correct-chunked)
      for m in ${MODELS:-llama-3.2-1b qwen3-8b}; do
        base=$m-synthetic-cr8-p3000
        for c in ${CHUNKS:-0 256 2048}; do
          name=$base$([ $c = 0 ] || echo -chunk$c)
          extra=$([ $c = 0 ] && echo --gap || echo --chunk $c --one-shot $base)
          $T python3 benchmarks/correctness.py --model .gpu/ckpt/$m-dms-cr8 --name $name \
            --graphs --no-compile --prompts 3 --prompt-tokens 3000 $extra ${CORRECT_ARGS:-} \
            --out $OUT/correctness-chunked-$m.json 2>&1 | grep -v "^INFO\|^WARNING\|^(EngineCore" \
            | grep "first divergence\|match\|explained\|rows_\|decisions_\|Error\|error" | tail -14
        done
      done ;;
    serve-workloads)
      m=${MODEL:-llama-3.2-1b}
      $T python3 benchmarks/serve_bench.py --model .gpu/ckpt/$m-dms-cr8 --name $m \
        --gpu-util ${UTIL:-0.12} --engines vllm-bf16 vllm-fp8 dms_fp8 --out-dir $OUT \
        --workload ${WORKLOADS:-decode-heavy} 2>&1 | grep -v "^INFO\|^WARNING\|^(APIServer\|^(EngineCore" \
        | tail -20 ;;
    serve-defaults)
      random_ckpt
      python3 -m vllm.entrypoints.cli.main serve $RANDOM_CKPT --kv-cache-dtype dms_fp8 \
        --port 8123 > $OUT/serve-defaults.log 2>&1 &
      pid=$!
      python3 -c "
import time, requests
for _ in range(150):
    try:
        if requests.get('http://127.0.0.1:8123/health', timeout=1).ok: print('healthy'); break
    except requests.RequestException: pass
    time.sleep(1)"
      grep "vllm_dms:" $OUT/serve-defaults.log | tail -3
      kill -INT $pid; sleep 5; kill -9 $pid 2>/dev/null; true ;;
    kernels)
      PYTHONPATH=$PWD $T python3 -m pytest -q -m gpu tests/kernels -p no:cacheprovider -n 8 \
        2>&1 | tee $OUT/kernels.log | tail -15 ;;
    kbench)
      PYTHONPATH=$PWD $T python3 benchmarks/kernel_bench.py --out $OUT/kernel-bench.json ;;
    setup)
      python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
      python3 -c "import vllm, vllm_dms; print('vllm', vllm.__version__)" ;;
    smollm2)
      [ -d $HOME/models/smollm2 ] || python3 .gpu/make_smollm2_hf.py $HOME/models/smollm2 $HOME/models 2>&1 | tail -2
      # checkpoints.smollm2_base() reads its cache: the GGUF's package is not on this image
      mkdir -p $VLLM_DMS_CACHE && ln -sfn $HOME/models/smollm2 $VLLM_DMS_CACHE/smollm2-135m-instruct \
        && touch $HOME/models/smollm2/.vllm_dms_complete
      python3 -c "from vllm_dms.tools.checkpoints import add_dms_fields as a; print(a('$HOME/models/smollm2', '$SMOL', window=64))" ;;
    correct-llama|correct-qwen)
      m=$([ $stage = correct-llama ] && echo llama-3.2-1b || echo qwen3-8b)
      $T python3 benchmarks/correctness.py --model .gpu/ckpt/$m-dms-cr8 --name $m-synthetic-cr8 \
        --graphs --out $OUT/correctness-$m.json 2>&1 | grep -v "^INFO\|^WARNING\|^(EngineCore" \
        | tail -30 ;;
    correct-llama-v1)
      VLLM_USE_V2_MODEL_RUNNER=0 $T python3 benchmarks/correctness.py \
        --model .gpu/ckpt/llama-3.2-1b-dms-cr8 --name llama-3.2-1b-synthetic-cr8-v1-runner \
        --graphs --out $OUT/correctness-llama-3.2-1b.json 2>&1 | grep -v "^INFO\|^WARNING" | tail -30 ;;
    correct-llama-chunked)
      $T python3 benchmarks/correctness.py --model .gpu/ckpt/llama-3.2-1b-dms-cr8 \
        --name llama-3.2-1b-synthetic-cr8-chunked256 --graphs --chunk 256 \
        --out $OUT/correctness-llama-3.2-1b.json 2>&1 | grep -v "^INFO\|^WARNING" | tail -30 ;;
    quality-smollm2)
      $T python3 -m vllm_dms.tools.cli eval smollm2-trained --path dms_fp8 --windows 4 \
        --window-len 512 --tag smollm2-135m --top-k 100 --out $OUT/quality-smollm2-135m.json 2>&1 | grep -v "^INFO\|^WARNING" | tail -30 ;;
    train-smollm2)
      NEW=$HOME/models/smollm2-dms-gpu-cr8
      timeout 480 python3 -m vllm_dms.tools.training.train --base $HOME/models/smollm2 \
        --out $OUT/train-cr8 --build $NEW --max-minutes 7 --log $OUT/train-smollm2-cr8.jsonl \
        2>&1 | tail -20
      for path in reference dms_fp8; do
        $T python3 -m vllm_dms.tools.cli eval $NEW --base-dir $HOME/models/smollm2 --path $path \
          --windows 4 --window-len 512 --tag smollm2-135m --name smollm2-135m-dms-gpu-cr8 \
          --top-k 100 --out $OUT/quality-smollm2-135m.json 2>&1 | grep -v "^INFO\|^WARNING" | tail -8
      done ;;
    bench-llama|bench-qwen)
      m=$([ $stage = bench-llama ] && echo llama-3.2-1b || echo qwen3-8b)
      $T python3 benchmarks/bench_speed.py --model .gpu/ckpt/$m-dms-cr8 --name $m \
        --out-dir $OUT --conc ${CONC:-1 8 32} --profile-c 8 \
        --engines ${ENGINES:-vllm-bf16 vllm-fp8 dms_fp8} 2>&1 | tee $OUT/bench-$m.log | tail -60 ;;
    serve-llama)
      $T python3 benchmarks/serve_bench.py --model .gpu/ckpt/llama-3.2-1b-dms-cr8 \
        --name llama-3.2-1b --gpu-util ${UTIL:-0.12} --out-dir $OUT 2>&1 \
        | grep -v "^INFO\|^WARNING\|^(APIServer\|^(EngineCore" | tee $OUT/serve-llama.log | tail -40 ;;
    serve-prefix-llama)
      for pc in 0 1; do
        $T python3 benchmarks/serve_bench.py --model .gpu/ckpt/llama-3.2-1b-dms-cr8 \
          --name llama-3.2-1b --engines dms_fp8 --prefix-len 4096 --input-len 512 \
          --num-prompts 128 --concurrency 32 --prefix-caching $pc --gpu-util 0.2 \
          --out-dir $OUT 2>&1 | grep "^\[" | tail -3
      done ;;
    multiturn-llama)
      $T python3 benchmarks/multiturn_bench.py --model .gpu/ckpt/llama-3.2-1b-dms-cr8 \
        --name llama-3.2-1b --out-dir $OUT 2>&1 | grep -v "^INFO\|^WARNING\|^(APIServer\|^(EngineCore" \
        | tee $OUT/multiturn-llama.log | tail -20 ;;
    chunked-prefix-gpu)
      $T python3 -m pytest -q -m gpu tests/reliability/test_gpu_chunked_prefix.py \
        -p no:cacheprovider 2>&1 | tee $OUT/chunked-prefix-gpu.log | tail -15 ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
