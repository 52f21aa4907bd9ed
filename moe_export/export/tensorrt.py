"""Build a TensorRT engine from a `moe-export onnx` directory: strongly typed, plugin or function-body path.

TensorRT 11 has no precision flags: the network is created STRONGLY_TYPED and every tensor keeps the
ONNX file's dtype (export with `--dtype fp16` for an fp16 engine). The ONNX parser maps each
`moe_export::GroupedLoRA` node to the QDP plugin when it is registered (the node carries
`plugin_namespace`), else imports the node's model-local function body (docs/op-contract.md, "TensorRT").

    --plugin off   parse with the plugin unregistered: the dense function body, standard layers only
    --plugin on    register the AOT plugin (Triton PTX inside the engine; no Python needed to run it)
    --plugin auto  build both, time both at the profile's opt shape, keep the faster and record why

`tensorrt` is imported inside the functions only, so this module imports on any machine.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moe_export import __version__
from moe_export.errors import ExportError, FormatError, MoeExportError, RuntimeUnavailableError
from moe_export.export.interface import DEFAULT_SEQUENCE_RANGE, INPUT_IDS, GraphInterface, read_onnx_io
from moe_export.export.manifest import Artifact, ExportManifest
from moe_export.export.trt_engine import import_tensorrt, require_cuda
from moe_export.files import known_fields, make_staging_dir, output_errors, replace_directory, write_bytes_atomic
from moe_export.ops.names import GROUPED_LORA, PLUGIN_ATTRIBUTES

ENGINE_NAME = "model.engine"
ENGINE_INFO_NAME = "engine.json"
PLUGIN_OP = GROUPED_LORA
PLUGIN_CHOICES = ("auto", "on", "off")
Shape = tuple[int, ...]


def parse_shapes(text: str | None, option: str) -> dict[str, Shape]:
    """'NAME:1x128,NAME2:1x128' -> {'NAME': (1, 128), ...}; a usage error otherwise."""
    if not text:
        return {}
    shapes: dict[str, Shape] = {}
    for item in text.split(","):
        name, sep, dims = item.strip().rpartition(":")
        try:
            shape = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            shape = ()
        if not sep or not name or not shape or min(shape) < 0:
            raise MoeExportError(f"{option} {item!r}: expected NAME:DxD..., e.g. {INPUT_IDS}:1x128")
        shapes[name] = shape
    return shapes


@dataclass
class TrtBuildOptions:
    """How to build the engine; the CLI options map onto these fields."""

    plugin: str = field(default="auto", metadata={"help": "auto|on|off: GroupedLoRA as plugin or function body"})
    min_shapes: dict[str, Shape] = field(default_factory=dict, metadata={"help": "profile minimum per input"})
    opt_shapes: dict[str, Shape] = field(default_factory=dict, metadata={"help": "profile optimum per input"})
    max_shapes: dict[str, Shape] = field(default_factory=dict, metadata={"help": "profile maximum per input"})
    workspace_gib: float | None = field(default=None, metadata={"help": "builder workspace limit in GiB"})
    timing_cache: str | None = field(default=None, metadata={"help": "timing cache file, read and updated"})
    tf32: bool = field(default=False, metadata={"help": "let fp32 matmuls use TF32 (faster, ~1e-3 relative error)"})

    def __post_init__(self) -> None:
        if self.plugin not in PLUGIN_CHOICES:
            raise MoeExportError(f"--plugin {self.plugin!r}: choose one of {', '.join(PLUGIN_CHOICES)}")
        if self.workspace_gib is not None and self.workspace_gib <= 0:
            raise MoeExportError(f"--workspace {self.workspace_gib}: expected a positive number of GiB")
        for attr in ("min_shapes", "opt_shapes", "max_shapes"):
            setattr(self, attr, {k: tuple(int(d) for d in v) for k, v in getattr(self, attr).items()})

    def to_dict(self) -> dict[str, Any]:
        return {k: (dict(v) if isinstance(v, dict) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrtBuildOptions:
        return cls(**known_fields(cls, data, "TrtBuildOptions"))


@dataclass
class OnnxInfo:
    """What the builder needs from an export directory, read without loading the weights."""

    directory: Path
    onnx_path: Path
    manifest: ExportManifest
    interface: GraphInterface  # export.json's, checked against the graph
    grouped_lora_nodes: int
    vocab_size: int | None
    max_positions: int | None  # config.json's max_position_embeddings caps the default sequence range


def inspect_onnx_dir(onnx_dir: str | Path) -> OnnxInfo:
    """Check ONNX_DIR holds export.json + model.onnx and read the graph interface (no external data)."""
    import onnx

    artifact = Artifact.open(onnx_dir)
    onnx_path = artifact.onnx_path
    if not onnx_path.is_file():
        raise FormatError(f"{onnx_path}: missing; export.json names it as the model")
    interface = artifact.interface.with_graph(*read_onnx_io(onnx_path), where=str(onnx_path))
    model = onnx.load(str(onnx_path), load_external_data=False)  # read_onnx_io checked it loads
    nodes = sum(1 for n in model.graph.node if n.op_type == PLUGIN_OP)
    return OnnxInfo(
        artifact.path,
        onnx_path,
        artifact.manifest,
        interface,
        nodes,
        artifact.model_config("vocab_size"),
        artifact.model_config("max_position_embeddings"),
    )


def resolve_profiles(info: OnnxInfo, options: TrtBuildOptions) -> dict[str, tuple[Shape, Shape, Shape]]:
    """One optimization profile: per input (min, opt, max), user shapes over defaults from the graph."""
    given = {**options.min_shapes, **options.opt_shapes, **options.max_shapes}
    names = info.interface.input_names()
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise MoeExportError(f"shapes given for {unknown}, but {info.onnx_path} has inputs {sorted(names)}")
    lo, opt, hi = DEFAULT_SEQUENCE_RANGE
    seq_max = min(hi, info.max_positions or hi)
    defaults = info.interface.profile_ranges(sequence=(lo, min(opt, seq_max), seq_max))
    profiles = {}
    for spec in info.interface.inputs:
        name, dims = spec.name, spec.shape
        triple = []
        for index, table in enumerate((options.min_shapes, options.opt_shapes, options.max_shapes)):
            shape = table.get(name, defaults[name][index])
            if len(shape) != len(dims):
                raise MoeExportError(f"input {name} has rank {len(dims)} in {info.onnx_path}, got shape {shape}")
            triple.append(shape)
        lo, opt, hi = triple
        if not all(a <= b <= c for a, b, c in zip(lo, opt, hi, strict=True)):
            raise MoeExportError(f"input {name}: need min <= opt <= max per axis, got {lo}, {opt}, {hi}")
        profiles[name] = (lo, opt, hi)
    return profiles


def _plugin_unavailable_reason(trt: Any) -> str | None:
    if not hasattr(trt, "QuickPluginCreationRequest"):
        return f"TensorRT {trt.__version__} has no Python AOT plugins (needs >= 10.9)"
    try:
        import tensorrt.plugin  # noqa: F401
        import triton  # noqa: F401
    except ImportError as exc:
        return f"the plugin needs tensorrt.plugin and triton ({exc}); pip install triton"
    return None


def _build_one(
    trt: Any, info: OnnxInfo, profiles: dict[str, tuple[Shape, Shape, Shape]], options: TrtBuildOptions, plugin: bool
) -> tuple[bytes, float, int]:
    """Parse + build one engine; returns (engine bytes, build seconds, GroupedLoRA plugin layers)."""
    if plugin:
        from moe_export.export import trt_plugin

        trt_plugin.set_plugin_enabled(True)
    elif "moe_export.export.trt_plugin" in sys.modules:
        sys.modules["moe_export.export.trt_plugin"].set_plugin_enabled(False)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # From the file path, so TensorRT finds model.onnx.data (external weights) next to it.
    if not parser.parse_from_file(str(info.onnx_path)):
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        first = errors[0].desc() if errors and hasattr(errors[0], "desc") else str(errors[:1])
        raise ExportError(
            f"{info.onnx_path}: TensorRT could not parse the model ({len(errors)} errors; first: {first})"
        )
    plugin_layers = _grouped_lora_plugin_layers(trt, network)
    if plugin and plugin_layers < info.grouped_lora_nodes:
        raise ExportError(
            f"{info.onnx_path}: {info.grouped_lora_nodes} GroupedLoRA nodes but {plugin_layers} plugin layers; "
            f"the nodes need the attributes {PLUGIN_ATTRIBUTES} (re-export with this moe-export)"
        )
    config = builder.create_builder_config()
    # TensorRT enables TF32 for fp32 layers by default; an fp32 export asks for fp32 parity unless --tf32.
    if not options.tf32 and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    if options.workspace_gib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gib * 2**30))
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profiles.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache_path = Path(options.timing_cache) if options.timing_cache else None
    cache_bytes = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    config.set_timing_cache(config.create_timing_cache(cache_bytes), False)
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        raise ExportError(f"{info.onnx_path}: TensorRT failed to build the engine (see the TensorRT log above)")
    if cache_path:
        write_bytes_atomic(cache_path, bytes(config.get_timing_cache().serialize()))
    return bytes(serialized), seconds, plugin_layers


def _grouped_lora_plugin_layers(trt: Any, network: Any) -> int:
    """How many layers are our plugin (TensorRT may implement other ops, e.g. TopK, as plugins too)."""
    count = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type != trt.LayerType.PLUGIN_V3:
            continue
        try:
            name = layer.plugin.get_capability_interface(trt.PluginCapabilityType.CORE).plugin_name
        except Exception:  # bindings without the capability accessor: count every V3 plugin layer
            name = PLUGIN_OP
        count += name == PLUGIN_OP
    return count


def opt_feeds(info: OnnxInfo, profiles: dict[str, tuple[Shape, Shape, Shape]], seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs at the profile's opt shapes, one consistent call of the export's interface: random token ids
    (varied routing), all-ones masks, positions after the past, a random past."""
    shapes = {name: opt for name, (_, opt, _) in profiles.items()}
    return info.interface.feeds_for_shapes(shapes, info.vocab_size or 100, seed)


# How `--plugin auto` times a candidate engine at the opt shapes: (serialized engine, feeds) -> milliseconds.
# Running an engine is a runtime's job (runtimes/trt_engine.median_ms), so the caller hands it in.
EngineTimer = Callable[[bytes, dict[str, np.ndarray]], float]


def build_engine(
    onnx_dir: str | Path,
    out_dir: str | Path | None = None,
    options: TrtBuildOptions | None = None,
    time_engine: EngineTimer | None = None,
) -> dict:
    """Build OUT/model.engine + OUT/engine.json (OUT defaults to ONNX_DIR); returns the engine.json dict.

    `--plugin auto` with both paths available times them with `time_engine` (runtimes/trt_engine.median_ms);
    without one it keeps the plugin, and engine.json says it was not timed."""
    options = options or TrtBuildOptions()
    info = inspect_onnx_dir(onnx_dir)
    fusion = info.manifest.fusion or {}
    if fusion.get("mode") == "contrib":  # export/decoder_fused.py: ONNX Runtime contrib ops TensorRT cannot parse
        raise ExportError(
            f"{info.onnx_path}: the decoder uses ONNX Runtime's com.microsoft ops (GroupQueryAttention...), which "
            "TensorRT cannot build; export it again with --fusion none"
        )
    profiles = resolve_profiles(info, options)
    trt = import_tensorrt()
    gpu = require_cuda()
    import torch

    report: dict[str, Any] = {
        "tensorrt_version": trt.__version__,
        "gpu": gpu,
        "compute_capability": ".".join(map(str, torch.cuda.get_device_capability())),
        "moe_export_version": __version__,
        "onnx": str(info.onnx_path),
        "dtype": info.manifest.dtype,
        "strongly_typed": True,
        "plugin_requested": options.plugin,
        "grouped_lora_nodes": info.grouped_lora_nodes,
        "profiles": {n: {"min": p[0], "opt": p[1], "max": p[2]} for n, p in profiles.items()},
        "options": options.to_dict(),
    }
    paths, reason = plugin_paths(options.plugin, info.grouped_lora_nodes, _plugin_unavailable_reason(trt), time_engine)
    built = {path: _build_one(trt, info, profiles, options, plugin=path == "on") for path in paths}
    report["build_seconds"] = {path: round(b[1], 3) for path, b in built.items()}
    if len(paths) == 2:
        assert time_engine is not None
        feeds = opt_feeds(info, profiles)
        latency = {path: time_engine(b[0], feeds) for path, b in built.items()}
        chosen = min(latency, key=latency.__getitem__)
        other = "off" if chosen == "on" else "on"
        report["latency_ms_at_opt"] = {p: round(v, 4) for p, v in latency.items()}
        reason = (
            f"auto: plugin {latency['on']:.3f} ms vs function body {latency['off']:.3f} ms (median at opt shapes); "
            f"kept {chosen} ({latency[other] / latency[chosen]:.2f}x)"
        )
    else:
        chosen = paths[0]
    report["plugin"] = chosen
    report["plugin_layers"] = built[chosen][2]
    report["reason"] = reason
    report["engine"] = ENGINE_NAME
    _write_outputs(Path(out_dir) if out_dir else info.directory, built[chosen][0], report)
    return report


def plugin_paths(
    plugin: str, grouped_lora_nodes: int, unavailable: str | None, time_engine: EngineTimer | None
) -> tuple[list[str], str]:
    """Which engines `--plugin` builds ("off": function bodies, "on": the plugin; both: auto times them) and
    why; `unavailable` is why the plugin cannot be used here (None: it can)."""
    if plugin == "on" and unavailable:
        raise RuntimeUnavailableError(f"--plugin on: {unavailable}")
    if plugin in ("off", "on"):
        return [plugin], f"requested --plugin {plugin}"
    if grouped_lora_nodes == 0:
        return ["off"], (
            "no GroupedLoRA nodes (base-only, fully merged, only GroupedLoRASlots, or fused by the adapter passes into "
            "GroupedLoRAAdd / RoutedGroupedLoRAAdd; none has a plugin: export with --no-adapter-fusion for it)"
        )
    if unavailable:
        return ["off"], f"plugin unavailable: {unavailable}"
    if time_engine is None:
        return ["on"], "auto: plugin kept without timing (build_engine was given no time_engine)"
    return ["off", "on"], ""


def _write_outputs(out: Path, engine: bytes, report: dict[str, Any]) -> None:
    """Into an existing dir: temp files renamed over, engine.json last. New dir: temp sibling renamed."""
    info_bytes = (json.dumps(report, indent=2, default=list) + "\n").encode()
    if out.is_dir():
        write_bytes_atomic(out / ENGINE_NAME, engine)
        write_bytes_atomic(out / ENGINE_INFO_NAME, info_bytes)
        return
    if out.exists():
        raise MoeExportError(f"{out}: exists and is not a directory; choose another -o")
    with output_errors(out):
        staging = make_staging_dir(out)
        try:
            (staging / ENGINE_NAME).write_bytes(engine)
            (staging / ENGINE_INFO_NAME).write_bytes(info_bytes)
            replace_directory(staging, out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
