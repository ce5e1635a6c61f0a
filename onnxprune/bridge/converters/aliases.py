"""Version aliases: reuse a converter across operator versions whose interface did not change.

Most operator version bumps only widen the type lists (Reshape-19/21, Identity-19/21,
ReduceMax-20, ...) or add an attribute whose default keeps the old behaviour (Cast-19
`saturate`, Resize-18 `antialias`). onnx2torch registers converters for the versions it was
written against, so a file exported at a newer opset fails although the old converter computes
the right thing. From the ONNX schemas we derive, for every unregistered version of a converted
operator, the nearest registered version with the same inputs and outputs; the alias refuses a
node that sets an attribute the borrowed converter does not know to a non-default value.
Aliases are registered in onnx2torch's own registry, so its `get_converter` finds them.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable

import onnx
from onnx import defs, helper

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from onnx2torch.node_converters.registry import add_converter, get_converter
    from onnx2torch.onnx_graph import OnnxGraph
    from onnx2torch.onnx_node import OnnxNode
    from onnx2torch.utils.common import OperationConverterResult

# Attribute values that mean "not used" although the schema gives no default.
NEUTRAL_VALUES: dict[str, Callable[[Any], bool]] = {
    "dilations": lambda value: all(v == 1 for v in value),
}


@dataclass(frozen=True)
class Alias:
    op_type: str
    version: int  # the version now served
    borrowed: int  # the registered version whose converter serves it
    new_attributes: tuple[str, ...]  # attributes the borrowed converter does not know


def _signature(schema: defs.OpSchema) -> tuple:
    return (
        tuple((p.name, p.option) for p in schema.inputs),
        tuple((p.name, p.option) for p in schema.outputs),
    )


def _registered(op_type: str, version: int) -> bool:
    try:
        get_converter(op_type, version)
    except NotImplementedError:
        return False
    return defs.get_schema(op_type, version).since_version == version


def _default(schema: defs.OpSchema, name: str) -> Any:
    attribute = schema.attributes[name]
    if attribute.default_value is None or attribute.default_value.type == onnx.AttributeProto.UNDEFINED:
        return None
    return helper.get_attribute_value(attribute.default_value)


def _make_alias(alias: Alias, schema: defs.OpSchema) -> Callable[[OnnxNode, OnnxGraph], OperationConverterResult]:
    borrowed = get_converter(alias.op_type, alias.borrowed)
    defaults = {name: _default(schema, name) for name in alias.new_attributes}

    def convert(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
        for name, default in defaults.items():
            if name not in node.attributes:
                continue
            value = node.attributes[name]
            value = value.decode() if isinstance(value, bytes) else value
            if value == default or (name in NEUTRAL_VALUES and NEUTRAL_VALUES[name](value)):
                continue
            raise NotImplementedError(
                f"{alias.op_type}-{alias.version} attribute {name}={value!r} is not supported "
                f"(converted with the {alias.op_type}-{alias.borrowed} converter)"
            )
        return borrowed(node, graph)

    return convert


def register_aliases() -> list[Alias]:
    """Register aliases for every unregistered version of every operator onnx2torch converts."""
    history: dict[str, list[defs.OpSchema]] = defaultdict(list)
    for schema in defs.get_all_schemas_with_history():
        if schema.domain in ("", "ai.onnx") and not schema.deprecated:
            history[schema.name].append(schema)
    added = []
    for op_type, schemas in sorted(history.items()):
        by_version = {s.since_version: s for s in schemas}
        registered = sorted(v for v in by_version if _registered(op_type, v))
        if not registered:
            continue
        for version in sorted(by_version):
            if version in registered:
                continue
            # nearest older registered version first, then the nearest newer one
            candidates = [v for v in reversed(registered) if v < version] + [v for v in registered if v > version]
            target = by_version[version]
            for base in candidates:
                if _signature(by_version[base]) != _signature(target):
                    continue
                new = tuple(sorted(set(target.attributes) - set(by_version[base].attributes)))
                alias = Alias(op_type, version, base, new)
                add_converter(operation_type=op_type, version=version)(_make_alias(alias, target))
                added.append(alias)
                break
    return added
