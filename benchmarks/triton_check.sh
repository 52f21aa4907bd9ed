#!/usr/bin/env bash
# A real Triton Inference Server on 127.0.0.1 serving `moe-export triton` repositories (python backend):
# scoring logits vs local ORT, generation vs the torch reference's greedy tokens, 8 concurrent clients x 20
# requests, every config.pbtxt parsed into ModelConfig, clean shutdown. nvidia-pytriton (bundled
# tritonserver + python backend) and tritonclient need numpy<2, so they get their own venv.
#   bash benchmarks/triton_check.sh [WORK_DIR]     (run from the repo root with the project's venv active)
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-/tmp/moe-export-triton}
venv=$work/venv
mkdir -p "$work"
start=$SECONDS
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet "nvidia-pytriton==0.7.*" "tritonclient[http,grpc]" "numpy<2" onnxruntime
fi
echo "venv ready after $((SECONDS - start)) s"

# A stateless scoring export (dynamic batching) and a KV-cache decoder (decoder-step + generation models).
moe-export onnx samples/goat -o "$work/goat-score" --no-kv-cache --no-validate --json > /dev/null
moe-export onnx samples/goat -o "$work/goat-kv" --merge-threshold 0.9 --no-validate --json > /dev/null
moe-export triton "$work/goat-score" -o "$work/repo-score" --name goat_score --backend python --json > /dev/null
moe-export triton "$work/goat-kv" -o "$work/repo-kv" --name goat --backend python --instances 2 --json > /dev/null
# Configs that this server cannot load (no onnxruntime backend, no GPU) are still parsed and checked.
moe-export triton "$work/goat-score" -o "$work/repo-ort" --name goat_ort --json > /dev/null
moe-export triton "$work/goat-kv" -o "$work/repo-ort-kv" --name goat_kv_ort --device gpu --json > /dev/null
rm -rf "$work/goat-trt" && cp -r "$work/goat-kv" "$work/goat-trt"
printf 'not a real engine: only its config is checked\n' > "$work/goat-trt/model.engine"
echo '{"engine": "model.engine"}' > "$work/goat-trt/engine.json"
moe-export triton "$work/goat-trt" -o "$work/repo-trt" --name goat_t --device gpu --json > /dev/null

# The torch reference's greedy tokens (an independent implementation of the decoder).
expect=$work/expected.json
python - "$work/goat-kv" "$expect" <<'PY'
import json, subprocess, sys
prompts = [[5, 17, 42, 9, 100], [1, 2, 3], [200, 7, 7, 7, 31, 64, 12, 90]]
out = []
for p in prompts:
    res = subprocess.run(["moe-export", "generate", sys.argv[1], "--prompt-ids", ",".join(map(str, p)),
                          "--max-new-tokens", "12", "--runtime", "torch", "--json"], check=True,
                         capture_output=True, text=True)
    out.append({"prompt": p, "tokens": json.loads(res.stdout)["tokens"], "max_new_tokens": 12})
json.dump(out, open(sys.argv[2], "w"))
PY

# A pyenv-built Python: the backend stub must find this Python's libpython, not the system's.
pylib=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))")
export LD_LIBRARY_PATH="$pylib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
"$venv/bin/python" benchmarks/triton_check.py --work "$work" \
    --serve "$work/repo-score,$work/repo-kv" --configs "$work/repo-ort,$work/repo-ort-kv,$work/repo-trt" \
    --expect "$expect" --score-model goat_score --step-model goat --generate-model goat_generate
echo "triton check: $((SECONDS - start)) s in all"
