#!/usr/bin/env bash
# A real Triton Inference Server on 127.0.0.1 serving `moe-export triton` repositories (python backend):
# scoring logits vs local ORT, generation vs the torch reference's greedy tokens, 8 concurrent clients x 20
# requests, bad requests refused with 400 and alone, every config.pbtxt parsed into ModelConfig, the backends
# each repository names, clean shutdown. nvidia-pytriton (bundled
# tritonserver + python backend) and tritonclient need numpy<2, so they get their own venv.
#   bash benchmarks/triton_check.sh [WORK_DIR]     (run from the repo root with the project's venv active)
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-/tmp/moe-export-triton}
venv=$work/venv
mkdir -p "$work"
start=$SECONDS
# The venv installs (network-bound) while the exports run (CPU-bound).
if [ ! -x "$venv/bin/python" ]; then
    (python3 -m venv "$venv" && "$venv/bin/pip" install --quiet --no-compile "nvidia-pytriton==0.7.*" \
        "tritonclient[http,grpc]" "numpy<2" onnxruntime) > "$work/venv.log" 2>&1 &
    venv_pid=$!
fi
# Exports (scoring graph + KV-cache decoder), repositories and the torch reference's tokens, one process.
python benchmarks/triton_prepare.py "$work"
echo "exports, repositories and reference tokens ready after $((SECONDS - start)) s"
if [ -n "${venv_pid:-}" ] && ! wait "$venv_pid"; then
    cat "$work/venv.log" >&2
    echo "triton check: creating the server venv failed" >&2
    exit 1
fi
echo "venv ready after $((SECONDS - start)) s"
expect=$work/expected.json

# A pyenv-built Python: the backend stub must find this Python's libpython, not the system's.
pylib=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))")
export LD_LIBRARY_PATH="$pylib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
"$venv/bin/python" benchmarks/triton_check.py --work "$work" \
    --serve "$work/repo-score,$work/repo-kv" --configs "$work/repo-ort,$work/repo-ort-kv,$work/repo-trt" \
    --expect "$expect" --score-model goat_score --step-model goat --generate-model goat_generate \
    --unloadable "$work/repo-ort"
echo "triton check: $((SECONDS - start)) s in all"
