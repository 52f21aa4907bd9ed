#!/usr/bin/env bash
# optimum's ORTModelForCausalLM on moe-export decoder folders, in its own venv (optimum-onnx pins
# transformers < 4.58). Exports GOAT, MoLA and MixLoRA samples (merge threshold 0.9), takes the torch
# reference's greedy tokens from `moe-export generate --runtime torch`, and checks optimum generates them.
# goat:int4 is the GOAT export with --quantize int4: its expected tokens come from our own ORT loop on the same
# file (`--runtime onnxruntime`: the deployed int8-activation kernels; the torch reference has fp32 activations).
# The real-config bases' samples (issue 24: Mistral's sliding window 16, Qwen2's per-layer window, Llama 3's rope
# scaling) generate from a 40-token prompt, longer than the window, so it masks on every step.
# goat:contrib is the `--fusion contrib` decoder (GroupQueryAttention rotating q and k itself: samples/goat's heads
# are 16 wide), against the torch reference's tokens.
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
prompt=5,17,42,9,100
long_prompt=$(python -c "print(','.join(str(4 + (37 * i + 11) % 250) for i in range(40)))")
real_configs="goat_mistral:real mixlora_qwen2:real moe_peft_mola_llama3:real"
status=0
for spec in ${MOE_EXPORT_OPTIMUM_SAMPLES:-goat mola mixlora goat:int4 goat:contrib $real_configs}; do
    sample=${spec%%:*}
    variant=$([ "$spec" != "$sample" ] && echo "${spec#*:}" || true)
    out=$work/${sample}${variant:+-$variant}
    runtime=torch
    ids=$prompt
    options=(--merge-threshold 0.9)
    if [ "$variant" = real ]; then ids=$long_prompt; options=();
    elif [ "$variant" = contrib ]; then options+=(--fusion contrib);
    elif [ -n "$variant" ]; then options+=(--quantize "$variant"); runtime=onnxruntime; fi
    moe-export onnx "samples/$sample" -o "$out" --no-validate "${options[@]}" --json > /dev/null
    expect=$(moe-export generate "$out" --prompt-ids "$ids" --max-new-tokens 12 --runtime $runtime --json \
        | python -c "import json,sys; print(','.join(map(str, json.load(sys.stdin)['tokens'])))")
    eos=$(python -c "import json,sys; e=json.load(open('$out/genai_config.json'))['model']['eos_token_id']; print(','.join(map(str, e if isinstance(e, list) else [e])))")
    "$venv/bin/python" benchmarks/optimum_check.py "$out" --prompt-ids "$ids" --expect "$expect" --eos "$eos" || status=1
done
exit $status
