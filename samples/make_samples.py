"""Regenerate samples/: a tiny random Llama and one tiny checkpoint per family, deterministically.

    python samples/make_samples.py [OUT_DIR]      (default: the samples/ folder holding this script)

Everything is seeded and built from our own random draws (not transformers' init), so a rerun gives
the same tensors; tests/test_samples.py checks that the committed files equal a fresh run. Each module
in samples/writers/ writes `OUT_DIR/<module name>/` (see samples/writers/__init__.py).
"""

from __future__ import annotations

import importlib
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


def write_base_model(out_dir: Path, seed: int = 7) -> None:
    """Random Llama weights from our own generator: N(0, 1/D_in) linears, N(0, 1) embeddings, unit norms."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(llama_config()).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif "embed_tokens" in name:
                param.copy_(torch.randn(param.shape, generator=g))
            else:
                param.copy_(torch.randn(param.shape, generator=g) / param.shape[1] ** 0.5)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    write_tokenizer(out_dir)


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
    """Write the base model and every family sample under `out_root`; returns the directories written."""
    out_root.mkdir(parents=True, exist_ok=True)
    written = [BASE_NAME]
    _replace_dir(out_root / BASE_NAME, write_base_model)
    for name in writer_names():
        module = importlib.import_module(f"samples.writers.{name}")
        _replace_dir(out_root / name, lambda d, m=module: m.write(d, out_root / BASE_NAME))
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
