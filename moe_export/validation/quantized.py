"""Parity for a quantized export (`onnx --quantize`), split in two honest halves.

(a) The export's arithmetic: the export is compared, at the fp32 tolerance, with the PyTorch reference whose
    base linears carry the export's *dequantized* weights (runtimes/torch_runner.py, base_weights="export").
    The export runs as a copy whose MatMulNBits nodes compute at accuracy level 0 (fp32 activations, the same
    dequantized weights): level 4, the deployed kernel, also rounds the activations to int8 per block, which
    is part of the quantization's cost, not an arithmetic error. A wrong expert, router or graph fails here.
(b) The quantization's cost: the export as deployed (level 4) against the fp32 reference with the checkpoint's
    own weights, on held-out text: relative logits error, top-1 agreement, perplexity of both. Reported, and a
    gate only when asked (`--max-top1-drop D`: fail when more than a fraction D of positions change argmax).
"""

from __future__ import annotations

import math
import shutil
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from moe_export.export.manifest import MANIFEST_NAME, Artifact
from moe_export.export.quantize import EXACT_ACCURACY_LEVEL, with_accuracy_level
from moe_export.runtimes.registry import RunnerOptions

HELDOUT_SAMPLES = 8
HELDOUT_SEQ_LEN = 64


def exact_arithmetic_artifact(artifact: Artifact) -> Artifact:
    """`artifact` itself, or for a quantized export a copy in a temporary directory whose MatMulNBits nodes
    compute in fp32 (accuracy level 0). The copy is removed when the returned Artifact is garbage collected."""
    if artifact.manifest.quant_scheme is None:
        return artifact
    import onnx

    holder = tempfile.TemporaryDirectory(prefix="moe-export-exact-")
    tmp = Path(holder.name)
    proto = with_accuracy_level(onnx.load(str(artifact.onnx_path)), EXACT_ACCURACY_LEVEL)
    manifest = replace(artifact.manifest)  # source paths are already absolute (Artifact.open)
    external = manifest.external_data is not None
    onnx.save_model(proto, str(tmp / manifest.model_file), save_as_external_data=external,
                    all_tensors_to_one_file=True, location=manifest.external_data)  # fmt: skip
    for name in manifest.copied_files:
        if (artifact.path / name).is_file():
            shutil.copy2(artifact.path / name, tmp / name)
    manifest.relative_sources = {}
    manifest.save(tmp)
    copy = Artifact(tmp, manifest)
    copy._tmp_holder = holder  # type: ignore[attr-defined]  # the directory lives as long as the copy
    assert (tmp / MANIFEST_NAME).is_file()
    return copy


@dataclass
class QuantizationCost:
    """What quantizing the base weights costs, measured against the fp32 reference on held-out text."""

    scheme: str
    source: str  # builtin text, a file, or random tokens (base without tokenizer)
    tokens: int
    logits_rel_error: float  # ||q - ref|| / ||ref|| over all held-out logits
    max_abs_error: float
    top1_agreement: float
    perplexity_reference: float
    perplexity_quantized: float
    max_top1_drop: float | None = None  # the gate, when asked

    @property
    def top1_drop(self) -> float:
        return 1.0 - self.top1_agreement

    @property
    def passed(self) -> bool:
        return self.max_top1_drop is None or self.top1_drop <= self.max_top1_drop

    @property
    def message(self) -> str:
        return (
            f"{self.scheme} vs fp32 reference on {self.tokens} held-out tokens ({self.source}): top-1 agreement "
            f"{self.top1_agreement:.1%}, logits rel. error {self.logits_rel_error:.3g}, perplexity "
            f"{self.perplexity_reference:.4g} -> {self.perplexity_quantized:.4g}"
            + (f"; gate top-1 drop <= {self.max_top1_drop:.3g}" if self.max_top1_drop is not None else "")
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "top1_drop": self.top1_drop, "passed": self.passed}


def heldout_inputs(
    artifact: Artifact, samples: int = HELDOUT_SAMPLES, seq_len: int = HELDOUT_SEQ_LEN
) -> tuple[list[np.ndarray], str]:
    """Held-out token ids ([1, L] each): the merge's held-out split of the built-in text (random tokens
    when the base has no tokenizer)."""
    from moe_export.merging.calibration_data import CalibrationSet, calibration_inputs

    # calibration_inputs reads only the base path and, given `vocab`, nothing of the model.
    source = SimpleNamespace(base_model_path=Path(artifact.manifest.base_model), model=None)
    ids, where = calibration_inputs(
        source,  # type: ignore[arg-type]
        CalibrationSet(samples=samples, seq_len=seq_len),
        split="heldout",
        vocab=artifact.vocab_size(),
    )
    return [t.numpy() for t in ids if t.shape[1] >= 2], where


def quantization_cost(
    artifact: Artifact, options: RunnerOptions, max_top1_drop: float | None = None
) -> QuantizationCost:
    """(b) of the module docstring: the deployed export vs the fp32 reference with the original weights."""
    from moe_export.runtimes.onnxruntime import runner_for_artifact
    from moe_export.runtimes.torch_runner import TorchRunner, reference_model_loader

    scheme = artifact.manifest.quant_scheme
    assert scheme is not None
    samples, source = heldout_inputs(artifact)
    interface = artifact.interface
    feeds = [interface.complete_feeds({interface.tokens_name: ids}) for ids in samples]
    loader = reference_model_loader(artifact, "fp32", base_weights="original")
    reference = TorchRunner(loader, threads=options.threads, interface=interface)
    with reference:
        expected = [reference.infer(f)[interface.logits_name] for f in feeds]
    with runner_for_artifact(artifact, options) as runner:
        got = [runner.infer(f)[interface.logits_name] for f in feeds]
    diff_sq = ref_sq = max_abs = 0.0
    agree = tokens = 0
    nll_ref = nll_q = 0.0
    predicted = 0
    for ids, ref, q in zip(samples, expected, got, strict=True):
        ref, q = ref.astype(np.float64), q.astype(np.float64)
        diff_sq += float(((q - ref) ** 2).sum())
        ref_sq += float((ref**2).sum())
        max_abs = max(max_abs, float(np.abs(q - ref).max()))
        agree += int((q.argmax(-1) == ref.argmax(-1)).sum())
        tokens += ids.size
        nll_ref += _nll(ref[0, :-1], ids[0, 1:])
        nll_q += _nll(q[0, :-1], ids[0, 1:])
        predicted += ids.shape[1] - 1
    return QuantizationCost(
        scheme=scheme.scheme,
        source=source,
        tokens=tokens,
        logits_rel_error=math.sqrt(diff_sq / ref_sq) if ref_sq > 0 else 0.0,
        max_abs_error=max_abs,
        top1_agreement=agree / tokens,
        perplexity_reference=math.exp(nll_ref / predicted),
        perplexity_quantized=math.exp(nll_q / predicted),
        max_top1_drop=max_top1_drop,
    )


def _nll(logits: np.ndarray, targets: np.ndarray) -> float:
    """Summed next-token negative log-likelihood ([L, V] logits, [L] targets), in fp64."""
    top = logits.max(-1, keepdims=True)
    logz = np.log(np.exp(logits - top).sum(-1)) + top[:, 0]
    return float((logz - logits[np.arange(len(targets)), targets]).sum())
