"""optimum's ORTModelForCausalLM generates from a moe-export decoder folder: tokens vs the torch reference.

optimum-onnx pins transformers < 4.58, so this runs in its own virtual environment
(benchmarks/optimum_check.sh builds it and the expected tokens); it imports nothing from moe_export.

    python benchmarks/optimum_check.py EXPORT_DIR --prompt-ids 5,17,42 --expect 133,114,... [--eos 2]

Exit 0 when optimum's greedy tokens equal the expected ones (a row may stop early at an EOS), 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export_dir")
    parser.add_argument("--prompt-ids", required=True)
    parser.add_argument("--expect", required=True, help="the reference's new tokens, comma-separated")
    parser.add_argument("--eos", default="", help="EOS ids, comma-separated (optimum stops there)")
    args = parser.parse_args()
    from optimum.onnxruntime import ORTModelForCausalLM

    prompt = [int(t) for t in args.prompt_ids.split(",")]
    expect = [int(t) for t in args.expect.split(",")]
    eos = {int(t) for t in args.eos.split(",") if t}
    model = ORTModelForCausalLM.from_pretrained(args.export_dir, use_cache=True, use_io_binding=False)
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(expect), do_sample=False)
    got = out[0, len(prompt) :].tolist()
    ok = got == expect[: len(got)] and (len(got) == len(expect) or got[-1] in eos)
    print(f"{args.export_dir}: optimum {got} vs reference {expect}: {'OK' if ok else 'MISMATCH'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
