"""Regenerate samples/: tiny random Llama, Mistral and Qwen2 bases and tiny checkpoints, deterministically.

    python samples/make_samples.py [OUT_DIR]      (default: the samples/ folder holding this script)

Everything is seeded and built from our own random draws (not transformers' init), so a rerun gives
the same tensors; tests/test_samples.py checks that the committed files equal a fresh run. Each module
in samples/writers/ writes `OUT_DIR/<module name>/` over the base its `BASE` names (see
samples/writers/__init__.py). The Mistral, Qwen2 and Llama-3 bases are smaller than the Llama one (hidden 32):
they exist to prove the architectures with their real config features (Mistral's sliding window, Qwen2's
per-layer sliding window, Llama 3's rope scaling), the Llama one also feeds the larger family tests.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import shutil
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
BASE_NAME = "tiny-llama"
SENTENCES = (
    "the quick brown fox jumps over the lazy dog",
    "mixture of lora experts routes every token to a few low rank adapters",
    "a router picks the top k experts and their weights sum to one",
    "export the model to onnx and run it with onnx runtime or tensorrt",
    "merge the static experts into the base weights when the router is constant",
    "hello world, this is a tiny tokenizer for tests.",
)


def llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )


def _small(config_cls, **extra):
    """The shape shared by the Mistral and Qwen2 bases: hidden 32, 2 layers, GQA 4/2, vocab 256."""
    return config_cls(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        **extra,
    )


# Shorter than the tests' prompts (40 tokens in the generation tests, 33 in the export's parity check), so
# the window masks something.
SLIDING_WINDOW = 16


def mistral_config():
    from transformers import MistralConfig

    # Mistral 7B v0.1 (and what was fine-tuned from it) attends over a sliding window (4096 of a 32k context).
    return _small(MistralConfig, sliding_window=SLIDING_WINDOW, tie_word_embeddings=False)


def qwen2_config():
    from transformers import Qwen2Config

    # Qwen2: q/k/v projections carry biases (always, in transformers' Qwen2), small models tie lm_head to
    # the input embeddings. With use_sliding_window, layers from max_window_layers on use the window: layer 0
    # full attention, layer 1 sliding, so both masks are in the graph.
    return _small(
        Qwen2Config, tie_word_embeddings=True, use_sliding_window=True, sliding_window=SLIDING_WINDOW, max_window_layers=1
    )


def llama3_config():
    from transformers import LlamaConfig

    # Llama 3.1's rope: theta 500000 and `llama3` frequency scaling (factor 8, low/high frequency factors 1 and 4);
    # its original context (8192 of 131072) scaled down so that most rotary frequencies are rescaled here too.
    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    }
    return _small(LlamaConfig, tie_word_embeddings=False, rope_parameters=rope)


# directory name -> (config factory, seed)
BASES = {
    BASE_NAME: (llama_config, 7),
    "tiny-mistral": (mistral_config, 8),
    "tiny-qwen2": (qwen2_config, 9),
    "tiny-llama3": (llama3_config, 10),
}


def write_base_model(out_dir: Path, seed: int = 7, config_fn=llama_config) -> None:
    """Random weights from our own generator: N(0, 1/D_in) linears, N(0, 1) embeddings, unit norms,
    N(0, 0.2^2) biases (Qwen2's q/k/v). Tied weights are one parameter: drawn once."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config_fn()).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif "embed_tokens" in name:
                param.copy_(torch.randn(param.shape, generator=g))
            elif name.endswith(".bias"):
                param.copy_(torch.randn(param.shape, generator=g) * 0.2)
            else:
                param.copy_(torch.randn(param.shape, generator=g) / param.shape[1] ** 0.5)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    write_hub_style_config(out_dir / "config.json")
    write_tokenizer(out_dir)


def write_hub_style_config(path: Path) -> None:
    """config.json spelled as the hub's files of these models are (what users' caches hold): `rope_theta` and
    `rope_scaling` (transformers 5 writes `rope_parameters`), and no `layer_types` where transformers derives them
    (Qwen2: from use_sliding_window / max_window_layers). transformers 5 reads this spelling back unchanged."""
    config = json.loads(path.read_text())
    rope = dict(config.pop("rope_parameters", None) or {})
    config["rope_theta"] = rope.pop("rope_theta", 10000.0)
    config["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None
    if config.get("model_type") == "qwen2":
        config.pop("layer_types", None)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_tokenizer(out_dir: Path) -> None:
    """A BPE tokenizer trained offline on a few built-in sentences, loadable with AutoTokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3, matching llama_config()
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(list(SENTENCES), trainer=trainer)
    assert tok.get_vocab_size() <= llama_config().vocab_size
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.save_pretrained(str(out_dir))


def writer_names() -> list[str]:
    import samples.writers

    return sorted(m.name for m in pkgutil.iter_modules(samples.writers.__path__) if not m.name.startswith("_"))


def make_samples(out_root: Path) -> list[str]:
    """Write the base models and every family sample under `out_root`; returns the directories written."""
    out_root.mkdir(parents=True, exist_ok=True)
    written = []
    for base, (config_fn, seed) in BASES.items():
        _replace_dir(out_root / base, lambda d, c=config_fn, s=seed: write_base_model(d, s, c))
        written.append(base)
    for name in writer_names():
        module = importlib.import_module(f"samples.writers.{name}")
        base_dir = out_root / getattr(module, "BASE", BASE_NAME)
        _replace_dir(out_root / name, lambda d, m=module, b=base_dir: m.write(d, b))
        written.append(name)
    return written


def _replace_dir(target: Path, build) -> None:
    """Build into a temporary sibling, then swap it in: a failed writer leaves the old directory intact."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def main(argv: list[str]) -> None:
    out_root = Path(argv[0]).resolve() if argv else HERE
    for name in make_samples(out_root):
        size = sum(f.stat().st_size for f in (out_root / name).rglob("*") if f.is_file())
        print(f"{out_root / name}  {size / 1024:.0f} KiB")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))  # so `samples.writers` imports when run as a script
    main(sys.argv[1:])
