"""The graph TensorRT sees, and whether a TensorRT version's ONNX parser can take it.

A package's `model.onnx` takes uint8 [H, W, 3] and returns a uint8 `label_map`. TensorRT 7 and 8
have no UINT8 tensors, so the TensorRT backends build from a variant (`tensorrt_variant`):

- the input `image` is float32 [H, W, 3] (the host converts the bytes; the leading Cast is dropped),
- `label_map` is int32 (its final Cast targets INT32; the host narrows it to uint8),
- the opset is relabelled down to what the parser reads, where every operator's definition is the
  same at both opsets or differs only by added element types (`_TYPE_ONLY_CHANGES`).

`check_graph` lists what a parser version does not take: unknown operators, restricted attribute
values, inputs that must be initializers, element types, dynamic shapes and the opset. The
supported sets come from onnx-tensorrt's docs/operators.md and are stored in
agent/backends/tensorrt_support/ with their source. Needs the `onnx` package (the `tensorrt` extra).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto, defs, helper, shape_inference

from lookout_edge.contract import INPUT_NAME, LABEL_MAP_OUTPUT

SUPPORT_DIR = Path(__file__).with_name("tensorrt_support")
# Operators reviewed against the ONNX changelog: between opset 11 and 17 their definitions only
# added element types (bfloat16 at 13, more at 14 and 16), or an attribute whose default keeps the
# old behaviour (ArgMax select_last_index at 12, Reshape allowzero at 14).
_TYPE_ONLY_CHANGES = {
    "Add", "Sub", "Mul", "Div", "Relu", "Reshape", "Where", "Less", "Cast", "Clip", "Concat", "MatMul",
    "Sigmoid", "Slice", "Sqrt", "Transpose", "ArgMax", "Conv", "AveragePool",
}  # fmt: skip
# Operators whose meaning or inputs changed at the given opset (e.g. `axes` from attribute to
# input, Softmax from flattened 2-D to one axis, Resize's optional roi/scales).
_SEMANTIC_CHANGES = {
    "ReduceSum": 13, "Unsqueeze": 13, "Squeeze": 13, "Softmax": 13, "Resize": 13, "Split": 13,
    "ReduceMax": 18, "ReduceMin": 18, "ReduceMean": 18,
}  # fmt: skip


@dataclass(frozen=True)
class ParserSupport:
    """What one TensorRT version's ONNX parser takes (one file of agent/backends/tensorrt_support/)."""

    tensorrt: str
    max_opset: int
    operators: frozenset[str]
    internal_types: frozenset[str]
    io_types: frozenset[str]
    restrictions: dict[str, Any]
    source: dict[str, str]


@cache
def parser_support(version: str) -> ParserSupport:
    path = SUPPORT_DIR / f"trt-{version}.json"
    data = json.loads(path.read_text())
    return ParserSupport(
        tensorrt=data["tensorrt"],
        max_opset=data["max_opset"],
        operators=frozenset(data["operators"]),
        internal_types=frozenset(data["internal_types"]),
        io_types=frozenset(data["io_types"]),
        restrictions=data["restrictions"],
        source=data["source"],
    )


def known_versions() -> list[str]:
    names = [path.stem.removeprefix("trt-") for path in SUPPORT_DIR.glob("trt-*.json")]
    return sorted(names, key=_version_tuple)


def support_for(installed: str) -> ParserSupport:
    """The stored support set of the newest listed version not newer than `installed` (x.y[.z])."""
    wanted = _version_tuple(installed)[:2]
    candidates = [name for name in known_versions() if _version_tuple(name) <= wanted]
    return parser_support(candidates[-1] if candidates else known_versions()[0])


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".") if part.isdigit())


def graph_opset(model: onnx.ModelProto) -> int:
    return next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))


def tensorrt_variant(model: onnx.ModelProto, max_opset: int) -> onnx.ModelProto:
    """The graph the TensorRT backends build from (see the module docstring)."""
    variant = onnx.ModelProto()
    variant.CopyFrom(model)
    graph = variant.graph
    (image,) = [value for value in graph.input if value.name == INPUT_NAME]
    casts = [node for node in graph.node if node.op_type == "Cast" and list(node.input) == [INPUT_NAME]]
    if image.type.tensor_type.elem_type == TensorProto.UINT8 and len(casts) == 1:
        cast = casts[0]
        for node in graph.node:
            for index, name in enumerate(node.input):
                if name == cast.output[0]:
                    node.input[index] = INPUT_NAME
        graph.node.remove(cast)
        image.type.tensor_type.elem_type = TensorProto.FLOAT
    for output in graph.output:
        if output.name == LABEL_MAP_OUTPUT and output.type.tensor_type.elem_type == TensorProto.UINT8:
            output.type.tensor_type.elem_type = TensorProto.INT32
            for node in graph.node:
                if LABEL_MAP_OUTPUT in node.output and node.op_type == "Cast":
                    del node.attribute[:]
                    node.attribute.append(helper.make_attribute("to", TensorProto.INT32))
    opset = graph_opset(variant)
    if opset > max_opset and not _opset_changes(variant, max_opset, opset):
        for entry in variant.opset_import:
            if entry.domain in ("", "ai.onnx"):
                entry.version = max_opset
    return variant


def _opset_changes(model: onnx.ModelProto, low: int, high: int) -> list[str]:
    """Operators of `model` whose definition at opset `low` differs from `high` beyond element types."""
    changed = set()
    for node in model.graph.node:
        op = node.op_type
        try:
            same = defs.get_schema(op, low).since_version == defs.get_schema(op, high).since_version
        except Exception:  # no definition at all at that opset
            same = False
        if same or (op in _TYPE_ONLY_CHANGES and op not in _SEMANTIC_CHANGES):
            continue
        if op not in _SEMANTIC_CHANGES or low < _SEMANTIC_CHANGES[op] <= high:
            changed.add(op)
    return sorted(changed)


def describe_graph(model: onnx.ModelProto) -> list[tuple[str, str, dict[str, Any]]]:
    """Every node as (operator, node name, attributes)."""
    return [
        (node.op_type, node.name, {a.name: helper.get_attribute_value(a) for a in node.attribute})
        for node in model.graph.node
    ]


def check_graph(model: onnx.ModelProto, support: ParserSupport) -> list[str]:
    """What `support`'s TensorRT parser does not take in `model`; empty when it takes all of it."""
    version = f"TensorRT {support.tensorrt}"
    problems = []
    opset = graph_opset(model)
    if opset > support.max_opset:
        changed = _opset_changes(model, support.max_opset, opset)
        problems.append(
            f"opset {opset}: {version}'s parser reads up to opset {support.max_opset}, and these operators "
            f"are defined differently there: {', '.join(changed) or 'none'}"
        )
    initializers = {tensor.name for tensor in model.graph.initializer}
    for op, name, attributes in describe_graph(model):
        if op not in support.operators:
            problems.append(f"{op} (node {name}): not supported by {version}'s ONNX parser")
            continue
        rule = support.restrictions.get(op, {})
        for attribute, allowed in rule.get("attributes", {}).items():
            value = attributes.get(attribute)
            value = value.decode() if isinstance(value, bytes) else value
            if value is not None and value not in allowed:
                problems.append(
                    f"{op} (node {name}): {attribute}={value!r}; {version} takes only {', '.join(allowed)}"
                )
        node = next(n for n in model.graph.node if n.name == name and n.op_type == op)
        for index in rule.get("initializer_inputs", []):
            if index < len(node.input) and node.input[index] and node.input[index] not in initializers:
                problems.append(f"{op} (node {name}): input {index} must be an initializer for {version}")
    problems.extend(_type_and_shape_problems(model, support))
    return problems


def _type_and_shape_problems(model: onnx.ModelProto, support: ParserSupport) -> list[str]:
    version = f"TensorRT {support.tensorrt}"
    inferred = shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    graph = inferred.graph
    io = list(graph.input) + list(graph.output)
    io_names = {value.name for value in io}
    known = {value.name: value for value in [*io, *graph.value_info]}
    problems = []
    for value in io:
        kind = TensorProto.DataType.Name(value.type.tensor_type.elem_type)
        if kind not in support.io_types:
            problems.append(
                f"graph input/output {value.name} is {kind}; {version} takes {sorted(support.io_types)}"
            )
    for tensor in graph.initializer:
        kind = TensorProto.DataType.Name(tensor.data_type)
        if kind not in support.internal_types:
            problems.append(f"initializer {tensor.name} is {kind}; {version} has no such type")
    for node in graph.node:
        for output in node.output:
            inferred_value = known.get(output)
            if inferred_value is None:
                problems.append(f"{node.op_type} (node {node.name}): output {output} has no inferred shape")
                continue
            kind = TensorProto.DataType.Name(inferred_value.type.tensor_type.elem_type)
            if output not in io_names and kind not in support.internal_types:
                problems.append(
                    f"{node.op_type} (node {node.name}): output {output} is {kind}, a type {version} lacks"
                )
    for value in known.values():
        dims = value.type.tensor_type.shape.dim
        if not value.type.tensor_type.HasField("shape") or any(
            dim.HasField("dim_param") or not dim.HasField("dim_value") for dim in dims
        ):
            problems.append(f"tensor {value.name} has a dynamic or unknown shape")
    return problems
