"""The graph interface of an ONNX export: one object per export kind, the one owner of its I/O facts.

Like optimum's `OnnxConfig`, a `GraphInterface` says what the graph takes and returns: input/output names,
dtypes and dims, the past-KV layout and naming pattern, example feeds, TensorRT optimisation-profile
ranges and feeds, and how to complete a caller's token feeds into a full first step. The exporter
traces with it, export.json stores it (`to_dict`), and every consumer (runtimes, validation, generation,
serving, TensorRT, benchmarks) reads it back instead of spelling a name. No other module spells an input or
output name or the past-KV pattern (tests/test_interface.py checks that).

Kinds (docs/export-layout.md):
- `scoring`: input_ids [B,S], attention_mask [B,S] (int64) -> logits [B,S,V].
- `decoder` (the KV-cache decoder that onnxruntime-genai and optimum run): input_ids [B,S], attention_mask
  [B,past+S], position_ids [B,S] (int64), then per layer i past_key_values.{i}.key / .value
  [B, kv_heads, past, head_dim] -> logits, then present.{i}.key / .value [B, kv_heads, past+S, head_dim].
  Keys and values interleave layer by layer on both sides (optimum pairs them by position); kv_heads and
  head_dim are static, batch / sequence / past symbolic; past = 0 is the first step.

`read_onnx_io` is the one reader of an ONNX file's graph inputs and outputs (weights not loaded).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moe_export.errors import FormatError

SCORING, DECODER = "scoring", "decoder"
KINDS = (SCORING, DECODER)
INPUT_IDS, ATTENTION_MASK, POSITION_IDS, LOGITS = "input_ids", "attention_mask", "position_ids", "logits"
PAST_KEY, PAST_VALUE = "past_key_values.{}.key", "past_key_values.{}.value"
PRESENT_KEY, PRESENT_VALUE = "present.{}.key", "present.{}.value"
BATCH, SEQUENCE, PAST_SEQUENCE, TOTAL_SEQUENCE, VOCAB = "batch", "sequence", "past_sequence", "total_sequence", "vocab"
# Example sizes >= 2 on every dynamic dim (torch.export specialises a dim whose example is 1); the past
# length 0 of a first step is then a valid value of the symbolic dim, checked by the tests.
EXAMPLE_BATCH, EXAMPLE_SEQUENCE, EXAMPLE_PAST = 2, 3, 4
# Default TensorRT profile ranges (min, opt, max): axis 0 is the batch, other dynamic axes sequence-like.
DEFAULT_BATCH_RANGE = (1, 1, 8)
DEFAULT_SEQUENCE_RANGE = (1, 128, 512)
NUMPY_DTYPES = {"int64": np.int64, "int32": np.int32, "float32": np.float32, "float16": np.float16, "bool": np.bool_}

Shape = tuple[int, ...]
Feeds = dict[str, np.ndarray]
Range = tuple[int, int, int]


def numpy_dtype(name: str) -> Any:
    """The numpy type of a spec's dtype name (bfloat16 through ml_dtypes, which numpy lacks)."""
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    if name not in NUMPY_DTYPES:
        raise FormatError(f"graph tensor dtype {name!r} is not one of {', '.join([*NUMPY_DTYPES, 'bfloat16'])}")
    return NUMPY_DTYPES[name]


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, numpy-style element type (int64, float32, ...), dims (str: dynamic)."""

    name: str = field(metadata={"help": "graph input/output name"})
    dtype: str = field(metadata={"help": "numpy-style element type, e.g. int64, float32"})
    shape: tuple[int | str, ...] = field(metadata={"help": "dims; strings are dynamic (batch, sequence)"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(self.shape))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: Any, where: str) -> TensorSpec:
        if not isinstance(data, Mapping) or not {"name", "dtype", "shape"} <= set(data):
            raise FormatError(f"{where}: a graph tensor needs name, dtype and shape, got {data!r}"[:300])
        shape = data["shape"]
        if not isinstance(shape, list) or not all(isinstance(d, (int, str)) for d in shape):
            raise FormatError(f"{where}: tensor {data['name']}: shape must be a list of ints and names")
        return cls(str(data["name"]), str(data["dtype"]), tuple(shape))


@dataclass(frozen=True)
class KVLayout:
    """The static part of the cache shape: layers, kv heads, head dim, and the cache's element type."""

    num_layers: int
    kv_heads: int
    head_dim: int
    dtype: str = "float32"

    @classmethod
    def from_config(cls, config: Any, dtype: str = "float32") -> KVLayout:
        heads = int(config.num_attention_heads)
        head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        return cls(int(config.num_hidden_layers), kv_heads, int(head_dim), dtype)

    def past_names(self) -> list[str]:
        return [name.format(i) for i in range(self.num_layers) for name in (PAST_KEY, PAST_VALUE)]

    def present_names(self) -> list[str]:
        return [name.format(i) for i in range(self.num_layers) for name in (PRESENT_KEY, PRESENT_VALUE)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_layers": self.num_layers,
            "kv_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "dtype": self.dtype,
            "past_key": PAST_KEY,
            "past_value": PAST_VALUE,
            "present_key": PRESENT_KEY,
            "present_value": PRESENT_VALUE,
        }

    @classmethod
    def from_dict(cls, data: Any, where: str) -> KVLayout:
        patterns = {
            "past_key": PAST_KEY,
            "past_value": PAST_VALUE,
            "present_key": PRESENT_KEY,
            "present_value": PRESENT_VALUE,
        }
        if not isinstance(data, Mapping):
            raise FormatError(f"{where}: interface.past must be an object")
        for key, want in patterns.items():
            if data.get(key, want) != want:
                raise FormatError(
                    f"{where}: past-KV name pattern {key}={data[key]!r} is not {want!r}; this moe-export cannot run it"
                )
        try:
            return cls(
                int(data["num_layers"]), int(data["kv_heads"]), int(data["head_dim"]), str(data.get("dtype", "float32"))
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise FormatError(f"{where}: interface.past needs integer num_layers, kv_heads, head_dim ({exc})") from None


def position_ids(attention_mask: np.ndarray, past: int = 0) -> np.ndarray:
    """Positions of the last S = mask_len - past tokens: count of attended tokens before each, pads at 1.

    The same rule as transformers' generate and optimum, so right-padded rows continue at their own length.
    """
    mask = np.asarray(attention_mask, dtype=np.int64)
    positions = np.cumsum(mask, axis=-1) - 1
    positions = np.where(mask == 0, 1, positions)
    return positions[:, past:].astype(np.int64)


@dataclass(frozen=True)
class GraphInterface:
    """The inputs and outputs of one export kind, and everything derived from them (see the module doc)."""

    kind: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    past: KVLayout | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise FormatError(f"graph interface kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if (self.kind == DECODER) != (self.past is not None):
            raise FormatError(f"graph interface {self.kind}: a past-KV layout goes with the decoder kind only")
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "outputs", tuple(self.outputs))

    # ---------------------------------------------------------------- the two kinds

    @classmethod
    def scoring(cls, logits_dtype: str = "float32", vocab: int | str = VOCAB) -> GraphInterface:
        tokens = (BATCH, SEQUENCE)
        return cls(
            SCORING,
            (TensorSpec(INPUT_IDS, "int64", tokens), TensorSpec(ATTENTION_MASK, "int64", tokens)),
            (TensorSpec(LOGITS, logits_dtype, (*tokens, vocab)),),
        )

    @classmethod
    def decoder(cls, past: KVLayout, logits_dtype: str = "float32", vocab: int | str = VOCAB) -> GraphInterface:
        tokens = (BATCH, SEQUENCE)
        cache_in = (BATCH, past.kv_heads, PAST_SEQUENCE, past.head_dim)
        cache_out = (BATCH, past.kv_heads, TOTAL_SEQUENCE, past.head_dim)
        inputs = [
            TensorSpec(INPUT_IDS, "int64", tokens),
            TensorSpec(ATTENTION_MASK, "int64", (BATCH, TOTAL_SEQUENCE)),
            TensorSpec(POSITION_IDS, "int64", tokens),
            *[TensorSpec(name, past.dtype, cache_in) for name in past.past_names()],
        ]
        outputs = [
            TensorSpec(LOGITS, logits_dtype, (*tokens, vocab)),
            *[TensorSpec(name, past.dtype, cache_out) for name in past.present_names()],
        ]
        return cls(DECODER, tuple(inputs), tuple(outputs), past)

    @classmethod
    def for_model(cls, config: Any, kv_cache: bool, dtype: str = "float32") -> GraphInterface:
        """The interface an export of a model with this transformers config will have (`dtype`: the weights')."""
        vocab = int(getattr(config, "vocab_size", 0) or 0) or VOCAB
        if not kv_cache:
            return cls.scoring(dtype, vocab)
        return cls.decoder(KVLayout.from_config(config, dtype), dtype, vocab)

    @property
    def is_decoder(self) -> bool:
        return self.kind == DECODER

    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def token_input_names(self) -> list[str]:
        """The inputs a cache-less forward takes (the reference runs the first step without a cache)."""
        cache = set(self.past.past_names()) if self.past else set()
        return [n for n in self.input_names() if n not in cache]

    def past_names(self) -> list[str]:
        return self.past.past_names() if self.past else []

    def present_names(self) -> list[str]:
        return self.past.present_names() if self.past else []

    def with_graph(self, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], where: str) -> GraphInterface:
        """This interface with the specs a traced graph actually has; its names must be ours, in order."""
        got_in, got_out = [t.name for t in inputs], [t.name for t in outputs]
        if got_in != self.input_names() or got_out != self.output_names():
            raise FormatError(
                f"{where}: graph I/O {got_in} -> {got_out} does not follow the {self.kind} interface "
                f"{self.input_names()} -> {self.output_names()}"
            )
        return GraphInterface(self.kind, tuple(inputs), tuple(outputs), self.past)

    # ---------------------------------------------------------------- feeds

    def dynamic_shapes(self) -> dict[str, Any]:
        """torch.onnx.export's dynamic_shapes for the traced module's arguments (the past as one list)."""
        import torch

        dim = torch.export.Dim
        batch, sequence = dim(BATCH), dim(SEQUENCE)
        tokens = {0: batch, 1: sequence}
        if not self.is_decoder:
            return {INPUT_IDS: tokens, ATTENTION_MASK: dict(tokens)}
        assert self.past is not None
        past_len = dim(PAST_SEQUENCE)
        return {
            INPUT_IDS: tokens,
            # past + sequence cannot be written as a derived Dim of one root: torch.export infers the relation.
            ATTENTION_MASK: {0: batch, 1: dim.DYNAMIC},
            POSITION_IDS: dict(tokens),
            "past": [{0: batch, 2: past_len} for _ in range(2 * self.past.num_layers)],
        }

    def example_feeds(
        self, vocab: int, batch: int = EXAMPLE_BATCH, sequence: int = EXAMPLE_SEQUENCE, past: int = EXAMPLE_PAST,
        seed: int = 0,
    ) -> Feeds:  # fmt: skip
        """Feeds for one call: random token ids, a full mask, positions after `past` random cached tokens."""
        past = past if self.is_decoder else 0
        return self.feeds_for_shapes(
            {INPUT_IDS: (batch, sequence), ATTENTION_MASK: (batch, past + sequence)}, vocab, seed
        )

    def feeds_for_shapes(self, shapes: Mapping[str, Shape], vocab: int, seed: int = 0) -> Feeds:
        """One consistent call near the given shapes (e.g. a TensorRT profile's opt shapes): the token ids'
        shape rules, the past length is the mask's length minus theirs, and the rest follows from those."""
        rng = np.random.default_rng(seed)
        batch, sequence = shapes[INPUT_IDS]
        total = shapes.get(ATTENTION_MASK, (batch, sequence))[1]
        past = max(total - sequence, 0) if self.is_decoder else 0
        feeds: Feeds = {
            INPUT_IDS: rng.integers(0, max(vocab, 1), size=(batch, sequence), dtype=np.int64),
            ATTENTION_MASK: np.ones((batch, sequence + past), dtype=np.int64),
        }
        if self.is_decoder:
            assert self.past is not None
            feeds[POSITION_IDS] = position_ids(feeds[ATTENTION_MASK], past)
            cache = (batch, self.past.kv_heads, past, self.past.head_dim)
            for name in self.past_names():
                feeds[name] = rng.standard_normal(cache).astype(numpy_dtype(self.past.dtype))
        return feeds

    def complete_feeds(self, feeds: Mapping[str, np.ndarray]) -> Feeds:
        """input_ids (+ attention_mask) -> the full feeds of a first step: positions and an empty past.

        What the caller gave is kept; a scoring interface takes the mask (ones when absent) and nothing more.
        """
        out = dict(feeds)
        if INPUT_IDS not in out:
            raise FormatError(f"feeds {sorted(out)}: no {INPUT_IDS}")
        ids = out[INPUT_IDS]
        mask = out.setdefault(ATTENTION_MASK, np.ones_like(ids, dtype=np.int64))
        if self.is_decoder:
            assert self.past is not None
            out.setdefault(POSITION_IDS, position_ids(mask))
            empty = (ids.shape[0], self.past.kv_heads, 0, self.past.head_dim)
            for name in self.past_names():
                out.setdefault(name, np.zeros(empty, dtype=numpy_dtype(self.past.dtype)))
        return out

    def next_step_feeds(
        self, tokens: np.ndarray, attention_mask: np.ndarray, past: int, previous: Mapping[str, Any]
    ) -> Feeds:
        """A decode step: `tokens` [B] after `past` attended columns, the previous step's presents as the past."""
        mask = np.asarray(attention_mask, dtype=np.int64)
        feeds: Feeds = {
            INPUT_IDS: np.asarray(tokens, dtype=np.int64)[:, None],
            ATTENTION_MASK: mask,
            POSITION_IDS: position_ids(mask, past),
        }
        feeds.update({p: previous[q] for p, q in zip(self.past_names(), self.present_names(), strict=True)})
        return feeds

    logits_name = LOGITS  # the first output of both kinds
    tokens_name = INPUT_IDS
    mask_name = ATTENTION_MASK

    def select(self, feeds: Mapping[str, np.ndarray]) -> Feeds:
        """Only the graph's inputs of `feeds`."""
        return {name: feeds[name] for name in self.input_names() if name in feeds}

    # ---------------------------------------------------------------- TensorRT optimisation profile

    def profile_ranges(
        self, batch: Range = DEFAULT_BATCH_RANGE, sequence: Range = DEFAULT_SEQUENCE_RANGE
    ) -> dict[str, tuple[Shape, Shape, Shape]]:
        """Default (min, opt, max) shape per input: static dims fixed, axis 0 the batch range, others the
        sequence range; for a decoder the past starts at 0 and the mask spans past + new tokens, so at every
        one of min / opt / max the mask length is past + sequence (the opt feeds are one consistent step)."""
        ranges: dict[str, tuple[Shape, Shape, Shape]] = {}
        past_range = (0, sequence[1], sequence[2])
        total_range = tuple(s + p for s, p in zip(sequence, past_range, strict=True))
        for spec in self.inputs:
            axes = []
            for axis, dim in enumerate(spec.shape):
                if isinstance(dim, int) and dim > 0:
                    axes.append((dim, dim, dim))
                elif axis == 0:
                    axes.append(batch)
                elif dim == PAST_SEQUENCE:
                    axes.append(past_range)
                elif dim == TOTAL_SEQUENCE:
                    axes.append(total_range)
                else:
                    axes.append(sequence)
            ranges[spec.name] = tuple(tuple(a[i] for a in axes) for i in range(3))  # type: ignore[assignment]
        return ranges

    def input_shapes(self, batch: int, sequence: int, past: int = 0) -> dict[str, Shape]:
        """Every input's shape for one call of `sequence` new tokens after `past` cached ones (0: scoring)."""
        past = past if self.is_decoder else 0
        sizes = {BATCH: batch, SEQUENCE: sequence, PAST_SEQUENCE: past, TOTAL_SEQUENCE: past + sequence}
        return {t.name: tuple(d if isinstance(d, int) else sizes[d] for d in t.shape) for t in self.inputs}

    # ---------------------------------------------------------------- clients

    def genai_names(self) -> dict[str, dict[str, str]]:
        """The decoder's `inputs` / `outputs` name maps of onnxruntime-genai's genai_config.json."""
        printf = lambda pattern: pattern.replace("{}", "%d")  # noqa: E731  genai formats layer i with %d
        return {
            "inputs": {
                INPUT_IDS: INPUT_IDS,
                ATTENTION_MASK: ATTENTION_MASK,
                POSITION_IDS: POSITION_IDS,
                "past_key_names": printf(PAST_KEY),
                "past_value_names": printf(PAST_VALUE),
            },
            "outputs": {
                LOGITS: LOGITS,
                "present_key_names": printf(PRESENT_KEY),
                "present_value_names": printf(PRESENT_VALUE),
            },
        }

    # ---------------------------------------------------------------- export.json

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "kind": self.kind,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
        }
        if self.past is not None:
            data["past"] = self.past.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Any, where: str) -> GraphInterface:
        if not isinstance(data, Mapping) or data.get("kind") not in KINDS:
            raise FormatError(f"{where}: interface.kind must be one of {', '.join(KINDS)}")
        past = KVLayout.from_dict(data["past"], where) if data.get("past") is not None else None
        specs = {}
        for side in ("inputs", "outputs"):
            if not isinstance(data.get(side), list):
                raise FormatError(f"{where}: interface.{side} must be a list")
            specs[side] = tuple(TensorSpec.from_dict(t, where) for t in data[side])
        expected = cls.decoder(past) if past is not None else cls.scoring()
        return expected.with_graph(specs["inputs"], specs["outputs"], where)

    @classmethod
    def from_legacy(cls, inputs: Sequence[Any], outputs: Sequence[Any], kv_cache: bool, where: str) -> GraphInterface:
        """An export.json written before the interface object (top-level inputs, outputs, kv_cache)."""
        ins = tuple(TensorSpec.from_dict(t, where) for t in inputs)
        outs = tuple(TensorSpec.from_dict(t, where) for t in outputs)
        if not kv_cache:
            return cls.scoring().with_graph(ins, outs, where) if ins else cls.scoring()
        by_name = {t.name: t for t in ins}
        first = by_name.get(PAST_KEY.format(0))
        layers = sum(1 for t in ins if t.name.startswith(PAST_KEY.split("{}")[0])) // 2
        if first is None or len(first.shape) != 4 or not all(isinstance(first.shape[i], int) for i in (1, 3)):
            raise FormatError(f"{where}: an older decoder export without its past shapes; re-export it")
        past = KVLayout(layers, int(first.shape[1]), int(first.shape[3]), first.dtype)
        return cls.decoder(past).with_graph(ins, outs, where)


def read_onnx_io(path: str | Path) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """(inputs, outputs) of an ONNX file's graph, weights not loaded; initializers listed as inputs skipped."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: ONNX model not found")
    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as exc:  # protobuf raises several types for a damaged file
        raise FormatError(
            f"{path}: not a readable ONNX model ({str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__})"
        ) from None
    initializers = {t.name for t in graph.initializer}
    inputs = tuple(_spec(v) for v in graph.input if v.name not in initializers)
    return inputs, tuple(_spec(v) for v in graph.output)


def _spec(value: Any) -> TensorSpec:
    import onnx

    tensor_type = value.type.tensor_type
    if tensor_type.elem_type == onnx.TensorProto.BFLOAT16:
        dtype = "bfloat16"
    elif tensor_type.elem_type:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)).name
    else:
        dtype = "undefined"
    dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor_type.shape.dim)
    return TensorSpec(value.name, dtype, dims)
