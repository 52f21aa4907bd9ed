"""Graph pass: a softmax top-k router chain feeding GroupedLoRA(Add) becomes one `RoutedGroupedLoRA(Add)` node.

    RoutedGroupedLoRA(x [..., D_in], router_weight [D_in, E], A, B) -> (y [T, D_out], expert_ids [T, K], gates [T, K])
    RoutedGroupedLoRAAdd(x, router_weight, A, B, base [..., D_out]) -> (base + y in base's shape, expert_ids, gates)

The exporter traces a token-routed unit as MatMul -> (Cast) -> Softmax -> TopK -> (ReduceSum, Div) -> (Cast) ->
GroupedLoRA: about six kernels per routed linear on top of the op, most of a decode step's kernel count. The
native kernel (moe_export/runtimes/native) runs the whole chain in one call. The new node keeps:
- the unit's node name (validation maps nodes to units by it) and the router's value names: expert_ids and
  gates come out as outputs 1 and 2 under the names GroupedLoRA read them by, so taps and route replay see the
  same values (runtimes/taps.py);
- a standard-op function body that is the replaced chain followed by GroupedLoRA(Add)'s body, op for op, so a
  plain ONNX Runtime computes what the unfused graph computed. The body's only additions are exact: x
  [..., D_in] flattened to [T, D_in], a Cast (CastLike) to the type the value already has, and a division by
  1.0 instead of by the sum when `normalize` is 0 (no branches in a function body).
Only what the chain computes with these ops is matched: no router bias, softmax over the last axis, TopK
largest/sorted with a constant k, renormalised or not. Any other routing (dense, top-p, task, a bias) keeps the
unfused chain and its GroupedLoRA node.
A follow-up pass (`drop_token_views`) feeds each routed node the [..., D_in] tensor its x was viewed from: the
trace writes a Reshape [batch, sequence, D_in] -> [T, D_in] before each distinct x, one more node per decode step
that the routed ops, which flatten x themselves, do not need.
Legend: T tokens (the product of x's leading dims), E experts, K slots, D_in / D_out feature sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnx import AttributeProto, FunctionProto, NodeProto, TensorProto, helper

from moe_export.export.graph_rewrite import GraphIndex, replace_nodes
from moe_export.export.onnx_fused import fuse_residual_add, grouped_lora_add_body
from moe_export.export.onnx_ops import grouped_lora_dense_body
from moe_export.ops.names import (
    DOMAIN,
    GROUPED_LORA,
    GROUPED_LORA_ADD,
    PLUGIN_ATTRIBUTES,
    ROUTED_GROUPED_LORA,
    ROUTED_GROUPED_LORA_ADD,
    ROUTED_OP_TYPES,
)

ROUTED_OF = {GROUPED_LORA: ROUTED_GROUPED_LORA, GROUPED_LORA_ADD: ROUTED_GROUPED_LORA_ADD}
ROUTER_ATTRIBUTES = ("k", "normalize")  # TopK's k; 1: gates divided by their sum (renormalised top-k)


def _attribute_constant(output: str, attribute: str) -> NodeProto:
    """Constant whose scalar int value is the function's attribute `attribute`."""
    node = helper.make_node("Constant", [], [output])
    ref = AttributeProto()
    ref.name, ref.ref_attr_name, ref.type = "value_int", attribute, AttributeProto.INT
    node.attribute.append(ref)
    return node


def router_nodes() -> list[NodeProto]:
    """x, router_weight -> expert_ids [T, K] int64, gates [T, K] in x's type: the traced chain's ops, in order."""
    node = helper.make_node
    return [
        # The router matmul runs in the weight's type (fp32, or the model's for MoLA); CastLike is the Cast the
        # trace writes before it, and a no-op when x already has that type.
        node("CastLike", ["x", "router_weight"], ["route_x"]),
        node("MatMul", ["route_x", "router_weight"], ["route_logits"]),  # [T, E]
        node("Cast", ["route_logits"], ["route_logits_f32"], to=TensorProto.FLOAT),  # softmax in fp32 always
        node("Softmax", ["route_logits_f32"], ["route_probs"], axis=-1),  # [T, E]
        _attribute_constant("route_k_scalar", "k"),
        node("Constant", [], ["route_axis0"], value_ints=[0]),
        node("Unsqueeze", ["route_k_scalar", "route_axis0"], ["route_k"]),  # [1]
        node("TopK", ["route_probs", "route_k"], ["route_top", "expert_ids"], axis=-1, largest=1, sorted=1),
        node("Constant", [], ["route_axis_last"], value_ints=[-1]),
        node("ReduceSum", ["route_top", "route_axis_last"], ["route_sum"], keepdims=1),  # [T, 1]
        _attribute_constant("route_normalize_int", "normalize"),
        node("Cast", ["route_normalize_int"], ["route_normalize"], to=TensorProto.BOOL),
        node("Constant", [], ["route_one"], value_float=1.0),
        node("Where", ["route_normalize", "route_sum", "route_one"], ["route_denominator"]),
        node("Div", ["route_top", "route_denominator"], ["route_gates_f32"]),  # [T, K]
        node("CastLike", ["route_gates_f32", "x"], ["gates"]),  # the trace's gates.to(x.dtype)
    ]


def _reading(nodes: list[NodeProto], old: str, new: str) -> list[NodeProto]:
    """Copies of `nodes` that read `new` wherever they read `old`."""
    copies = []
    for node in nodes:
        copy = NodeProto()
        copy.CopyFrom(node)
        copy.input[:] = [new if name == old else name for name in copy.input]
        copies.append(copy)
    return copies


def routed_body(op_type: str, opset: int) -> FunctionProto:
    """RoutedGroupedLoRA(Add)'s body: x [..., D_in] flattened to its tokens [T, D_in], router_nodes(), then
    GroupedLoRA(Add)'s own body on (tokens, ids, gates, A, B)."""
    inner = grouped_lora_dense_body(opset) if op_type == ROUTED_GROUPED_LORA else grouped_lora_add_body(opset)
    extra = ["base"] if op_type == ROUTED_GROUPED_LORA_ADD else []
    # Flatten, not Reshape to [-1, D_in]: the same row-major values, and no shape to compute or to infer at T = 0.
    tokens = helper.make_node("Flatten", ["x"], ["tokens"], axis=-1)  # [T, D_in], T = product of x's leading dims
    return helper.make_function(
        DOMAIN,
        op_type,
        ["x", "router_weight", "A", "B", *extra],
        ["y", "expert_ids", "gates"],
        [tokens, *_reading([*router_nodes(), *inner.node], "x", "tokens")],
        list(inner.opset_import),
        attributes=[*ROUTER_ATTRIBUTES, *PLUGIN_ATTRIBUTES],
    )


def _attr(node: NodeProto, name: str, default: int) -> int:
    return next((int(helper.get_attribute_value(a)) for a in node.attribute if a.name == name), default)


@dataclass
class RouterChain:
    """One matched router: the nodes the fused node replaces, its attributes, and the Cast of x to the router's type
    (`shared`), which other routers of the same x may read too (the trace casts an fp16 x once for q/k/v)."""

    nodes: list[NodeProto]
    weight: str
    k: int
    normalize: bool
    shared: list[NodeProto] = field(default_factory=list)


def _match_gates(g: GraphIndex, gates: str, values: str) -> tuple[list[NodeProto], bool, int] | None:
    """The gates' chain from TopK's values: optional Div by their ReduceSum, optional Cast; (nodes, normalize,
    the gates' element type)."""
    nodes, dtype = [], TensorProto.FLOAT
    cast = g.made_by(gates, "Cast")
    if cast is not None:
        nodes.append(cast)
        gates, dtype = cast.input[0], _attr(cast, "to", 0)
    if gates == values:
        return nodes, False, dtype
    div = g.made_by(gates, "Div")
    total = g.made_by(div.input[1], "ReduceSum") if div is not None else None
    if div is None or total is None or div.input[0] != values or total.input[0] != values:
        return None
    if _attr(total, "keepdims", 1) != 1 or len(total.input) < 2 or g.ints(total.input[1]) != [-1]:
        return None
    return [*nodes, div, total], True, dtype


def _match_logits(
    g: GraphIndex, probs_input: str, x: str, x_type: int
) -> tuple[list[NodeProto], str, list[NodeProto]] | None:
    """MatMul(x or Cast(x), W) -> (Cast to fp32) before the Softmax; (nodes, W's name, [the Cast of x] or [])."""
    nodes = []
    cast = g.made_by(probs_input, "Cast")
    if cast is not None:
        if _attr(cast, "to", 0) != TensorProto.FLOAT:
            return None
        nodes.append(cast)
        probs_input = cast.input[0]
    matmul = g.made_by(probs_input, "MatMul")
    weight = g.initializers.get(matmul.input[1]) if matmul is not None else None
    if matmul is None or weight is None or len(weight.dims) != 2:
        return None
    if cast is None and weight.data_type != TensorProto.FLOAT:
        return None  # the body casts the logits to fp32 before its softmax: so must the graph
    routed_x, shared = matmul.input[0], []
    if routed_x != x:
        x_cast = g.made_by(routed_x, "Cast")
        if x_cast is None or x_cast.input[0] != x or _attr(x_cast, "to", 0) != weight.data_type:
            return None
        shared.append(x_cast)
    elif x_type != weight.data_type:
        return None
    return [*nodes, matmul], matmul.input[1], shared


def match_router(g: GraphIndex, node: NodeProto) -> RouterChain | None:
    """The router chain whose expert_ids and gates `node` (GroupedLoRA or GroupedLoRAAdd) reads, or None."""
    x, ids, gates = node.input[0], node.input[1], node.input[2]
    topk = g.made_by(ids, "TopK")
    if topk is None or topk.output[1] != ids or len(topk.input) < 2:
        return None
    k = g.ints(topk.input[1])
    if k is None or len(k) != 1 or _attr(topk, "largest", 1) != 1 or _attr(topk, "sorted", 1) != 1:
        return None
    matched = _match_gates(g, gates, topk.output[0])
    softmax = g.made_by(topk.input[0], "Softmax")
    if matched is None or softmax is None or _attr(softmax, "axis", -1) not in (-1, 1):
        return None
    gate_nodes, normalize, x_type = matched
    logits = _match_logits(g, softmax.input[0], x, x_type)
    if logits is None:
        return None
    nodes = [*gate_nodes, topk, softmax, *logits[0]]
    return RouterChain(nodes, logits[1], k[0], normalize, logits[2]) if _private(g, nodes, node) else None


def _private(g: GraphIndex, chain: list[NodeProto], node: NodeProto) -> bool:
    """Every value the chain makes is read only inside the chain or by `node`, and none is a graph output."""
    inside = {id(n) for n in chain} | {id(node)}
    for member in chain:
        for name in member.output:
            if name in g.outputs or any(id(c) not in inside for c in g.consumers.get(name, [])):
                return False
    return True


def fuse_routers(model: onnx.ModelProto) -> int:
    """Rewrite every GroupedLoRA(Add) fed by a matched router chain into RoutedGroupedLoRA(Add); returns the count.
    Adds the bodies used; initializers only the dropped chains read are removed."""
    graph = model.graph
    g = GraphIndex.of(graph)
    replace: dict[int, NodeProto] = {}
    drop: set[int] = set()
    dropped_inputs: set[str] = set()
    shared: dict[int, NodeProto] = {}
    for node in graph.node:
        if node.domain != DOMAIN or node.op_type not in ROUTED_OF:
            continue
        chain = match_router(g, node)
        if chain is None:
            continue
        x, ids, gates, a, b, *base = node.input
        replace[id(node)] = helper.make_node(
            ROUTED_OF[node.op_type], [x, chain.weight, a, b, *base], [node.output[0], ids, gates], name=node.name,
            domain=DOMAIN, k=chain.k, normalize=int(chain.normalize), **PLUGIN_ATTRIBUTES,
        )  # fmt: skip
        drop |= {id(n) for n in chain.nodes}
        dropped_inputs |= {name for n in chain.nodes for name in n.input}
        shared.update((id(n), n) for n in chain.shared)
    if not replace:
        return 0
    for cast in shared.values():  # a Cast of x goes once no kept node reads it
        if not any(name in g.outputs or any(id(c) not in drop for c in g.readers(name)) for name in cast.output):
            drop.add(id(cast))
            dropped_inputs.update(cast.input)
    replace_nodes(graph, replace, drop)
    _remove_unread_initializers(graph, dropped_inputs)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    have = {f.name for f in model.functions}
    for op_type in sorted({n.op_type for n in replace.values()} - have):
        model.functions.append(routed_body(op_type, opset))
    return len(replace)


def _remove_unread_initializers(graph: onnx.GraphProto, candidates: set[str]) -> None:
    read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    kept = [i for i in graph.initializer if i.name not in candidates or i.name in read]
    if len(kept) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(kept)


def merges_leading_dims(g: GraphIndex, view: NodeProto) -> bool:
    """Whether the Reshape `view` provably maps x [..., D] to [T, D] (rows unchanged, T the product of the
    leading dims): x's rank (>= 2) and last dim D are declared, and the target is [-1 or N > 0, D] by the
    shape constant, or else 2-D with last dim D by the view's declared shape. Anything unknown: False."""
    source = g.shape(view.input[0])
    if source is None or len(source) < 2 or not isinstance(source[-1], int) or source[-1] <= 0:
        return False
    d = source[-1]
    constant = g.ints(view.input[1])
    if constant is not None:
        # 0 would copy x's first dim (only [B, 1, D] fits): not a plain merge, left alone.
        return len(constant) == 2 and constant[1] == d and (constant[0] == -1 or constant[0] > 0)
    target = g.shape(view.output[0])
    return target is not None and len(target) == 2 and target[1] == d


def drop_token_views(model: onnx.ModelProto) -> int:
    """Each RoutedGroupedLoRA(Add) whose x is a Reshape that only merges leading dims ([..., D_in] -> [T, D_in],
    e.g. the trace's view of [batch, sequence, D_in]) reads the Reshape's input instead, since the routed ops take
    x [..., D_in]; a Reshape nothing else reads goes. Returns how many Reshapes went. GroupedLoRA(Add) keep their
    [T, D_in] x (their TensorRT plugin's contract)."""
    graph = model.graph
    g = GraphIndex.of(graph)
    views: dict[str, NodeProto] = {}
    for node in graph.node:
        if node.domain != DOMAIN or node.op_type not in ROUTED_OP_TYPES:
            continue
        view = g.made_by(node.input[0], "Reshape")
        if view is not None and merges_leading_dims(g, view):
            node.input[0] = view.input[0]
            views[view.output[0]] = view
    read = {name for node in graph.node for name in node.input} | g.outputs
    gone = {name: view for name, view in views.items() if name not in read}
    if gone:
        replace_nodes(graph, {}, {id(view) for view in gone.values()})
        kept = [v for v in graph.value_info if v.name not in gone]
        del graph.value_info[:]
        graph.value_info.extend(kept)
        _remove_unread_initializers(graph, {view.input[1] for view in gone.values()})
    return len(gone)


def fuse_adapter(model: onnx.ModelProto) -> dict[str, int]:
    """The adapter passes, in order: each residual Add into its GroupedLoRA (onnx_fused.py), each matched
    router into its node, then the routed nodes' x views dropped. Returns the counts export.json records."""
    residual = fuse_residual_add(model)
    counts = {"residual_adds": residual, "routers": fuse_routers(model), "views": drop_token_views(model)}
    # The bodies of op types no node uses any more (GroupedLoRA once every node took its Add or router in).
    used = {n.op_type for n in model.graph.node if n.domain == DOMAIN}
    kept = [f for f in model.functions if f.domain != DOMAIN or f.name in used]
    if len(kept) != len(model.functions):
        del model.functions[:]
        model.functions.extend(kept)
    return counts


def fuse_saved_adapter(model_path: Path) -> dict[str, int]:
    """fuse_adapter on a saved export; only the graph proto is written again (weights stay where they are)."""
    proto = onnx.load(str(model_path), load_external_data=False)
    counts = fuse_adapter(proto)
    if any(counts.values()):
        onnx.save_model(proto, str(model_path))
    return counts
