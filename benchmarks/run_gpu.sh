#!/usr/bin/env bash
# Every GPU benchmark of gqa-serve plus the peer baselines, in ONE device-tool call (benchmarks/README.md
# gives the exact call). Each step is time-boxed so the whole run ends inside BUDGET seconds (default 550,
# under the tool's 600 s command limit); each step writes JSON into a scratch folder, and $OUT receives
# three files only (the tool brings back at most 8):
#   $OUT/summary.json   every step's JSON merged, plus rc and seconds per step
#   $OUT/run_log.txt    the whole console log
#   $OUT/raw.tar.gz     the scratch folder (each step's own JSON, the pytest log, the peers' env.txt)
# and the last thing printed is a summary table (the tool returns the output's tail).
#
#   bash benchmarks/run_gpu.sh [all|ours|peers]     # default all
# Knobs (environment): BUDGET (s), PEERS_RESERVE (s kept for the peers, default 170), SKIP (space-separated
# step names: pytest kernels skinny_matmul host_speed step_overhead host_overhead profile profile_skinny profile_b64 prefill_step speculative latency latency_served_len latency_cublaslt latency_unfused_decode latency_skinny latency_skinny_pdl latency_b8 latency_b8_skinny latency_b8_skinny_pdl latency_compile profile_compile gemm_shapes latency_b64 latency_b64_unfused_decode latency_qwen3 throughput_1b throughput_penalized throughput_sampled throughput_top_k throughput_prefix throughput_prefix_off serving serving_eager_prefill serving_engine_process throughput_8b tune_kernels peers),
# ENGINE_EXTRA (engine flags for our benchmarks, e.g. "--no-overlap-scheduling"), PYTEST_ARGS (extra pytest arguments, e.g. "-k gpu"), SMOKE=1 (CPU smoke test of this script: tiny random model, few requests, peers with PEERS_TINY=1).
set -u
cd "$(dirname "$0")/.."
PART=${1:-all}
case "$PART" in all|ours|peers) ;; *) echo "usage: $0 [all|ours|peers]" >&2; exit 2 ;; esac
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor_cache
FINAL=${OUT:-/tmp/gqa_gpu_out}
RAW=$(mktemp -d /tmp/gqa_gpu_raw.XXXX)
mkdir -p "$FINAL"
PY=${PYTHON:-python3}
BUDGET=${BUDGET:-550}
PEERS_RESERVE=${PEERS_RESERVE:-170}
SMOKE=${SMOKE:-0}
SKIP=" ${SKIP:-} "
ENGINE_EXTRA=${ENGINE_EXTRA:-}  # engine flags for every benchmark of ours, e.g. "--no-overlap-scheduling"
START=$(date +%s)
[ "$PART" = ours ] && PEERS_RESERVE=0

left() { echo $(( BUDGET - ($(date +%s) - START) )); }
# cap WANT [RESERVE]: seconds a step may take: WANT, but leave RESERVE (default: the peers' share) and 10 s
cap() {
  local want=$1 reserve=${2:-$PEERS_RESERVE} l
  l=$(( $(left) - reserve - 10 ))
  (( l < want )) && want=$l
  echo "$want"
}
STEPS_TSV="$RAW/steps.tsv"
: >"$STEPS_TSV"
# step NAME WANT_S CMD...: run CMD under timeout with OUT=$RAW; record rc and seconds
step() {
  local name=$1 want=$2; shift 2
  if [[ "$SKIP" == *" $name "* ]]; then echo "### $name: skipped (SKIP)"; return; fi
  local c; c=$(cap "$want" "${STEP_RESERVE:-$PEERS_RESERVE}")
  if (( c < 5 )); then
    echo "### $name: skipped, no time left ($(left) s of the budget)"
    printf '%s\t%s\t%s\n' "$name" "no-time" 0 >>"$STEPS_TSV"
    return
  fi
  echo "### $name (cap ${c}s, $(left)s left): $*"
  local t0=$(date +%s)
  OUT="$RAW" timeout --kill-after=10 "$c" "$@"
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  (( rc == 124 || rc == 137 )) && echo "### $name: TIMED OUT after ${dt}s"
  echo "### $name: rc=$rc in ${dt}s"
  printf '%s\t%s\t%s\n' "$name" "$rc" "$dt" >>"$STEPS_TSV"
}

main() {
  # Wheels the GPU image lacks (pydantic, fastapi, uvicorn, ...: see benchmarks/README.md), carried in .whl/.
  if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || echo "### wheel install FAILED"
  fi
  {
    date -u
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit,temperature.gpu \
      --format=csv 2>&1 || true
    $PY -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
    $PY -c "import triton; print('triton', triton.__version__)" 2>&1 | tail -1
    $PY -c "import transformers; print('transformers', transformers.__version__)" 2>&1 | tail -1
    $PY -c "import pydantic, fastapi, uvicorn; print('pydantic', pydantic.__version__, 'fastapi', fastapi.__version__, 'uvicorn', uvicorn.__version__)" 2>&1 | tail -1
    git log -1 --format='commit %H %s' 2>/dev/null; git status --short 2>/dev/null | head -20
  } 2>&1 | tee "$RAW/env_ours.txt"

  local dummy1=llama-3.2-1b dummy8=llama-3.1-8b dummy_qwen3=qwen3-0.6b dev=() nreq=256 lens=(100 1024) lat_iters=5 rates=8,16,32,inf nprom=128 prefix=1024
  local served_len=8192  # configs/llama-3.2-1b.toml's max_model_len
  local serve_extra="--dtype bfloat16 --max-model-len 2048 $ENGINE_EXTRA"
  if [ "$SMOKE" = 1 ]; then  # CPU: a tiny random model in the same shapes' spirit, few requests
    printf '%s' '{"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
      "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "rope_theta": 500000.0,
      "max_position_embeddings": 4096, "tie_word_embeddings": true}' >"$RAW/tiny_config.json"
    printf '%s' '{"architectures": ["Qwen3ForCausalLM"], "vocab_size": 512, "hidden_size": 64,
      "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
      "head_dim": 32, "max_position_embeddings": 4096, "tie_word_embeddings": true}' >"$RAW/tiny_qwen3.json"
    dummy_qwen3=$RAW/tiny_qwen3.json
    dummy1=$RAW/tiny_config.json dummy8=$RAW/tiny_config.json dev=(--device cpu) nreq=8 lens=(16 64) lat_iters=2 prefix=32
    rates=8,inf nprom=4 serve_extra="--device cpu --max-model-len 512" served_len=4096
    export PEERS_DEVICE=cpu PEERS_TINY=1
  fi

  if [ "$PART" != peers ]; then
    if [ "$SMOKE" = 1 ]; then
      step pytest 60 bash -c "echo 'SMOKE: kernel tests skipped' | tee $RAW/pytest.txt"
      step kernels 60 $PY benchmarks/kernels.py --dry-run
      step skinny_matmul 60 $PY benchmarks/skinny_matmul.py --dry-run
    else
      local tests=(tests/test_kernels.py tests/test_kernel_rotary_cache.py tests/test_kernel_decode_rotary.py tests/test_kernel_skinny_matmul.py tests/test_cuda_graphs.py tests/test_sampler.py
        tests/test_prefill_graphs.py tests/test_compiled_forward.py)
      # the default model's greedy test needs its GGUF (no network there): copy it into the cache first
      local cache=${GQA_MODEL_CACHE_DIR:-$HOME/.cache/gqa-serve/models}
      if [ -e "$cache/smollm2-135m.gguf" ] || [ -e "$cache/smollm2-135m/config.json" ]; then
        tests+=(tests/test_gpu_model.py)
      else
        echo "### tests/test_gpu_model.py left out: no $cache/smollm2-135m.gguf"
      fi
      step pytest 260 bash -c "set -o pipefail; $PY -m pytest ${tests[*]} ${PYTEST_ARGS:-} -q -p no:cacheprovider 2>&1 | tee $RAW/pytest.txt | tail -40"
      step kernels 60 $PY benchmarks/kernels.py
      # the small-batch projections: our skinny kernel (norm / SiLU folded in) against cuBLAS, and a tile sweep
      step skinny_matmul 80 $PY benchmarks/skinny_matmul.py --sweep-budget-s 45
      # this host's Python speed and thread / process round trips: host-time figures of two machines compare
      step host_speed 20 $PY benchmarks/host_speed.py
      step step_overhead 40 $PY benchmarks/step_overhead.py $ENGINE_EXTRA
      step host_overhead 30 $PY benchmarks/step_overhead.py --host-only --async-engine --batch-sizes 1 8 64 256 \
        --steps 150 --json "$RAW/host_overhead.json" $ENGINE_EXTRA
      step profile 40 $PY benchmarks/profile_step.py --batch-size 1 --context 256
      step profile_skinny 40 $PY benchmarks/profile_step.py --batch-size 1 --context 256 --skinny-matmul \
        --json "$RAW/profile_skinny.json"
      # batch 64's kernels (eager, so without the graph's gaps): where its step's 1.6 ms go
      step profile_b64 40 $PY benchmarks/profile_step.py --batch-size 64 --context 192 --json "$RAW/profile_b64.json"
      step prefill_step 60 $PY benchmarks/prefill_step.py --prompt-len 128 --decodes 32 --profile $ENGINE_EXTRA
      # n-gram drafts at batch 1 on the real default model (bf16), against transformers' prompt lookup; and
      # a JSON schema's forced tokens and a chat request's prediction as drafts (ours only)
      if [ -e "$cache/smollm2-135m.gguf" ] || [ -e "$cache/smollm2-135m/config.json" ]; then
        step speculative 100 $PY benchmarks/speculative.py --device cuda --dtype bfloat16 --num-speculative-tokens 4 8 \
          --workloads copy edit free json extract --max-new-tokens 128 --json "$RAW/speculative.json"
      fi
    fi
    step latency 45 $PY benchmarks/latency.py --dummy --config "$dummy1" "${dev[@]}" --batch-size 1 --input-len 128 \
      --output-len 256 --num-iters "$lat_iters" --json "$RAW/latency.json" $ENGINE_EXTRA
    # the same at a server's max_model_len (configs/llama-3.2-1b.toml): the decode attention's splits follow it
    # (2 at the workload's 384, 32 at 8,192, of which a 128-384 context fills 2-6)
    step latency_served_len 45 $PY benchmarks/latency.py --dummy --config "$dummy1" "${dev[@]}" --batch-size 1 \
      --input-len 128 --output-len 256 --num-iters "$lat_iters" --max-model-len "$served_len" \
      --json "$RAW/latency_served_len.json" $ENGINE_EXTRA
    # the same batch-1 run with cuBLASLt for the matmuls: do the small qkv / o GEMVs get nearer the copy bandwidth?
    step latency_cublaslt 45 $PY benchmarks/latency.py --dummy --config "$dummy1" "${dev[@]}" --batch-size 1 \
      --input-len 128 --output-len 256 --num-iters "$lat_iters" --blas-library cublaslt \
      --json "$RAW/latency_cublaslt.json" $ENGINE_EXTRA
    # and with decode_fusion off (the default folds rotary + cache write into the decode attention kernel)
    step latency_unfused_decode 45 $PY benchmarks/latency.py --dummy --config "$dummy1" "${dev[@]}" --batch-size 1 \
      --input-len 128 --output-len 256 --num-iters "$lat_iters" --no-decode-fusion \
      --json "$RAW/latency_unfused_decode.json" $ENGINE_EXTRA
    # and with skinny_matmul: the projections of steps of up to 16 tokens on our kernel, three launches fewer a
    # layer; and both ways at batch 8
    step latency_skinny 45 $PY benchmarks/latency.py --dummy --config "$dummy1" "${dev[@]}" --batch-size 1 \
      --input-len 128 --output-len 256 --num-iters "$lat_iters" --skinny-matmul \
      --json "$RAW/latency_skinny.json" $ENGINE_EXTRA
    # and each of those launches started early by programmatic dependent launch (sm_90+), inside the graphs
    step latency_skinny_pdl 45 $PY benchmarks/latency.py --dummy --config "$dummy1" "${dev[@]}" --batch-size 1 \
      --input-len 128 --output-len 256 --num-iters "$lat_iters" --skinny-matmul --skinny-matmul-pdl \
      --json "$RAW/latency_skinny_pdl.json" $ENGINE_EXTRA
    step latency_b8 45 $PY benchmarks/latency.py --dummy --config "$dummy1" "${dev[@]}" --batch-size 8 \
      --input-len 128 --output-len 256 --num-iters "$lat_iters" --json "$RAW/latency_b8.json" $ENGINE_EXTRA
    step latency_b8_skinny 45 $PY benchmarks/latency.py --dummy --config "$dummy1" "${dev[@]}" --batch-size 8 \
      --input-len 128 --output-len 256 --num-iters "$lat_iters" --skinny-matmul \
      --json "$RAW/latency_b8_skinny.json" $ENGINE_EXTRA
    step latency_b8_skinny_pdl 45 $PY benchmarks/latency.py --dummy --config "$dummy1" "${dev[@]}" --batch-size 8 \
      --input-len 128 --output-len 256 --num-iters "$lat_iters" --skinny-matmul --skinny-matmul-pdl \
      --json "$RAW/latency_b8_skinny_pdl.json" $ENGINE_EXTRA
    # and with compile_mode max-autotune on the decode graphs up to batch 8: inductor's GEMM choice per shape
    step latency_compile 120 $PY benchmarks/latency.py --dummy --config "$dummy1" "${dev[@]}" --batch-size 1 \
      --input-len 128 --output-len 256 --num-iters "$lat_iters" --compile-mode max-autotune \
      --compile-max-batch-size 8 --json "$RAW/latency_compile.json" $ENGINE_EXTRA
    [ "$SMOKE" = 1 ] || step profile_compile 90 $PY benchmarks/profile_step.py --batch-size 1 --context 256 --compile-mode max-autotune \
      --json "$RAW/profile_compile.json"
    # each projection's GEMM alone at M 1 and 64: cuBLAS, cuBLASLt, inductor max-autotune, against its weight's read
    [ "$SMOKE" = 1 ] || step gemm_shapes 150 $PY benchmarks/gemm_shapes.py --batch-sizes 1 64
    step latency_b64 45 $PY benchmarks/latency.py --dummy --config "$dummy1" "${dev[@]}" --batch-size 64 \
      --input-len 128 --output-len 128 --num-iters "$lat_iters" --json "$RAW/latency_b64.json" $ENGINE_EXTRA
    step latency_b64_unfused_decode 45 $PY benchmarks/latency.py --dummy --config "$dummy1" "${dev[@]}" --batch-size 64 \
      --input-len 128 --output-len 128 --num-iters "$lat_iters" --no-decode-fusion \
      --json "$RAW/latency_b64_unfused_decode.json" $ENGINE_EXTRA
    # Qwen3-0.6B's shape at batch 1: its per-head q/k norm runs inside the RoPE + cache-write kernel
    step latency_qwen3 45 $PY benchmarks/latency.py --dummy --config "$dummy_qwen3" "${dev[@]}" --batch-size 1 \
      --input-len 128 --output-len 256 --num-iters "$lat_iters" --json "$RAW/latency_qwen3.json" $ENGINE_EXTRA
    step throughput_1b 100 $PY benchmarks/throughput.py --dummy --config "$dummy1" "${dev[@]}" --num-requests "$nreq" \
      --input-len "${lens[@]}" --output-len "${lens[@]}" --seed 0 --json "$RAW/throughput_1b.json" $ENGINE_EXTRA
    # the same requests, 10% of them with a frequency penalty: their steps run the forward ahead and sample
    # after the step in flight (before deferred sampling, any such row turned overlap off for the whole batch)
    step throughput_penalized 100 $PY benchmarks/throughput.py --dummy --config "$dummy1" "${dev[@]}" \
      --num-requests "$nreq" --input-len "${lens[@]}" --output-len "${lens[@]}" --seed 0 --penalized-fraction 0.1 \
      --json "$RAW/throughput_penalized.json" $ENGINE_EXTRA
    # and sampled (temperature 0.8, top_p 0.95: a full-vocabulary sort per row each step) instead of greedy
    step throughput_sampled 100 $PY benchmarks/throughput.py --dummy --config "$dummy1" "${dev[@]}" \
      --num-requests "$nreq" --input-len "${lens[@]}" --output-len "${lens[@]}" --seed 0 --temperature 0.8 \
      --top-p 0.95 --json "$RAW/throughput_sampled.json" $ENGINE_EXTRA
    # and with a top-k on every request too (Qwen2.5's defaults): the sampler's cut comes from torch.topk
    step throughput_top_k 100 $PY benchmarks/throughput.py --dummy --config "$dummy1" "${dev[@]}" \
      --num-requests "$nreq" --input-len "${lens[@]}" --output-len "${lens[@]}" --seed 0 --temperature 0.7 \
      --top-k 20 --top-p 0.8 --json "$RAW/throughput_top_k.json" $ENGINE_EXTRA
    # the same requests behind one shared 1,024-token prefix (a system prompt), prefix cache on and off
    step throughput_prefix 45 $PY benchmarks/throughput.py --dummy --config "$dummy1" "${dev[@]}" --num-requests "$nreq" \
      --prefix-len "$prefix" --input-len "${lens[@]}" --output-len "${lens[@]}" --seed 0 \
      --json "$RAW/throughput_prefix.json" $ENGINE_EXTRA
    step throughput_prefix_off 60 $PY benchmarks/throughput.py --dummy --config "$dummy1" "${dev[@]}" \
      --num-requests "$nreq" --prefix-len "$prefix" --input-len "${lens[@]}" --output-len "${lens[@]}" --seed 0 \
      --no-enable-prefix-caching --json "$RAW/throughput_prefix_off.json" $ENGINE_EXTRA
    if $PY -c "import fastapi, uvicorn, sse_starlette" 2>/dev/null; then
      step serving 90 $PY benchmarks/serving.py --launch --dummy-checkpoint "$dummy1" --serve-args "$serve_extra" \
        --request-rates "$rates" --num-prompts "$nprom" --input-len 128 --max-tokens 128 --launch-timeout 60 \
        --json "$RAW/serving.json"
    else
      echo "### serving: skipped (fastapi/uvicorn/sse_starlette do not import: carry .whl)"
    fi
    if $PY -c "import fastapi, uvicorn, sse_starlette" 2>/dev/null; then
      # the same serving run with prompt steps eager (graphs for decode steps only): what prefill graphs buy
      step serving_eager_prefill 70 $PY benchmarks/serving.py --launch --dummy-checkpoint "$dummy1" \
        --serve-args "$serve_extra --no-prefill-graphs" --request-rates "${rates#*,}" --num-prompts "$nprom" \
        --input-len 128 --max-tokens 128 --launch-timeout 60 --json "$RAW/serving_eager_prefill.json"
      # and with the engine loop in its own process (engine_process): HTTP and steps on separate GILs
      step serving_engine_process 70 $PY benchmarks/serving.py --launch --dummy-checkpoint "$dummy1" \
        --serve-args "$serve_extra --engine-process" --request-rates "${rates#*,}" --num-prompts "$nprom" \
        --input-len 128 --max-tokens 128 --launch-timeout 60 --json "$RAW/serving_engine_process.json"
    fi
    step throughput_8b 110 $PY benchmarks/throughput.py --dummy --config "$dummy8" "${dev[@]}" --num-requests "$nreq" \
      --input-len "${lens[@]}" --output-len "${lens[@]}" --seed 0 --json "$RAW/throughput_8b.json" $ENGINE_EXTRA
    [ "$SMOKE" = 1 ] || step tune_kernels 170 $PY benchmarks/tune_kernels.py --decode-budget-s 70 --prefill-budget-s 90
  fi
  if [ "$PART" != ours ]; then
    if [ -f .peers/run_all.sh ]; then
      local pb=$(( $(left) - 20 ))
      STEP_RESERVE=0 step peers "$pb" env BUDGET="$pb" bash .peers/run_all.sh
    else
      echo "### peers: skipped (.peers/run_all.sh missing: copy ../shared/peers to .peers and carry it)"
    fi
  fi
  echo "### all steps done in $(( $(date +%s) - START ))s"
  summarize
}

summarize() {
  $PY - "$RAW" "$FINAL/summary.json" <<'EOF'
import glob, json, os, sys
raw, out = sys.argv[1], sys.argv[2]
data = {}
for p in sorted(glob.glob(os.path.join(raw, "*.json"))):
    try:
        data[os.path.basename(p)[:-5]] = json.load(open(p))
    except Exception as e:  # noqa: BLE001
        data[os.path.basename(p)[:-5]] = {"unreadable": str(e)}
steps = [line.rstrip("\n").split("\t") for line in open(os.path.join(raw, "steps.tsv"))]
data["steps"] = [{"step": s, "rc": rc, "seconds": int(t)} for s, rc, t in steps]
for name in ("pytest.txt", "env_ours.txt", "env.txt"):
    p = os.path.join(raw, name)
    if os.path.exists(p):
        data[name] = open(p).read()[-4000:]
json.dump(data, open(out, "w"), indent=1, default=str)

def g(d, *keys):
    for k in keys:
        if not isinstance(d, (dict, list)):
            return None
        try:
            d = d[k]
        except (KeyError, IndexError, TypeError):
            return None
    return d

def f(x, fmt="{:.1f}"):
    return "-" if x is None else fmt.format(x)

rows = []
def row(metric, ours, peer=None, note=""):
    ratio = f"{ours / peer:.2f}" if isinstance(ours, (int, float)) and isinstance(peer, (int, float)) and peer else "-"
    rows.append((metric, f(ours) if not isinstance(ours, str) else ours, f(peer) if not isinstance(peer, str) else peer, ratio, note))

print("\n==== steps ====")
for s in data["steps"]:
    print(f"{s['step']:<15} rc={s['rc']:<8} {s['seconds']:>4}s")
if "pytest.txt" in data:
    print("pytest:", data["pytest.txt"].strip().splitlines()[-1] if data["pytest.txt"].strip() else "(empty)")

ca = data.get("ceilings_attn", {})
lat, l64 = data.get("latency", {}), data.get("latency_b64", {})
runs = {r.get("case", ""): r for r in (g(data, "hf_generate_eager", "runs") or [])}
hf_b1 = g(runs, "b1 dynamic cache (eager)", "decode_out_tok_s")
hf_b1s = g(runs, "b1 static cache, no compile", "decode_out_tok_s")
hf_b64 = g(runs, "b64 dynamic cache (eager)", "decode_out_tok_s")
row("copy GB/s (ours: latency.py; peer: ceilings_attn)", g(lat, "roofline", "copy_GBps"),
    g(ca, "ceilings", "d2d_copy", "GBps_read_plus_write"))
row("b1 decode tok/s vs HF eager", g(lat, "median", "decode_tok_s"), hf_b1)
row("b1 decode tok/s vs HF static cache", g(lat, "median", "decode_tok_s"), hf_b1s)
row("b1 decode tok/s at a server's max_model_len (peer: the workload's 384)",
    g(data, "latency_served_len", "median", "decode_tok_s"), g(lat, "median", "decode_tok_s"))
row("b1 decode tok/s, cuBLASLt (peer: default BLAS)", g(data, "latency_cublaslt", "median", "decode_tok_s"),
    g(lat, "median", "decode_tok_s"))
row("b1 decode tok/s, decode_fusion (peer: off)",
    g(lat, "median", "decode_tok_s"), g(data, "latency_unfused_decode", "median", "decode_tok_s"))
row("b1 decode tok/s, skinny_matmul (peer: off)", g(data, "latency_skinny", "median", "decode_tok_s"),
    g(lat, "median", "decode_tok_s"), f"roofline {f(g(lat, 'roofline', 'roofline_tok_s'))} tok/s")
row("b1 decode tok/s, skinny_matmul_pdl (peer: skinny_matmul alone)",
    g(data, "latency_skinny_pdl", "median", "decode_tok_s"), g(data, "latency_skinny", "median", "decode_tok_s"))
row("b8 decode tok/s, skinny_matmul (peer: off)", g(data, "latency_b8_skinny", "median", "decode_tok_s"),
    g(data, "latency_b8", "median", "decode_tok_s"), f"roofline {f(g(data, 'latency_b8', 'roofline', 'roofline_tok_s'))}")
row("b8 decode tok/s, skinny_matmul_pdl (peer: skinny_matmul alone)",
    g(data, "latency_b8_skinny_pdl", "median", "decode_tok_s"), g(data, "latency_b8_skinny", "median", "decode_tok_s"))
row("b64 decode tok/s, decode_fusion (peer: off)",
    g(l64, "median", "decode_tok_s"), g(data, "latency_b64_unfused_decode", "median", "decode_tok_s"))
lq = data.get("latency_qwen3", {})
row("b1 decode tok/s, Qwen3-0.6B shape (peer: its weight-read roofline)", g(lq, "median", "decode_tok_s"),
    g(lq, "roofline", "roofline_tok_s"))
row("b1 decode tok/s, compile max-autotune (peer: off)", g(data, "latency_compile", "median", "decode_tok_s"),
    g(lat, "median", "decode_tok_s"), f"profiled {f(g(data, 'profile_compile', 'total_us_per_step'))} us/step "
    f"(off: {f(g(data, 'profile_step', 'total_us_per_step'))})")
for t in g(data, "gemm_shapes", "steps") or []:
    row(f"M={t['m']} one step's GEMMs us, best per shape (peer: cuBLAS)", t["best_us"], t["us"].get("cublas"),
        f"limit {t['limit_us']:.0f} us; cuBLASLt {f(t['us'].get('cublaslt'))}, inductor {f(t['us'].get('inductor'))}")
ms = lambda x: None if x is None else x * 1e3  # noqa: E731
us = lambda x: None if x is None else x * 1e6  # noqa: E731
pct = lambda x: None if x is None else x * 100  # noqa: E731
row("b1 TPOT ms (peer: HF eager step)", ms(g(lat, "median", "tpot_s")),
    g(runs, "b1 dynamic cache (eager)", "decode_step_ms_median"),
    f"roofline {f(ms(g(lat, 'roofline', 'roofline_step_s')), '{:.3f}')} ms")
row("b1 % of memory roofline", pct(g(lat, "fraction_of_roofline")), None,
    f"roofline {f(g(lat, 'roofline', 'roofline_tok_s'))} tok/s")
row("b1 TTFT ms (prompt 128)", ms(g(lat, "median", "ttft_s")), ms(g(runs, "b1 dynamic cache (eager)", "ttft_s")))
row("b64 decode tok/s vs HF eager", g(l64, "median", "decode_tok_s"), hf_b64)
row("b64 % of memory roofline", pct(g(l64, "fraction_of_roofline")), None,
    f"roofline {f(g(l64, 'roofline', 'roofline_tok_s'))} tok/s")
cb = data.get("hf_cb", {})
row("1B 256 req out tok/s vs HF CB", g(data, "throughput_1b", "ours", "output_tok_s"), cb.get("output_tok_s"),
    "HF CB timed out (partial)" if cb.get("timed_out") else "")
row("1B 256 req total tok/s vs HF CB", g(data, "throughput_1b", "ours", "total_tok_s"), cb.get("total_tok_s"))
tp = data.get("throughput_penalized", {}).get("ours", {})
row("1B 256 req out tok/s, 10% penalized (peer: none)", tp.get("output_tok_s"),
    g(data, "throughput_1b", "ours", "output_tok_s"), f"{tp.get('deferred_sampling_steps')} of "
    f"{tp.get('overlapped_steps')} overlapped steps sampled after the one in flight" if tp else "")
row("1B 256 req out tok/s, sampled T 0.8 top_p 0.95 (peer: greedy)",
    g(data, "throughput_sampled", "ours", "output_tok_s"), g(data, "throughput_1b", "ours", "output_tok_s"))
row("1B 256 req out tok/s, T 0.7 top_k 20 top_p 0.8 (peer: top_p 0.95 alone, a full sort)",
    g(data, "throughput_top_k", "ours", "output_tok_s"), g(data, "throughput_sampled", "ours", "output_tok_s"))
row("1B shared-prefix total tok/s, cache on vs off", g(data, "throughput_prefix", "ours", "total_tok_s"),
    g(data, "throughput_prefix_off", "ours", "total_tok_s"),
    f"{g(data, 'throughput_prefix', 'ours', 'prefix_cache_hit_tokens')} prompt tokens from the cache; the "
    "peer column is ours with the cache off")
row("8B 256 req out tok/s", g(data, "throughput_8b", "ours", "output_tok_s"), None,
    f"{g(data, 'throughput_8b', 'ours', 'preemptions')} preemptions" if data.get("throughput_8b") else "")
eager_prefill = {r["request_rate"]: r for r in g(data, "serving_eager_prefill", "rates") or []}


def gap_note(r):  # the server's engine step gaps over the rate's run (/metrics; benchmarks/serving.py)
    gaps = r.get("engine_step_gap_ms") or {}
    return "" if not gaps else "; engine step gap p99 prompt/decode " + "/".join(
        f"{gaps.get(k, {}).get('p99', float('nan')):.2f}" for k in ("prompt", "decode")) + " ms"


in_process = {r["request_rate"]: r for r in g(data, "serving", "rates") or []}
for r in g(data, "serving_engine_process", "rates") or []:
    row(f"serving rate {r['request_rate']}, engine process: out tok/s (peer: in-process engine)", r["output_tok_s"],
        g(in_process, r["request_rate"], "output_tok_s"),
        f"TTFT p50/p99 {r['ttft_ms']['p50']:.0f}/{r['ttft_ms']['p99']:.0f} ms; TPOT p50 {r['tpot_ms']['p50']:.1f} "
        f"ms; ITL p50/p99 {r['itl_ms']['p50']:.1f}/{r['itl_ms']['p99']:.1f} ms" + gap_note(r))
for r in g(data, "serving", "rates") or []:
    e = eager_prefill.get(r["request_rate"])
    row(f"serving rate {r['request_rate']}: ITL p99 ms (peer: prompt steps eager)", r["itl_ms"]["p99"],
        None if e is None else e["itl_ms"]["p99"],
        f"out tok/s {r['output_tok_s']:.0f}; ok {r['completed']} fail {r['failed']}; TTFT p50/p99 "
        f"{r['ttft_ms']['p50']:.0f}/{r['ttft_ms']['p99']:.0f} ms; TPOT p50 {r['tpot_ms']['p50']:.1f} ms; "
        f"ITL p50 {r['itl_ms']['p50']:.1f} ms" + gap_note(r))
kr = g(data, "kernels", "rows") or []
for r in kr:
    row(f"kernel {r['kernel']} {r['shape']} us", r["ours_us"], r["peer_us"], f"{r['peer']}; {r['fraction_of_limit']:.2f} of limit")
for r in g(data, "skinny_matmul", "rows") or []:
    row(f"{r['kernel']} {r['shape']} us", r["ours_us"], r["peer_us"], f"{r['peer']}; {r['fraction_of_limit']:.2f} of limit")
for sw in g(data, "skinny_matmul", "sweep") or []:
    row(f"skinny tile sweep {sw['model']} {sw['projection']} M=1: best us (peer: pick_tile's)", sw["best_us"],
        sw["chosen_us"], f"best {tuple(sw['best'])}, pick_tile {tuple(sw['chosen'])}, {sw['tiles_timed']} tiles")
for r in g(data, "host_speed", "rows") or []:
    row(f"host {r['case']} ({r['unit']})", r["median"], None,
        f"{g(data, 'host_speed', 'host')}; min {r['min']:.2f}, max {r['max']:.2f}")
for r in g(data, "step_overhead", "rows") or []:
    row(f"decode step host us, 1 layer, B={r['batch']}", r["host_us"], None,
        f"step {f(r['step_us'])} us, device {f(r['device_us'])} us; target < 60")
for r in g(data, "host_overhead", "rows") or []:
    row(f"served step host us, no model, B={r['batch']}", r["host_us"], None,
        "AsyncEngine + streams, stand-in replay (step_overhead.py --host-only --async-engine)")
for r in (g(data, "profile_skinny", "rows") or [])[:8]:
    row(f"b1 decode kernel, skinny_matmul: {r['kernel'][:34]}", r["us_per_step"], None,
        f"{r['share']:.0%} of {f(g(data, 'profile_skinny', 'total_us_per_step'))} us/step, {r['calls_per_step']:.0f} calls")
for r in (g(data, "profile_step", "rows") or [])[:8]:
    row(f"b1 decode kernel: {r['kernel'][:48]}", r["us_per_step"], None,
        f"{r['share']:.0%} of {f(g(data, 'profile_step', 'total_us_per_step'))} us/step, {r['calls_per_step']:.0f} calls")
row("b64 decode step: eager kernels us (peer: the graphed step, latency_b64's TPOT)",
    g(data, "profile_b64", "total_us_per_step"), us(g(l64, "median", "tpot_s")),
    "kernel time summed over an eager forward at context 192; the rest of the graphed step is gaps and sampling")
for r in (g(data, "profile_b64", "rows") or [])[:10]:
    row(f"b64 decode kernel: {r['kernel'][:48]}", r["us_per_step"], None,
        f"{r['share']:.0%} of {f(g(data, 'profile_b64', 'total_us_per_step'))} us/step, {r['calls_per_step']:.0f} calls")
for name, c in (g(data, "prefill_step", "cases") or {}).items():
    row(f"prompt step ms, 1B, prompt 128: {name}", c["step_ms"], None, f"device {f(c['device_ms'], '{:.2f}')} ms")
for r in g(data, "tune_kernels", "rows") or []:
    row(f"tuned {r['shape']} us (peer: defaults)", r["best_us"], r["default_us"], f"best {r['best']}")

w = [max(len(str(x[i])) for x in rows + [("metric", "ours", "peer", "ours/peer", "note")]) for i in range(5)]
print("\n==== summary (ours vs peers, same device call) ====")
for x in [("metric", "ours", "peer", "ours/peer", "note")] + rows:
    print(" | ".join(str(v).ljust(n) for v, n in zip(x, w)).rstrip())
print(f"\nfull results: {out}")
EOF
  tar -czf "$FINAL/raw.tar.gz" -C "$RAW" . 2>/dev/null
}

main 2>&1 | tee "$FINAL/run_log.txt"
