#!/usr/bin/env bash
# One GPU call, several stages: bash benchmarks/gpu_session.sh STAGE [STAGE ...]
# The whole gpu-marked test suite is three stages (JUnit XML + log each, under $OUT):
#   suite1    gpu kernel tests at real shapes, in parallel (no vLLM needed)
#   suite2    gpu engine tests (tests/reliability, or the files in $SUITE2_TESTS): one random
#             Llama built once, engines in
#             parallel (xdist workers; engines a test compares start together)
#   suite3    the gpu quality test through dms_fp8 (needs smollm2 first)
#   kernels   GPU kernel tests at real shapes (native Triton; no vLLM needed)
#   kbench    kernel timings vs dense SDPA (benchmarks/kernel_bench.py; no vLLM needed),
#             decode at batches $DECODE_C (default 8 32 256), split and tile sweeps
#   setup     install the plugin (entry points); unpack .gpu/pack/ckpt.tar.xz (ckpts + texts)
#   smollm2   build SmolLM2 HF + DMS fields (needs the GGUF staged)
#   correct-llama / correct-qwen  vllm.LLM + dms_fp8 vs the exact reference (engine weights)
#   correct-llama-v1              the same with VLLM_USE_V2_MODEL_RUNNER=0 (vLLM's V1 runner)
#   correct-llama-chunked         the same with --enable-chunked-prefill, 256-token chunks
#   train-smollm2                 issue 18: one resumable slice (TRAIN_MIN, default 7.5 min) of
#                                 the LoRA retrofit (state in $HOME/train-smollm2-$TAG, kept between
#                                 calls); prints "train rc=0" when done (3: run it again); log,
#                                 chart and delta to $OUT (needs smollm2 first)
#   quality-smollm2               issue 18: vllm-dms eval at contexts 1024 and 4096: dms_fp8,
#                                 vLLM fp8 and bf16 KV on the base (floor), exact reference on
#                                 the GPU; $QCKPT (default: the checkpoint train-smollm2 built),
#                                 $QPATHS (default: all four)
#   passkey-smollm2               issue 18: passkey 2K-7K tokens, depths 10-90%: dms_fp8 (evict),
#                                 same checkpoint with kv auto (no-evict), plain base
#   bench-llama / bench-qwen      side-by-side speed benchmark, decode profile at c=8 ($CONC,
#                                 $CTX: max context rows are CTX=130944 / 40832 CONC="1 8")
#   serve-llama                   vllm serve + vllm bench serve, dms_fp8 vs BF16
#   multiturn-llama               follow-up chat turns, --enable-prefix-caching off vs on
#   serve-prefix-llama            vllm bench serve, shared 4096-token prefix, caching off vs on
#   chunked-prefix-gpu            GPU tests: chunked prefill vs one-shot, 4K shared prefix
#   correct-chunked               correctness rows, 3 x 3000-token prompts: one-shot (with the
#                                 live-count gap analysis), chunk budgets 256 and 2048 vs it;
#                                 Llama then Qwen3 ($MODELS)
#   serve-workloads               issue 15: serve_bench --workload $WORKLOADS (default
#                                 decode-heavy) for BF16, FP8 and dms_fp8 on $MODEL (llama-3.2-1b),
#                                 KV bytes $KVB for every engine (else --gpu-util $UTIL), $ENGINES
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
TAG=${TRAIN_TAG:-cr8-w256}  # names the trained delta, checkpoint and rows (say what TRAIN_ARGS changed)
TS=$HOME/train-smollm2-$TAG NEWCKPT=$HOME/models/smollm2-dms-gpu-$TAG
QCKPT=${QCKPT:-$NEWCKPT}
T="timeout ${STAGE_S:-300}"
random_ckpt() {  # the engine tests' checkpoint, built once per machine
  [ -f $RANDOM_CKPT/config.json ] || python3 benchmarks/make_random_llama.py $RANDOM_CKPT \
    .gpu/ckpt/llama-3.2-1b-dms-cr8 > /dev/null
}
ensure_trained() {  # the trained checkpoint, built from the latest delta if training paused
  # (no training on this machine: the package's delta of that TAG; cr8-w256 = the 2026-12-07 run)
  local d=$TS/out/dms_delta.safetensors
  [ -f $d ] || d=$PWD/vllm_dms/data/smollm2-135m-dms-$TAG.safetensors
  [ -f $QCKPT/config.json ] || [ "$QCKPT" != "$NEWCKPT" ] || PYTHONPATH=$PWD:${PYTHONPATH:-} python3 -c "
from vllm_dms.tools.training.delta import build_from_delta as b
print(b('$d', '$NEWCKPT', base_dir='$HOME/models/smollm2'))"
}
suite() {  # suite NAME TIMEOUT PYTEST_ARGS...: JUnit + log under $OUT, engine logs tarred
  local name=$1 t=$2; shift 2
  rm -rf /tmp/gpu-logs-$name
  # per-test timeout (pytest-timeout): a hung test fails alone and the JUnit file is still written;
  # the suite's own limit sends SIGINT first, so pytest still writes its summary and JUnit file
  VLLM_DMS_GPU_LOG_DIR=/tmp/gpu-logs-$name PYTHONPATH=$PWD:${PYTHONPATH:-} timeout -s INT -k 30 $t python3 -m pytest -q \
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
        --gpu-util ${UTIL:-0.12} ${KVB:+--kv-bytes $KVB} --engines ${ENGINES:-vllm-bf16 vllm-fp8 dms_fp8} --out-dir $OUT \
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
      PYTHONPATH=$PWD $T python3 benchmarks/kernel_bench.py --out $OUT/kernel-bench.json \
        --decode-c ${DECODE_C:-8 32 256} ;;
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
      ensure_trained
      for path in ${QPATHS:-dms_fp8 vllm-fp8 vllm-bf16 reference}; do
        name=$([ ${path#vllm-} = $path ] && echo ${QNAME:-smollm2-135m-dms-gpu-$TAG} || echo smollm2-135m)
        $T python3 -m vllm_dms.tools.cli eval $QCKPT --base-dir $HOME/models/smollm2 --path $path \
          --contexts 1024 4096 --windows 4 --top-k 100 --enforce-eager --name $name \
          --gpu-memory-utilization 0.3 --out $OUT/quality-smollm2-135m.json > $OUT/quality-$path.log 2>&1
        grep -v "^INFO\|^WARNING\|^(EngineCore" $OUT/quality-$path.log | tail -4
      done ;;
    passkey-smollm2)
      ensure_trained
      for mode in evict noevict base; do  # one engine per process: GPU memory is freed between
        $T python3 -m vllm_dms.tools.cli passkey $QCKPT --path dms_fp8 --base-dir \
          $HOME/models/smollm2 --modes $mode --enforce-eager --name ${QNAME:-smollm2-135m-dms-gpu-$TAG} \
          --out $OUT/passkey-smollm2-135m.json 2>&1 | grep "accuracy\|Error\|error" | tail -3
      done ;;
    train-smollm2)
      mkdir -p $TS/out
      # max-minutes stops before a step that would not fit; timeout only if a step hangs
      timeout ${TRAIN_S:-570} python3 -m vllm_dms.tools.training.train --base $HOME/models/smollm2 \
        --out $TS/out --state $TS/state --log $TS/train-smollm2.jsonl --max-minutes ${TRAIN_MIN:-7.5} \
        --micro-batch ${MICRO:-4} --chart $OUT/train-smollm2.png --build $NEWCKPT ${TRAIN_ARGS:-} \
        > $TS/stage.log 2>&1
      echo "train rc=$? (0: done, 3: paused, run train-smollm2 again)"
      grep -v "^INFO\|^WARNING" $TS/stage.log | tail -22
      cp $TS/train-smollm2.jsonl $OUT/ && tail -1 $TS/train-smollm2.jsonl | cut -c1-400
      cp $TS/out/dms_delta.safetensors $OUT/smollm2-135m-dms-$TAG.safetensors ;;
    bench-llama|bench-qwen)
      m=$([ $stage = bench-llama ] && echo llama-3.2-1b || echo qwen3-8b)
      $T python3 benchmarks/bench_speed.py --model .gpu/ckpt/$m-dms-cr8 --name $m \
        --out-dir $OUT --conc ${CONC:-1 8 32} --profile-c ${PROFILE_C:-8} --ctx ${CTX:-8192} \
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
