#!/usr/bin/env bash
# optimum's ORTModelForCausalLM on moe-export decoder folders, in its own venv (optimum-onnx pins
# transformers < 4.58). Exports GOAT, MoLA and MixLoRA samples (merge threshold 0.9) and the real-config
# bases' samples (sliding windows, llama3 rope), takes the torch reference's greedy tokens from
# `moe-export generate --runtime torch`, and checks optimum generates them.
#   bash benchmarks/optimum_check.sh [WORK_DIR]     (run from the repo root with the project's venv active)
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-/tmp/moe-export-optimum}
venv=$work/venv
mkdir -p "$work"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet torch==2.13.0  # CPU torch first, as in .ci/run
    "$venv/bin/pip" install --quiet "optimum-onnx>=0.1" onnxruntime
fi
# check SAMPLE PROMPT_IDS [onnx options...]: export, take the reference's tokens, compare optimum's
check() {
    local sample=$1 prompt=$2 out=$work/$1
    shift 2
    moe-export onnx "samples/$sample" -o "$out" --no-validate --json "$@" > /dev/null
    local expect eos
    expect=$(moe-export generate "$out" --prompt-ids "$prompt" --max-new-tokens 12 --runtime torch --json \
        | python -c "import json,sys; print(','.join(map(str, json.load(sys.stdin)['tokens'])))")
    eos=$(python -c "import json,sys; e=json.load(open('$out/genai_config.json'))['model']['eos_token_id']; print(','.join(map(str, e if isinstance(e, list) else [e])))")
    "$venv/bin/python" benchmarks/optimum_check.py "$out" --prompt-ids "$prompt" --expect "$expect" --eos "$eos" || status=1
}
status=0
for sample in goat mola mixlora; do
    check "$sample" 5,17,42,9,100 --merge-threshold 0.9
done
# Real config features (issue 24): Mistral's sliding window 16, Qwen2's per-layer window, Llama 3's rope
# scaling, with a 40-token prompt (longer than the window, so it masks on every step).
long_prompt=$(python -c "print(','.join(str(4 + (37 * i + 11) % 250) for i in range(40)))")
for sample in goat_mistral mixlora_qwen2 moe_peft_mola_llama3; do
    check "$sample" "$long_prompt"
done
exit $status
