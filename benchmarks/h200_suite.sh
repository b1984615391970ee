#!/usr/bin/env bash
# The GPU benchmarks behind benchmarks/results/*_h200.* (and *_h100.*, from runs where the lent machine was an H100),
# in the order they were run.
#   bash benchmarks/h200_suite.sh engine OUT_DIR    # throughput.py workloads (offline engine)
#   bash benchmarks/h200_suite.sh checks OUT_DIR    # kernel checks (bit patterns, attention) and engine checks
#   bash benchmarks/h200_suite.sh sweep OUT_DIR     # the Llama-3.2-1B batch sweep alone (bf16, fp8; three rounds)
#   bash benchmarks/h200_suite.sh serving OUT_DIR   # serve.py (saturated, 4 req/s, fake engine)
#   OLD=DIR [OLD_COMMIT=...] bash benchmarks/h200_suite.sh servingab OUT_DIR # serve.py saturated, an older tree then this one
#   OLD=DIR [OLD_COMMIT=... ROUNDS=2] bash benchmarks/h200_suite.sh rate4ab OUT_DIR # 4 req/s, an older tree and this one, alternated
#   bash benchmarks/h200_suite.sh servetrace OUT_DIR # serve.py --trace-dir at 4 req/s, then saturated (serve_trace_h200.json)
#   bash benchmarks/h200_suite.sh parserab OUT_DIR  # serve.py saturated on h11, then on httptools
#   bash benchmarks/h200_suite.sh apiservers OUT_DIR # serve.py saturated with 4 API server processes
#   bash benchmarks/h200_suite.sh apisweep OUT_DIR  # the same with 2 and 8
#   OLD=DIR OLD_COMMIT=... [ROUNDS=2 REPEATS=3] bash benchmarks/h200_suite.sh demoab OUT_DIR  # demo batch-1 speculative decoding, old tree vs this one
#   bash benchmarks/h200_suite.sh fp8reg OUT_DIR    # FP8 decode variants (decode_attention_fp8_registers.md)
#   bash benchmarks/h200_suite.sh fp8ncu OUT_DIR    # ncu of the default and staged FP8 decode kernels
#   bash benchmarks/h200_suite.sh extendvar OUT_DIR # extend (prefill) kernel launch variants: 32k and 2048 tokens
#   bash benchmarks/h200_suite.sh grammar OUT_DIR   # structured outputs at batch 32 (a cl100k-like vocabulary), the mask fill alone
#   OLD=DIR [OLD_COMMIT=... ROUNDS=2] bash benchmarks/h200_suite.sh grammarab OUT_DIR # structured outputs (1B), old tree and this, alternated
#   bash benchmarks/h200_suite.sh grammar8b OUT_DIR # structured outputs at batch 32 on the Llama-3.1-8B shape
#   bash benchmarks/h200_suite.sh grammar1b OUT_DIR # the README's row 15 on the Llama-3.2-1B shape, both vocabularies
#   bash benchmarks/h200_suite.sh extendfp8 OUT_DIR # FP8 prompt passes with the extend kernel's registers capped
#   bash benchmarks/h200_suite.sh extendchecks OUT_DIR # every extend variant against the torch reference
#   bash benchmarks/h200_suite.sh extendttft OUT_DIR # a 32k prompt's TTFT end to end, beside one HF forward
#   bash benchmarks/h200_suite.sh profile1b OUT_DIR # GPU time per kernel of Llama-3.2-1B: decode steps (batch 1, 64), runs (128, 256)
#   OLD=DIR [OLD_COMMIT=...] bash benchmarks/h200_suite.sh firststeps OUT_DIR # the first burst after start-up, old tree and this one
#   OLD=DIR [OLD_COMMIT=...] bash benchmarks/h200_suite.sh engineab OUT_DIR # offline fixed (1B, batch 64) and nano, old tree and this one
#   OLD=DIR OLD_COMMIT=... bash benchmarks/h200_suite.sh nanoab OUT_DIR # nano, bf16 KV: older tree, this one, 2 rounds alternated
#   OLD=DIR [OLD_COMMIT=...] bash benchmarks/h200_suite.sh samplerab OUT_DIR # the sampling kernel's checks; nano and batch-1, old and this
#   bash benchmarks/h200_suite.sh splits OUT_DIR  # decode_splits by-length and by-batch: kernel split sizes, batch 1 (1B, 8B), batch 64, nano
#   bash benchmarks/h200_suite.sh splitsweep OUT_DIR # kernel split sizes; the Llama-3.2-1B batch sweep with both decode_splits
#   bash benchmarks/h200_suite.sh linear OUT_DIR  # skinny Triton GEMM vs cuBLAS, gate/up + SiLU; a layer's kernel chain with PDL;
#                                                 # batch 64 with the 64-row GEMMs releasing dependents early or not
#   OLD=DIR OLD_COMMIT=... bash benchmarks/h200_suite.sh decodeab OUT_DIR # the decode kernel of an older tree and this one: bits, time
#   OLD=DIR OLD_COMMIT=... bash benchmarks/h200_suite.sh ropeab OUT_DIR # 1B batch 1 and 64, nano twice: older tree, this one
#   OLD=DIR OLD_COMMIT=... bash benchmarks/h200_suite.sh mlpab OUT_DIR  # the same for the fused gate/up + SiLU·mul
#   OLD=DIR OLD_COMMIT=... bash benchmarks/h200_suite.sh qknormab OUT_DIR # Qwen3's q/k norms in one launch: nano, batch 1
#   bash benchmarks/h200_suite.sh smallkernels OUT_DIR # the KV write's launch settings, and power-of-two vs dividing scales
#   bash benchmarks/h200_suite.sh dependentab OUT_DIR # EngineConfig.dependent_launch auto vs off: batch 1 (1B, 8B), 64, nano
#   bash benchmarks/h200_suite.sh pairs OUT_DIR   # the FP8 V read in byte pairs: conversion, decode vs extend, speed, engine
#   bash benchmarks/h200_suite.sh pairsab OUT_DIR # end to end, FP8 runs with the pair read and the byte read ("hw")
# Every step is bounded in time and independent of the others: one that fails leaves the rest to run.
set -u
part=$1
out=$2
mkdir -p "$out"
out=$(cd "$out" && pwd)  # absolute: the A/B parts write from inside each tree
# result files are named for the GPU that ran them: a lent "H200" machine may come as an H100
case "$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)" in *H100*) tag=h100 ;; *) tag=h200 ;; esac
export PYTHONUNBUFFERED=1
tp() { timeout "$1" python3 benchmarks/throughput.py "${@:2}" 2>&1 | grep -v -i warn | grep -E '^\{|Error|error' | cut -c1-400; }
# the commit a tree's results record in an A/B run: this tree's MINISERVE_COMMIT, or OLD_COMMIT for $OLD's
tree_commit() { if [ "$1" = "$PWD" ]; then echo "${MINISERVE_COMMIT:-}"; else echo "${OLD_COMMIT:-${MINISERVE_COMMIT:-}}"; fi; }
# alternate NAME SECONDS FILTER SCRIPT ARGS...: `python3 SCRIPT ARGS --out $out/NAME_<old|new>_<round>.json` in $OLD
# and in this tree, alternated ROUNDS times, each with its tree's commit; FILTER (a command) picks the lines shown
alternate() {
  local name=$1 secs=$2 filter=$3 tree tag commit i
  shift 3
  [ -e "$OLD/miniserve/demo_models" ] || ln -s "$PWD/miniserve/demo_models" "$OLD/miniserve/demo_models"
  for i in $(seq 1 "${ROUNDS:-2}"); do
    for tree in "$OLD" "$PWD"; do
      tag=$([ "$tree" = "$PWD" ] && echo new || echo old)
      commit=$(tree_commit "$tree")
      (cd "$tree" && MINISERVE_COMMIT="$commit" PYTHONPATH="$tree:${PYTHONPATH:-}" timeout "$secs" \
        python3 "$@" --out "$out/${name}_${tag}_$i.json" 2>&1 | grep -v -i warn | $filter | sed "s/^/[$tag $i] /")
    done
  done
}

# the Llama-3.2-1B batch sweep, bf16 and fp8 alternated over three rounds (medians: issue 19's "FP8 never slower")
sweep1b() {
  tp 560 --shape llama-3.2-1b --workload sweep --batches 1 8 32 64 128 256 --prompt 512 --gen 64 --repeats 2 --rounds 3 \
    --kv-cache-dtype auto fp8 --plot "$out/throughput_sweep_llama1b_${tag}.png" --out "$out/throughput_sweep_llama1b_${tag}.json"
}

# nano-vllm's benchmark: bf16 KV, fp8 KV with the default decode kernel (its register cap:
# decode_attention.default_register_cap), and with the staged FP8 decode variant, alternated over three rounds; the
# engine thread's time by phase (--host-split)
nano_runs() {
  tp 400 --shape qwen3-0.6b --workload nano --kv-cache-dtype auto fp8 --decode-variant default staged --repeats 1 --rounds 3 \
    --host-split --out "$out/throughput_nano_${tag}.json"
}

if [ "$part" = sweep ]; then
  sweep1b
fi

if [ "$part" = engine ]; then
  nano_runs
  tp 200 --shape qwen3-0.6b --workload nano --kv-cache-dtype fp8 --kv-write fused two_launch --repeats 1 \
    --out "$out/throughput_nano_kv_write_${tag}.json"
  tp 120 --shape llama-3.2-1b --workload fixed --batch 64 --prompt 512 --gen 256 --kv-cache-dtype auto fp8 --repeats 2 \
    --out "$out/throughput_fixed_llama1b_${tag}.json"
  tp 120 --shape llama-3.2-1b --workload latency --gen 256 --repeats 2 --hf \
    --out "$out/throughput_latency_llama1b_${tag}.json"
  sweep1b
  tp 120 --shape qwen3-0.6b --workload prefill --prompts 4096 16384 32768 --repeats 2 --hf \
    --out "$out/throughput_prefill_qwen3_${tag}.json"
fi

if [ "$part" = checks ]; then
  # the kernel correctness sections of gpu_kernels.py only: every bf16/fp16 bit pattern through the fused FP8
  # write, all 256 FP8 codes through the attention kernels' page decode, and the attention kernels against the
  # torch reference
  timeout 150 python3 benchmarks/gpu_kernels.py --checks cache_write_exact rope_write_exact fp8_page_decode attention_vs_reference \
    --out "$out/kernel_checks_${tag}.json" 2>&1 | grep -v -i warn | tail -12
  timeout 90 python3 benchmarks/gpu_kernels.py --checks skinny_linear gate_up_silu --out "$out/kernel_checks_skinny_linear_${tag}.json" \
    2>&1 | grep -v -i warn | tail -3
  OUT="$out" timeout 200 python3 benchmarks/gpu_engine_check.py > "$out/engine_check_log.txt" 2>&1
  mv "$out/engine_check.json" "$out/engine_check_${tag}.json" && python3 -c "
import json; d = json.load(open('$out/engine_check_${tag}.json'))
for k, v in d.items(): print(k, json.dumps(v)[:600])"
fi

if [ "$part" = latency8b ]; then
  tp 200 --shape llama-3.1-8b --workload latency --gen 128 --repeats 2 --out "$out/throughput_latency_llama8b_${tag}.json"
fi

if [ "$part" = demoab ]; then
  # issue 18's guard, side by side: the demo model's batch-1 speculative path at a commit before the serving work
  # (a tree exported into $OLD) and now, alternated twice
  [ -e "$OLD/miniserve/demo_models" ] || ln -s "$PWD/miniserve/demo_models" "$OLD/miniserve/demo_models"  # unchanged
  [ -n "${OLD_COMMIT:-}" ] || { echo "demoab: set OLD_COMMIT to the commit $OLD holds"; exit 2; }
  for i in $(seq 1 "${ROUNDS:-2}"); do
    for tree in "$OLD" "$PWD"; do
      side=$([ "$tree" = "$PWD" ] && echo new || echo old)
      (cd "$tree" && PYTHONPATH="$tree:${PYTHONPATH:-}" timeout 100 python3 benchmarks/spec_decode.py --batch 1 --k 4 \
        --repeats "${REPEATS:-3}" --name "spec_decode_${side}_$i" --out "$out" 2>&1 | tail -2 | sed "s/^/[$side $i] /")
    done
  done
  python3 benchmarks/spec_decode_ab.py "$out" --old-commit "$OLD_COMMIT" --out "$out/spec_decode_ab_${tag}.json"
fi

if [ "$part" = nanoab ]; then
  # host work per decode step (block tables, histories): nano-vllm's benchmark, bf16 KV, the two trees alternated
  [ -e "$OLD/miniserve/demo_models" ] || ln -s "$PWD/miniserve/demo_models" "$OLD/miniserve/demo_models"
  for i in 1 2; do
    for tree in "$OLD" "$PWD"; do
      side=$([ "$tree" = "$PWD" ] && echo new || echo old)
      (cd "$tree" && MINISERVE_COMMIT="$(tree_commit "$tree")" PYTHONPATH="$tree:${PYTHONPATH:-}" tp 170 --shape qwen3-0.6b \
        --workload nano --kv-cache-dtype auto --repeats 2 --out "$out/throughput_${side}_nano$i.json")
    done
  done
  python3 benchmarks/engine_ab.py "$out" --part nanoab --out "$out/engine_ab_nano_${tag}.json"
fi

if [ "$part" = engineab ]; then
  # issue 19: the offline workloads at an older commit (a tree exported into $OLD) and at this one, back to back;
  # benchmarks/engine_ab.py joins them (engine_ab_h200.json)
  [ -e "$OLD/miniserve/demo_models" ] || ln -s "$PWD/miniserve/demo_models" "$OLD/miniserve/demo_models"
  for tree in "$OLD" "$PWD"; do
    side=$([ "$tree" = "$PWD" ] && echo new || echo old)
    commit=$(tree_commit "$tree")
    (cd "$tree" && MINISERVE_COMMIT="$commit" PYTHONPATH="$tree:${PYTHONPATH:-}" tp 150 --shape llama-3.2-1b --workload fixed --batch 64 --prompt 512 \
      --gen 256 --kv-cache-dtype auto fp8 --repeats 2 --out "$out/throughput_${side}_fixed.json")
  done
  for tree in "$OLD" "$PWD"; do
    side=$([ "$tree" = "$PWD" ] && echo new || echo old)
    commit=$(tree_commit "$tree")
    (cd "$tree" && MINISERVE_COMMIT="$commit" PYTHONPATH="$tree:${PYTHONPATH:-}" tp 200 --shape qwen3-0.6b --workload nano --kv-cache-dtype auto fp8 \
      --decode-variant default staged --repeats 2 --out "$out/throughput_${side}_nano.json")
  done
  python3 benchmarks/engine_ab.py "$out" --out "$out/engine_ab_${tag}.json"
fi

if [ "$part" = samplerab ]; then
  # the fused sampler (miniserve/kernels/sampling.py): its GPU checks and timings, then nano (temperature 0.6: the
  # race), batch-1 latency and batch 64 (greedy: the argmax) at an older tree ($OLD) and this one, back to back;
  # benchmarks/engine_ab.py joins them (sampler_ab_h200.json)
  timeout 120 python3 benchmarks/sampling_kernel.py --out "$out/sampling_kernel_${tag}.json" 2>&1 | grep -v -i warn | tail -12
  [ -e "$OLD/miniserve/demo_models" ] || ln -s "$PWD/miniserve/demo_models" "$OLD/miniserve/demo_models"
  for tree in "$OLD" "$PWD"; do
    side=$([ "$tree" = "$PWD" ] && echo new || echo old)
    commit=$(tree_commit "$tree")
    (cd "$tree" && MINISERVE_COMMIT="$commit" PYTHONPATH="$tree:${PYTHONPATH:-}" tp 150 --shape qwen3-0.6b --workload nano --kv-cache-dtype auto \
      --repeats 2 --out "$out/throughput_${side}_nano.json")
    (cd "$tree" && MINISERVE_COMMIT="$commit" PYTHONPATH="$tree:${PYTHONPATH:-}" tp 100 --shape llama-3.2-1b --workload latency --gen 256 \
      --repeats 3 --out "$out/throughput_${side}_latency.json")
    (cd "$tree" && MINISERVE_COMMIT="$commit" PYTHONPATH="$tree:${PYTHONPATH:-}" tp 120 --shape llama-3.2-1b --workload fixed --batch 64 \
      --prompt 512 --gen 256 --kv-cache-dtype auto --repeats 2 --out "$out/throughput_${side}_fixed.json")
  done
  python3 benchmarks/engine_ab.py "$out" --part samplerab --out "$out/sampler_ab_${tag}.json"
fi

if [ "$part" = big ]; then
  tp 200 --shape llama-3.1-8b --workload fixed --batch 64 --prompt 512 --gen 128 --kv-cache-dtype auto fp8 --repeats 1 \
    --out "$out/throughput_fixed_llama8b_${tag}.json"
fi

if [ "$part" = serving ]; then
  # needs fastapi/uvicorn/pydantic/orjson/xgrammar on the GPU box (carried as wheels there). Issue 18: 256 requests
  # at once (streaming, plain, offline; the median of 3 alternated runs each); then below saturation (4 requests/s)
  # for TTFT (the median of 3 runs).
  timeout 300 python3 benchmarks/serve.py --shape llama-3.2-1b --num-prompts 256 --input-len 512 --output-len 256 \
    --phases stream,plain,offline,fake --fake-step-ms 5 --client-procs 4 --repeats 3 --out "$out/serve_${tag}.json" 2>&1 |
    grep -v -i warn | tail -12
  timeout 200 python3 benchmarks/serve.py --shape llama-3.2-1b --num-prompts 64 --input-len 512 --output-len 256 \
    --request-rate 4 --phases stream,offline --client-procs 2 --repeats 3 --out "$out/serve_rate4_${tag}.json" 2>&1 |
    grep -v -i warn | tail -8
fi

if [ "$part" = servingab ]; then
  # the saturated run of `serving` on an older tree (exported into $OLD), then on this one, back to back; and
  # parserab: this tree on h11, then on httptools. benchmarks/serve_ab.py joins such pairs (serve_ab_h200.json)
  [ -e "$OLD/miniserve/demo_models" ] || ln -s "$PWD/miniserve/demo_models" "$OLD/miniserve/demo_models"
  for tree in "$OLD" "$PWD"; do
    side=$([ "$tree" = "$PWD" ] && echo new || echo old)
    commit=$(tree_commit "$tree")
    (cd "$tree" && MINISERVE_COMMIT="$commit" PYTHONPATH="$tree:${PYTHONPATH:-}" timeout 275 python3 benchmarks/serve.py --shape llama-3.2-1b \
      --num-prompts 256 --input-len 512 --output-len 256 --phases stream,plain,offline --client-procs 4 --repeats 3 \
      --out "$out/serve_${side}.json" 2>&1 | grep -v -i warn | tail -4)
  done
fi

if [ "$part" = rate4ab ]; then
  # serving's 4 req/s run (TTFT, TPOT; 3 repeats) on an older tree ($OLD) and this one, alternated ROUNDS times;
  # benchmarks/serve_ab.py joins each round's pair (serve_rate4_ab_h200.json)
  alternate serve_rate4 150 "tail -2" benchmarks/serve.py --shape llama-3.2-1b --num-prompts 64 --input-len 512 \
    --output-len 256 --request-rate 4 --phases stream,offline --client-procs 2 --repeats 3
  pairs=()
  for i in $(seq 1 "${ROUNDS:-2}"); do pairs+=(--pair "rate4_$i" "$out/serve_rate4_old_$i.json" "$out/serve_rate4_new_$i.json"); done
  python3 benchmarks/serve_ab.py "${pairs[@]}" --out "$out/serve_rate4_ab_${tag}.json"
fi

if [ "$part" = servetrace ]; then
  # serve_trace_h200.json (its "rate4" and "saturated" runs): serve.py --trace-dir below saturation (serve_rate4's
  # workload), then saturated
  timeout 120 python3 benchmarks/serve.py --shape llama-3.2-1b --num-prompts 64 --input-len 512 --output-len 256 \
    --request-rate 4 --phases stream,offline --client-procs 2 --trace-dir "$out/trace4" --out "$out/serve_trace4.json" \
    2>&1 | grep -v -i warn | tail -2
  timeout 200 python3 benchmarks/serve.py --shape llama-3.2-1b --num-prompts 256 --input-len 512 --output-len 256 \
    --client-procs 4 --phases stream,plain,offline --trace-dir "$out/trace" --out "$out/serve_trace_sat.json" 2>&1 |
    grep -v -i warn | tail -3
fi

if [ "$part" = parserab ]; then
  for parser in h11 httptools; do
    timeout 150 python3 benchmarks/serve.py --shape llama-3.2-1b --num-prompts 256 --input-len 512 --output-len 256 \
      --phases stream,plain,offline --client-procs 4 --repeats 3 --engine-args="--http-parser $parser" \
      --out "$out/serve_$parser.json" 2>&1 | grep -v -i warn | tail -3
  done
fi

if [ "$part" = apiservers ]; then
  # issue 18: the saturated workload served by 4 API server processes (miniserve serve --api-servers 4), beside
  # the offline engine in the same run
  timeout 300 python3 benchmarks/serve.py --shape llama-3.2-1b --num-prompts 256 --input-len 512 --output-len 256 \
    --phases stream,plain,offline --client-procs 4 --engine-args="--api-servers 4" --repeats 3 \
    --out "$out/serve_api4_${tag}.json" 2>&1 | grep -v -i warn | tail -6
fi

if [ "$part" = apisweep ]; then
  # how many API server processes the saturated workload needs: 2 and 8 (4: `apiservers`), each beside offline
  for n in 2 8; do
    timeout 200 python3 benchmarks/serve.py --shape llama-3.2-1b --num-prompts 256 --input-len 512 --output-len 256 \
      --phases stream,plain,offline --client-procs 4 --engine-args="--api-servers $n" \
      --out "$out/serve_api${n}_${tag}.json" 2>&1 | grep -v -i warn | tail -5
  done
fi

if [ "$part" = fp8reg ]; then
  # The FP8 decode variants of benchmarks/results/decode_attention_fp8_registers.md (offline compiler analysis):
  # every code through each decode mode first, then the GPU time of each FP8_VARIANTS entry at the tune shapes,
  # with bit-identity to the default (each row printed as it is measured: a timeout keeps the rows so far)
  timeout 60 python3 benchmarks/gpu_kernels.py --checks fp8_page_decode \
    --out "$out/kernel_checks_fp8_page_decode_${tag}.json" 2>&1 | grep -v -i warn | tail -3
  timeout "${FP8REG_TIMEOUT:-400}" python3 benchmarks/tune_decode_attention.py --fp8-variants \
    --out "$out/decode_attention_fp8_variants_${tag}.json" 2>&1 | grep -v -i warn > "$out/fp8_variants_log.txt"
  grep -v '^{' "$out/fp8_variants_log.txt" | tail -60
fi

if [ "$part" = fp8decode ]; then
  # EngineConfig.fp8_decode="hw-staged" end to end (demo model, FP8 pool, graphs) against the exact default
  timeout 120 python3 benchmarks/fp8_decode_check.py --out "$out/fp8_decode_check_${tag}.json" 2>&1 | grep -v -i warn | tail -2
fi

if [ "$part" = nano ]; then
  nano_runs
fi

if [ "$part" = serveprof ]; then
  # the saturated streaming run with both server processes under cProfile (slower: for where the time goes)
  timeout 200 python3 benchmarks/serve.py --shape llama-3.2-1b --num-prompts 256 --input-len 512 --output-len 256 \
    --phases stream --client-procs 4 --profile-dir "$out/serve_profile" --out "$out/serve_profile/serve.json" 2>&1 |
    grep -v -i warn | tail -3
  for f in engine api; do
    python3 -c "import pstats; pstats.Stats('$out/serve_profile/$f.prof').sort_stats('tottime').print_stats(45)" \
      > "$out/serve_profile/$f.txt" 2>&1
    python3 -c "import pstats; pstats.Stats('$out/serve_profile/$f.prof').sort_stats('cumtime').print_stats(60)" \
      >> "$out/serve_profile/$f.txt" 2>&1
  done
fi

if [ "$part" = fp8ncu ]; then
  # registers, occupancy, DRAM throughput and issue rate of the default FP8 kernel and the staged variants
  for c in bf16 fp8 "fp8 staged" "fp8 staged w8" "fp8 staged bn64"; do
    echo "## $c"
    timeout 110 ncu --clock-control none -k regex:_decode_split_kernel -c 1 --section SpeedOfLight \
      --section Occupancy --section LaunchStats --section WarpStateStats --section ComputeWorkloadAnalysis \
      python3 benchmarks/tune_decode_attention.py --once "llama-8b b64 ctx4096|$c" 2>&1 |
      grep -E 'Registers Per|Theoretical Occ|Achieved Occ|DRAM Throughput|Duration|Issued Ipc|Block Limit Reg'
  done > "$out/decode_attention_fp8_variants_ncu_${tag}.txt"
  cat "$out/decode_attention_fp8_variants_ncu_${tag}.txt"
fi

if [ "$part" = extendvar ]; then
  # The extend (prefill) kernel's launch variants (benchmarks/results/extend_attention_registers.md; issue 19's
  # 32k-prompt TTFT target): each on a 32k-token prompt in 8192-token chunks and on a 2048-token prompt, against
  # the default launch (extend_attention.launch_config), the launch before it ("plain") and torch SDPA, with
  # bit-identity to the default. extendchecks: every EXTEND_VARIANTS entry against the torch reference (slow: it
  # compiles them all); extendttft: the 32k prefill's TTFT end to end beside one HF SDPA forward.
  timeout 200 python3 benchmarks/tune_extend_attention.py --shapes qwen3-0.6b llama-3.1-8b --caches bf16 fp8 \
    --variants default plain "diag same" "diag fma same" "bm128 w8 diag same r128" "bm128 w8 s3 diag same r128" \
    "pack w8 diag same r128" "pack bm32 diag same" --out "$out/extend_attention_variants_${tag}.json" 2>&1 |
    grep -v -i warn | grep -v "^{" | tail -40
  timeout 80 python3 benchmarks/tune_extend_attention.py --shapes qwen3-0.6b llama-3.2-1b --caches bf16 fp8 \
    --prompt 2048 --chunk 2048 --variants default plain "diag same" "bm128 w8 s3 diag same r128" \
    --out "$out/extend_attention_variants_2048_${tag}.json" 2>&1 | grep -v -i warn | grep -v "^{" | tail -20
fi

if [ "$part" = grammar ]; then
  # issue 14: constrained decoding at batch 32 over a vocabulary with cl100k_base's shares of tokens holding a
  # quote, a newline or a backslash (vocab_shares.json; the mask fill on this host's default threads, and on 1),
  # then the fill alone by every strategy over the JSON-heavy vocabulary and over ones like cl100k_base and gpt2
  # (needs xgrammar: carried as a wheel)
  timeout 240 python3 benchmarks/structured_outputs.py --shape llama-3.2-1b --batch 32 --prompt 128 --gen 256 \
    --vocab-like cl100k_base --grammar-threads 0 8 1 --host-split --out "$out/structured_outputs_cl100k_${tag}.json" 2>&1 |
    grep -v -i warn | tail -12
  timeout 100 python3 benchmarks/grammar_fill.py --batch 32 --steps 96 --threads 2 4 8 16 \
    --out "$out/grammar_fill_${tag}.json" 2>&1 | grep -v -i warn | tail -24
  for like in cl100k_base gpt2; do
    timeout 60 python3 benchmarks/grammar_fill.py --batch 32 --steps 96 --threads 4 8 16 --vocab-like $like \
      --out "$out/grammar_fill_${like%_base}_${tag}.json" 2>&1 | grep -v -i warn | tail -12
  done
fi

if [ "$part" = grammarab ]; then
  # structured_outputs.py (Llama-3.2-1B shape, the cl100k_base-like vocabulary, both schemas, 5 repeats) on an older
  # tree ($OLD) and this one, alternated ROUNDS times; benchmarks/structured_outputs_ab.py joins each round's pair
  alternate so 120 "grep throughput" benchmarks/structured_outputs.py --shape llama-3.2-1b --batch 32 --prompt 128 \
    --gen 256 --repeats 5 --vocab-like cl100k_base
  pairs=()
  for i in $(seq 1 "${ROUNDS:-2}"); do pairs+=(--pair "round_$i" "$out/so_old_$i.json" "$out/so_new_$i.json"); done
  python3 benchmarks/structured_outputs_ab.py "${pairs[@]}" --out "$out/structured_outputs_ab_${tag}.json"
fi

if [ "$part" = grammar8b ]; then
  # issue 14 on the Llama-3.1-8B shape (a decode step of ~5 ms at batch 32: the host's mask fill fits beside it),
  # over the cl100k_base-like vocabulary and the JSON-heavy one
  for like in cl100k_base json-heavy; do
    name=structured_outputs_llama8b${like/#json-heavy/}; name=${name/cl100k_base/_cl100k}
    timeout 200 python3 benchmarks/structured_outputs.py --shape llama-3.1-8b --batch 32 --prompt 128 --gen 256 \
      $([ $like = json-heavy ] || echo --vocab-like $like) --host-split --out "$out/${name}_${tag}.json" 2>&1 |
      grep -v -i warn | tail -6
  done
fi

if [ "$part" = grammar1b ]; then
  # issue 14's Llama-3.2-1B rows of the README's row 15 (strings chained since 0948f77): the cl100k_base-like
  # vocabulary on the default fill threads and on one, then the JSON-heavy vocabulary on the default threads
  timeout 200 python3 benchmarks/structured_outputs.py --shape llama-3.2-1b --batch 32 --prompt 128 --gen 256 \
    --vocab-like cl100k_base --grammar-threads 0 1 --host-split --out "$out/structured_outputs_cl100k_${tag}.json" 2>&1 |
    grep -v -i warn | tail -8
  timeout 200 python3 benchmarks/structured_outputs.py --shape llama-3.2-1b --batch 32 --prompt 128 --gen 256 \
    --grammar-threads 0 --host-split --out "$out/structured_outputs_${tag}.json" 2>&1 | grep -v -i warn | tail -8
fi

if [ "$part" = extendfp8 ]; then
  # FP8 prompt passes at head_dim 64 were slower than bf16's (profile_run_llama1b_b256_h200.json): the default
  # launch against the same with the FP8 kernel's registers capped, at the batch-256 run's chunk (16 prompts of 512
  # tokens: one prompt here, same per-program work) and at 2048, with bit-identity to the default
  for n in 512 2048; do
    timeout 100 python3 benchmarks/tune_extend_attention.py --shapes llama-3.2-1b qwen3-0.6b --caches bf16 fp8 \
      --prompt $n --chunk $n --variants default "diag same r168" "diag same r128" \
      --out "$out/extend_attention_fp8_cap_${n}_${tag}.json" 2>&1 | grep -v -i warn | grep -v "^{" | tail -12
  done
fi

if [ "$part" = extendchecks ]; then
  timeout 400 python3 benchmarks/gpu_kernels.py --checks extend_variants \
    --out "$out/kernel_checks_extendvar_${tag}.json" 2>&1 | grep -v -i warn | tail -4
fi

if [ "$part" = extendttft ]; then
  tp 150 --shape qwen3-0.6b --workload prefill --prompts 4096 16384 32768 --repeats 2 --hf \
    --extend-variant default plain --out "$out/throughput_prefill_qwen3_${tag}.json"
fi

if [ "$part" = profile1b ]; then
  # where a Llama-3.2-1B decode step's GPU time goes (torch profiler over 8 captured steps), at batch 64 and 1
  timeout 80 python3 benchmarks/throughput.py --shape llama-3.2-1b --workload fixed --batch 64 --prompt 512 --gen 64 \
    --repeats 1 --profile --out "$out/profile_decode_llama1b_b64_${tag}.json" 2>&1 | grep -v -i warn | tail -30
  timeout 80 python3 benchmarks/throughput.py --shape llama-3.2-1b --workload latency --gen 64 --repeats 1 --profile \
    --out "$out/profile_decode_llama1b_b1_${tag}.json" 2>&1 | grep -v -i warn | tail -30
  # whole runs (prompt passes included) at the sweep's two largest batches, bf16 and fp8: GPU time per kernel
  for b in 256 128; do
    timeout 200 python3 benchmarks/throughput.py --shape llama-3.2-1b --workload fixed --batch $b --prompt 512 --gen 64 \
      --kv-cache-dtype auto fp8 --repeats 1 --profile --profile-run --out "$out/profile_run_llama1b_b${b}_${tag}.json" \
      2>&1 | grep -v -i warn | grep -E "rror" | head -3
  done
fi

if [ "$part" = firststeps ]; then
  # what a new server's first 256-request burst pays once (Triton compiles, first launches), this tree and $OLD's,
  # each with an empty Triton cache; joined into first_steps_h200.json
  timeout 150 python3 benchmarks/first_steps.py --out "$out/first_steps_new.json" 2>&1 | grep -v -i warn | tail -2
  MINISERVE_COMMIT="${OLD_COMMIT:-323fe05}" timeout 150 python3 benchmarks/first_steps.py --repo "$OLD" \
    --out "$out/first_steps_old.json" 2>&1 | grep -v -i warn | tail -2
fi

if [ "$part" = splits ]; then
  tp 150 --shape llama-3.2-1b --workload latency --gen 256 --repeats 3 --hf --decode-splits by-length by-batch \
    --out "$out/throughput_latency_llama1b_${tag}.json"
  tp 150 --shape llama-3.2-1b --workload fixed --batch 64 --prompt 512 --gen 256 --kv-cache-dtype auto fp8 --repeats 2 \
    --decode-splits by-length by-batch --out "$out/throughput_fixed_llama1b_${tag}.json"
  tp 200 --shape qwen3-0.6b --workload nano --kv-cache-dtype auto fp8 --decode-splits by-length by-batch --repeats 2 \
    --out "$out/throughput_nano_splits_${tag}.json"
  tp 240 --shape llama-3.1-8b --workload latency --gen 128 --repeats 2 --decode-splits by-length by-batch \
    --out "$out/throughput_latency_llama8b_${tag}.json"
fi

if [ "$part" = splitsweep ]; then
  timeout 100 python3 benchmarks/tune_decode_attention.py --split-sizes --out "$out/decode_attention_split_sizes_${tag}.json" \
    2>&1 | tail -3
  tp 330 --shape llama-3.2-1b --workload sweep --batches 1 8 32 64 128 256 --prompt 512 --gen 64 --repeats 2 \
    --kv-cache-dtype auto fp8 --decode-splits by-length by-batch --plot "$out/throughput_sweep_llama1b_${tag}.png" \
    --out "$out/throughput_sweep_llama1b_${tag}.json"
fi

if [ "$part" = linear ]; then
  timeout 300 python3 benchmarks/tune_linear.py --gate-up --out "$out/tune_linear_${tag}.json" 2>&1 | grep -v skip | tail -62
  timeout 150 python3 benchmarks/tune_linear.py --shapes --out "$out/tune_linear_gate_up_${tag}.json" 2>&1 | grep -v skip | tail -15
  timeout 100 python3 benchmarks/pdl_chain.py --out "$out/pdl_chain_${tag}.json" 2>&1 | tail -15
  timeout 300 python3 benchmarks/release_point_ab.py --out "$out/release_point_ab_${tag}.json" 2>&1 | tail -1
fi

if [ "$part" = decodeab ]; then
  (cd "$OLD" && MINISERVE_COMMIT="$OLD_COMMIT" timeout 150 python3 "$PWD/benchmarks/decode_ab.py" --tree "$OLD" \
    --save "$out/decode_old.pt" 2>&1 | tail -1)
  timeout 150 python3 benchmarks/decode_ab.py --save "$out/decode_new.pt" --compare "$out/decode_old.pt" \
    --old-commit "$OLD_COMMIT" --out "$out/decode_ab_${tag}.json" 2>&1 | tail -21
fi

# tree_ab PART FILE: batch-1 latency and batch 64 (1B), then nano alternated twice, older tree first;
# benchmarks/engine_ab.py joins them into FILE
tree_ab() {
  [ -e "$OLD/miniserve/demo_models" ] || ln -s "$PWD/miniserve/demo_models" "$OLD/miniserve/demo_models"
  for tree in "$OLD" "$PWD"; do
    side=$([ "$tree" = "$PWD" ] && echo new || echo old)
    commit=$(tree_commit "$tree")  # before the cd: tree_commit tells the trees apart by $PWD
    (cd "$tree" && MINISERVE_COMMIT="$commit" PYTHONPATH="$tree:${PYTHONPATH:-}" tp 130 \
      --shape llama-3.2-1b --workload latency --gen 256 --repeats 3 --decode-splits by-length by-batch \
      --out "$out/throughput_${side}_latency.json")
    (cd "$tree" && MINISERVE_COMMIT="$commit" PYTHONPATH="$tree:${PYTHONPATH:-}" tp 70 \
      --shape llama-3.2-1b --workload fixed --batch 64 --prompt 512 --gen 256 --kv-cache-dtype auto fp8 --repeats 2 \
      --out "$out/throughput_${side}_fixed.json")
  done
  for i in 1 2; do
    for tree in "$OLD" "$PWD"; do
      side=$([ "$tree" = "$PWD" ] && echo new || echo old)
      commit=$(tree_commit "$tree")
      (cd "$tree" && MINISERVE_COMMIT="$commit" PYTHONPATH="$tree:${PYTHONPATH:-}" tp 60 \
        --shape qwen3-0.6b --workload nano --kv-cache-dtype auto fp8 --repeats 1 --out "$out/throughput_${side}_nano_round$i.json")
    done
  done
  python3 benchmarks/engine_ab.py "$out" --part "$1" --out "$out/$2"
}

if [ "$part" = ropeab ]; then
  tree_ab ropeab engine_ab_${tag}.json  # RoPE moved into the KV write
fi

if [ "$part" = qknormab ]; then
  # Qwen3's q_norm and k_norm in one launch (layer_ops.qk_rms_norm): nano and Qwen3-0.6B batch 1, the older tree and
  # this one alternated over three rounds
  [ -e "$OLD/miniserve/demo_models" ] || ln -s "$PWD/miniserve/demo_models" "$OLD/miniserve/demo_models"
  for i in 1 2 3; do
    for tree in "$OLD" "$PWD"; do
      side=$([ "$tree" = "$PWD" ] && echo new || echo old)
      commit=$(tree_commit "$tree")
      (cd "$tree" && MINISERVE_COMMIT="$commit" PYTHONPATH="$tree:${PYTHONPATH:-}" tp 90 \
        --shape qwen3-0.6b --workload nano --kv-cache-dtype auto fp8 --repeats 1 --out "$out/throughput_${side}_nano_round$i.json")
      (cd "$tree" && MINISERVE_COMMIT="$commit" PYTHONPATH="$tree:${PYTHONPATH:-}" tp 60 \
        --shape qwen3-0.6b --workload latency --gen 256 --repeats 3 --out "$out/throughput_${side}_latency_round$i.json")
    done
  done
  python3 benchmarks/engine_ab.py "$out" --part qknormab --out "$out/qk_norm_ab_${tag}.json"
fi

if [ "$part" = mlpab ]; then
  tree_ab mlpab mlp_silu_ab_${tag}.json  # gate/up with the SiLU·mul in its epilogue (linear_silu_and_mul)
fi

if [ "$part" = pairs ]; then
  # the FP8 V read in byte pairs (decode_attention.pv_by_pairs, "auto" on NVIDIA): its conversion of every word,
  # decode against extend and the references, its speed and float64 error beside the byte read ("hw"), the engine
  timeout 150 python3 benchmarks/gpu_kernels.py --checks fp8_page_decode fp8_pair_decode attention_vs_reference \
    decode_vs_extend --out "$out/kernel_checks_fp8_pairs_${tag}.json" 2>&1 | grep -v -i warn | tail -8
  timeout 200 python3 benchmarks/tune_decode_attention.py --fp8-variants --variants default hw staged \
    'pairs r128' 'pairs uncapped' 'pairs s3' --out "$out/decode_attention_fp8_pairs_${tag}.json" 2>&1 | grep -v -i warn | tail -30
  OUT="$out" timeout 220 python3 benchmarks/gpu_engine_check.py > "$out/engine_check.log" 2>&1
  grep -E '"equal|identical|agree' "$out/engine_check.log" | sort | uniq -c | head -20
fi

if [ "$part" = pairsab ]; then
  # end to end: each FP8 run with the pair read (default) and the byte read ("hw"), in one process, bf16 beside
  tp 220 --shape qwen3-0.6b --workload nano --kv-cache-dtype auto fp8 --decode-variant default hw --repeats 2 \
    --out "$out/throughput_nano_pairs_${tag}.json"
  tp 120 --shape llama-3.2-1b --workload fixed --batch 64 --prompt 512 --gen 256 --kv-cache-dtype auto fp8 \
    --decode-variant default hw --repeats 2 --out "$out/throughput_fixed_llama1b_pairs_${tag}.json"
  tp 220 --shape llama-3.1-8b --workload fixed --batch 64 --prompt 512 --gen 128 --kv-cache-dtype auto fp8 \
    --decode-variant default hw --repeats 1 --out "$out/throughput_fixed_llama8b_pairs_${tag}.json"
fi

if [ "$part" = smallkernels ]; then
  timeout 90 python3 benchmarks/tune_small_kernels.py --out "$out/tune_small_kernels_${tag}.json" 2>&1 | tail -16
fi

if [ "$part" = dependentab ]; then
  # EngineConfig.dependent_launch: each workload with it on (auto) and off in one process, batch-1 latency twice in
  # both orders; benchmarks/engine_ab.py --setting joins them (dependent_launch_h200.json)
  tp 150 --shape llama-3.2-1b --workload latency --gen 256 --repeats 3 --dependent-launch auto off \
    --out "$out/throughput_setting_latency_1.json"
  tp 150 --shape llama-3.2-1b --workload latency --gen 256 --repeats 3 --dependent-launch off auto \
    --out "$out/throughput_setting_latency_2.json"
  [ -n "${SKIP_8B:-}" ] || tp 300 --shape llama-3.1-8b --workload latency --gen 128 --repeats 2 --dependent-launch auto off \
    --out "$out/throughput_setting_latency_llama8b.json"
  tp 150 --shape llama-3.2-1b --workload fixed --batch 64 --prompt 512 --gen 256 --kv-cache-dtype auto fp8 --repeats 2 \
    --dependent-launch auto off --out "$out/throughput_setting_fixed.json"
  tp 200 --shape qwen3-0.6b --workload nano --kv-cache-dtype auto fp8 --repeats 1 --dependent-launch auto off \
    --out "$out/throughput_setting_nano.json"
  python3 benchmarks/engine_ab.py "$out" --setting dependent_launch --out "$out/dependent_launch_${tag}.json"
fi
