"""What the ONNX graph passes share: an index of a graph's producers, consumers, initializers and outputs to match
chains against, and the in-place rewrite that puts each fused node where the node it replaces stood."""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx
from onnx import TensorProto, numpy_helper


@dataclass
class GraphIndex:
    """Producers, consumers, initializers and outputs of a graph (its main graph only), for matching."""

    producer: dict[str, onnx.NodeProto] = field(default_factory=dict)
    consumers: dict[str, list[onnx.NodeProto]] = field(default_factory=dict)
    initializers: dict[str, TensorProto] = field(default_factory=dict)
    outputs: set[str] = field(default_factory=set)
    shapes: dict[str, list[int | str | None]] = field(default_factory=dict)

    @classmethod
    def of(cls, graph: onnx.GraphProto) -> GraphIndex:
        g = cls(initializers={i.name: i for i in graph.initializer}, outputs={o.name for o in graph.output})
        for node in graph.node:
            for name in node.output:
                g.producer[name] = node
            for name in node.input:
                g.consumers.setdefault(name, []).append(node)
        for info in (*graph.input, *graph.value_info, *graph.output):
            tensor = info.type.tensor_type
            if info.type.HasField("tensor_type") and tensor.HasField("shape"):
                g.shapes[info.name] = [_dim(d) for d in tensor.shape.dim]
        g.shapes.update({name: list(t.dims) for name, t in g.initializers.items()})
        return g

    def made_by(self, name: str, op_type: str) -> onnx.NodeProto | None:
        """The standard-domain node of `op_type` that makes `name`, or None."""
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx") else None

    def shape(self, name: str) -> list[int | str | None] | None:
        """The shape the graph declares for `name` (value info, an input/output or an initializer): an int per
        known dim, the dim_param's name for a symbolic one, None for an unknown one; None when not declared."""
        return self.shapes.get(name)

    def readers(self, name: str) -> list[onnx.NodeProto]:
        return self.consumers.get(name, [])

    def ints(self, name: str) -> list[int] | None:
        """An int64 initializer's values (None: not one, or held in external data)."""
        tensor = self.initializers.get(name)
        if tensor is None or tensor.data_type != TensorProto.INT64 or tensor.data_location == TensorProto.EXTERNAL:
            return None
        return [int(v) for v in numpy_helper.to_array(tensor).reshape(-1)]


def _dim(dim: onnx.TensorShapeProto.Dimension) -> int | str | None:
    if dim.HasField("dim_value"):
        return int(dim.dim_value)
    return dim.dim_param or None


def replace_nodes(graph: onnx.GraphProto, replace: dict[int, onnx.NodeProto], drop: set[int]) -> None:
    """In place: each node whose id is in `replace` becomes its replacement at the same position; nodes in `drop`
    go. A fused node takes the place of the chain's last node, whose inputs were all computed before it, so the
    graph stays topologically sorted."""
    nodes = [replace.get(id(n), n) for n in graph.node if id(n) not in drop]
    del graph.node[:]
    graph.node.extend(nodes)
