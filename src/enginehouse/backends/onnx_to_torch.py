"""ONNX models as PyTorch modules, so the PyTorch builder can compile ONNX sources.

``OnnxModule`` runs an ONNX graph node by node with torch operations. It is meant to be
traced by ``torch.export`` (the loop unrolls into one ATen graph), not run eagerly in
production: the builder exports it with a dynamic batch and compiles the program like any
other. Weights become buffers, so moving the module moves them.

Shape arithmetic (``Shape`` -> ``Gather`` -> ``Concat`` -> ``Reshape``, as exporters write
it) is kept as Python lists of ints rather than int64 tensors: under ``torch.export`` the
sizes are symbolic ints, and a list of them feeds ``reshape`` directly, where a tensor
would make the shape data-dependent. Small int64 constants are lists for the same reason.

An operator outside the supported set fails the build with a message that names it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from enginehouse.errors import ModelLoadError

# int64 constants with at most this many elements are kept as Python lists (shape values).
_SHAPE_CONSTANT_MAX = 16
_INT_MAX = 2**62


def _torch() -> Any:
    import torch

    return torch


def _attrs(node: Any) -> dict[str, Any]:
    import onnx

    found: dict[str, Any] = {}
    for attribute in node.attribute:
        value = onnx.helper.get_attribute_value(attribute)
        if isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, onnx.TensorProto):
            value = onnx.numpy_helper.to_array(value)
        found[attribute.name] = value
    return found


@dataclass(frozen=True, slots=True)
class _Node:
    """A graph node with its attributes read once, not on every forward."""

    op_type: str
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: dict[str, Any]


def _is_shape(value: Any) -> bool:
    """Shape values: Python ints and lists of ints (plain or symbolic)."""
    return isinstance(value, int | list) or type(value).__name__ == "SymInt"


def _tensor(value: Any, like: Any = None) -> Any:
    torch = _torch()
    if isinstance(value, torch.Tensor):
        return value
    device = like.device if isinstance(like, torch.Tensor) else None
    if isinstance(value, list):
        return (
            torch.stack([torch.as_tensor(v, device=device) for v in value])
            if value
            else (torch.zeros(0, dtype=torch.int64, device=device))
        )
    return torch.as_tensor(value, device=device)


def _ints(value: Any) -> list[Any]:
    """A shape operand as a list (a 0-d value as a one-element list)."""
    if isinstance(value, list):
        return value
    if _is_shape(value):
        return [value]
    return [int(v) for v in value.reshape(-1).tolist()]


def _elementwise(
    shapes: Callable[[Any, Any], Any], tensors: Callable[[Any, Any], Any]
) -> Callable[..., Any]:
    def run(_node: Any, a: Any, b: Any) -> Any:
        if _is_shape(a) and _is_shape(b):
            if isinstance(a, list) or isinstance(b, list):
                left = a if isinstance(a, list) else [a] * len(b)
                right = b if isinstance(b, list) else [b] * len(left)
                return [shapes(x, y) for x, y in zip(left, right)]
            return shapes(a, b)
        return tensors(_tensor(a, b), _tensor(b, a))

    return run


def _divide(a: Any, b: Any) -> Any:
    torch = _torch()
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")
    return a / b


def _pads(pads: list[int], spatial: int) -> tuple[list[int], list[int] | None]:
    """ONNX pads (all begins, then all ends) as torch's symmetric padding, or an F.pad list."""
    begins, ends = pads[:spatial], pads[spatial:]
    if begins == ends:
        return begins, None
    explicit: list[int] = []
    for begin, end in zip(reversed(begins), reversed(ends)):
        explicit += [begin, end]
    return [0] * spatial, explicit


def _conv(node: Any, x: Any, w: Any, b: Any = None) -> Any:
    torch = _torch()
    a = node.attrs
    spatial = w.ndim - 2
    if a.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise ValueError(f"Conv auto_pad {a['auto_pad']} is not supported")
    padding, explicit = _pads(list(a.get("pads", [0] * 2 * spatial)), spatial)
    if explicit:
        x = torch.nn.functional.pad(x, explicit)
    conv = (
        torch.nn.functional.conv1d,
        torch.nn.functional.conv2d,
        torch.nn.functional.conv3d,
    )[spatial - 1]
    return conv(
        x,
        w,
        b,
        stride=list(a.get("strides", [1] * spatial)),
        padding=padding,
        dilation=list(a.get("dilations", [1] * spatial)),
        groups=a.get("group", 1),
    )


def _pool(kind: str) -> Callable[..., Any]:
    def run(node: Any, x: Any) -> Any:
        torch = _torch()
        a = node.attrs
        kernel = list(a["kernel_shape"])
        spatial = len(kernel)
        padding, explicit = _pads(list(a.get("pads", [0] * 2 * spatial)), spatial)
        if a.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            raise ValueError(f"{node.op_type} auto_pad {a['auto_pad']} is not supported")
        if explicit:
            fill = -math.inf if kind == "max" else 0.0
            x = torch.nn.functional.pad(x, explicit, value=fill)
        strides = list(a.get("strides", [1] * spatial))
        ceil = bool(a.get("ceil_mode", 0))
        if kind == "max":
            pool = getattr(torch.nn.functional, f"max_pool{spatial}d")
            return pool(x, kernel, strides, padding, list(a.get("dilations", [1] * spatial)), ceil)
        pool = getattr(torch.nn.functional, f"avg_pool{spatial}d")
        return pool(x, kernel, strides, padding, ceil, bool(a.get("count_include_pad", 0)))

    return run


def _gemm(node: Any, a: Any, b: Any, c: Any = None) -> Any:
    at = node.attrs
    if at.get("transA", 0):
        a = a.transpose(0, 1)
    if at.get("transB", 0):
        b = b.transpose(0, 1)
    result = (a @ b) * at.get("alpha", 1.0)
    if c is not None:
        result = result + c * at.get("beta", 1.0)
    return result


def _axes(node: Any, given: Any) -> list[int] | None:
    if given is not None:
        return [int(v) for v in _ints(given)]
    found = node.attrs.get("axes")
    return list(found) if found is not None else None


def _reduce(kind: str) -> Callable[..., Any]:
    def run(node: Any, x: Any, axes: Any = None) -> Any:
        a = node.attrs
        dims = _axes(node, axes)
        keep = bool(a.get("keepdims", 1))
        if not dims:
            if a.get("noop_with_empty_axes", 0):
                return x
            dims = list(range(x.ndim))
        if kind == "l2":
            return x.square().sum(dim=dims, keepdim=keep).sqrt()
        return getattr(x, kind)(dim=dims, keepdim=keep)

    return run


def _gather(node: Any, data: Any, indices: Any) -> Any:
    torch = _torch()
    axis = node.attrs.get("axis", 0)
    if _is_shape(data) and _is_shape(indices):
        items = _ints(data)
        if isinstance(indices, list):
            return [items[int(i)] for i in indices]
        return items[int(indices)]
    data = _tensor(data)
    if _is_shape(indices) and not isinstance(indices, list):
        return data.select(axis, int(indices))
    indices = _tensor(indices, data)
    axis = axis % data.ndim
    picked = torch.index_select(data, axis, indices.reshape(-1))
    return picked.reshape(*data.shape[:axis], *indices.shape, *data.shape[axis + 1 :])


def _unsqueeze(node: Any, x: Any, axes: Any = None) -> Any:
    dims = _axes(node, axes) or []
    if _is_shape(x) and not isinstance(x, list) and dims == [0]:
        return [x]
    x = _tensor(x)
    rank = x.ndim + len(dims)
    for dim in sorted(d % rank for d in dims):
        x = x.unsqueeze(dim)
    return x


def _squeeze(node: Any, x: Any, axes: Any = None) -> Any:
    dims = _axes(node, axes)
    if isinstance(x, list) and dims in ([0], None) and len(x) == 1:
        return x[0]
    x = _tensor(x)
    if dims is None:
        return x.squeeze()
    for dim in sorted((d % x.ndim for d in dims), reverse=True):
        x = x.squeeze(dim)
    return x


def _slice(_node: Any, x: Any, starts: Any, ends: Any, axes: Any = None, steps: Any = None) -> Any:
    begin, end = _ints(starts), _ints(ends)
    dims = _ints(axes) if axes is not None else list(range(len(begin)))
    step = _ints(steps) if steps is not None else [1] * len(begin)
    if isinstance(x, list):
        (first,), (last,), (stride,) = begin, end, step
        return x[first : min(last, _INT_MAX) : stride]
    index: list[Any] = [slice(None)] * x.ndim
    for dim, first, last, stride in zip(dims, begin, end, step):
        if stride < 0:
            raise ValueError("Slice with negative steps is not supported")
        index[dim % x.ndim] = slice(first, None if last >= _INT_MAX else last, stride)
    return x[tuple(index)]


def _shape(node: Any, x: Any) -> list[Any]:
    a = node.attrs
    dims = ([len(x)] if isinstance(x, list) else []) if _is_shape(x) else list(x.shape)
    return dims[a.get("start", 0) : a.get("end")]


def _reshape(node: Any, x: Any, shape: Any) -> Any:
    dims = list(_ints(shape))
    if _is_shape(x):  # a shape vector stays one: flat, or a single value
        items = _ints(x)
        return items[0] if not dims and len(items) == 1 else items
    if not node.attrs.get("allowzero", 0):
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


def _concat(node: Any, *parts: Any) -> Any:
    torch = _torch()
    if all(_is_shape(p) for p in parts):
        return [v for p in parts for v in _ints(p)]
    tensors = [_tensor(p) for p in parts]
    like = next(t for t in tensors if t.ndim)
    return torch.cat([t.to(like.dtype) for t in tensors], dim=node.attrs["axis"])


def _cast(node: Any, x: Any) -> Any:
    import onnx

    target = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(node.attrs["to"]))
    if _is_shape(x) and target.kind in "iu":
        return x
    torch = _torch()
    return _tensor(x).to(torch.from_numpy(np.empty(0, target)).dtype)


def _constant_of_shape(node: Any, shape: Any) -> Any:
    torch = _torch()
    value = node.attrs.get("value", np.zeros(1, np.float32))
    dims = _ints(shape)
    if (
        value.dtype == np.int64
        and len(dims) == 1
        and isinstance(dims[0], int)
        and dims[0] <= _SHAPE_CONSTANT_MAX
    ):
        return [int(value.reshape(-1)[0])] * dims[0]  # a shape vector
    return torch.full(
        _ints(shape), value.reshape(-1)[0].item(), dtype=torch.from_numpy(np.array(value)).dtype
    )


def _expand(_node: Any, x: Any, shape: Any) -> Any:
    torch = _torch()
    x = _tensor(x)
    return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(_ints(shape))))


def _where(_node: Any, condition: Any, a: Any, b: Any) -> Any:
    torch = _torch()
    if isinstance(condition, list) and _is_shape(a) and _is_shape(b):
        left = _ints(a) * (len(condition) if not isinstance(a, list) else 1)
        right = _ints(b) * (len(condition) if not isinstance(b, list) else 1)
        return [x if c else y for c, x, y in zip(condition, left, right)]
    a_t = _tensor(a, condition)
    return torch.where(condition, a_t, _tensor(b, a_t).to(a_t.dtype))


def _softmax(name: str) -> Callable[..., Any]:
    def run(node: Any, x: Any) -> Any:
        return getattr(_torch(), name)(x, dim=node.attrs.get("axis", -1))

    return run


def _layer_norm(node: Any, x: Any, scale: Any, bias: Any = None) -> Any:
    a = node.attrs
    axis = a.get("axis", -1) % x.ndim
    return _torch().nn.functional.layer_norm(
        x, tuple(x.shape[axis:]), scale, bias, a.get("epsilon", 1e-5)
    )


def _batch_norm(node: Any, x: Any, scale: Any, bias: Any, mean: Any, var: Any) -> Any:
    eps = node.attrs.get("epsilon", 1e-5)
    return _torch().nn.functional.batch_norm(x, mean, var, scale, bias, False, 0.0, eps)


def _flatten(node: Any, x: Any) -> Any:
    axis = node.attrs.get("axis", 1)
    axis = axis + x.ndim if axis < 0 else axis  # axis == rank is valid: (all, 1)
    return x.reshape(math.prod(x.shape[:axis]) if axis else 1, -1)


def _clip(node: Any, x: Any, low: Any = None, high: Any = None) -> Any:
    a = node.attrs
    low = a.get("min") if low is None else low
    high = a.get("max") if high is None else high
    return _torch().clamp(x, low, high)


def _split(node: Any, x: Any, sizes: Any = None) -> Any:
    a = node.attrs
    axis = a.get("axis", 0)
    parts = _ints(sizes) if sizes is not None else a.get("split")
    if parts is None:
        count = a.get("num_outputs") or len(node.outputs)
        parts = [x.shape[axis] // count] * count
    return tuple(_torch().split(x, list(parts), dim=axis))


def _range(_node: Any, start: Any, limit: Any, delta: Any) -> Any:
    torch = _torch()
    values = [v if _is_shape(v) else v.item() for v in (start, limit, delta)]
    return torch.arange(*values)


def _unary(name: str) -> Callable[..., Any]:
    def run(_node: Any, x: Any) -> Any:
        return getattr(_torch(), name)(_tensor(x))

    return run


def _op_table() -> dict[str, Callable[..., Any]]:
    torch = _torch()
    functional = torch.nn.functional
    return {
        "Identity": lambda _n, x: x,
        "Dropout": lambda _n, x, *_: x,
        "Add": _elementwise(lambda a, b: a + b, torch.add),
        "Sub": _elementwise(lambda a, b: a - b, torch.sub),
        "Mul": _elementwise(lambda a, b: a * b, torch.mul),
        "Div": _elementwise(lambda a, b: a // b, _divide),  # shape values are ints
        "Pow": lambda _n, a, b: torch.pow(a, b if _is_shape(b) else b.to(a.dtype)),
        "MatMul": lambda _n, a, b: torch.matmul(a, b),
        "Gemm": _gemm,
        "Einsum": lambda n, *xs: torch.einsum(n.attrs["equation"], *xs),
        "Conv": _conv,
        "MaxPool": _pool("max"),
        "AveragePool": _pool("avg"),
        "GlobalAveragePool": lambda _n, x: x.mean(dim=tuple(range(2, x.ndim)), keepdim=True),
        "GlobalMaxPool": lambda _n, x: x.amax(dim=tuple(range(2, x.ndim)), keepdim=True),
        "BatchNormalization": _batch_norm,
        "LayerNormalization": _layer_norm,
        "Flatten": _flatten,
        "Reshape": _reshape,
        "Transpose": lambda n, x: x.permute(*n.attrs.get("perm", list(reversed(range(x.ndim))))),
        "Concat": _concat,
        "Split": _split,
        "Shape": _shape,
        "Size": lambda _n, x: x.numel(),
        "Gather": _gather,
        "Unsqueeze": _unsqueeze,
        "Squeeze": _squeeze,
        "Slice": _slice,
        "Cast": _cast,
        "ConstantOfShape": _constant_of_shape,
        "Expand": _expand,
        "Where": _where,
        "Equal": _elementwise(lambda a, b: a == b, torch.eq),
        "Less": lambda _n, a, b: torch.lt(_tensor(a, b), _tensor(b, a)),
        "Greater": lambda _n, a, b: torch.gt(_tensor(a, b), _tensor(b, a)),
        "GreaterOrEqual": lambda _n, a, b: torch.ge(_tensor(a, b), _tensor(b, a)),
        "LessOrEqual": lambda _n, a, b: torch.le(_tensor(a, b), _tensor(b, a)),
        "IsNaN": lambda _n, x: torch.isnan(x),
        "Not": lambda _n, x: torch.logical_not(x),
        "And": lambda _n, a, b: torch.logical_and(a, b),
        "Or": lambda _n, a, b: torch.logical_or(a, b),
        "Min": lambda _n, *xs: _fold(torch.minimum, xs),
        "Max": lambda _n, *xs: _fold(torch.maximum, xs),
        "Sum": lambda _n, *xs: _fold(torch.add, xs),
        "ReduceMean": _reduce("mean"),
        "ReduceSum": _reduce("sum"),
        "ReduceMax": _reduce("amax"),
        "ReduceMin": _reduce("amin"),
        "ReduceL2": _reduce("l2"),
        "Softmax": _softmax("softmax"),
        "LogSoftmax": _softmax("log_softmax"),
        "Relu": lambda _n, x: functional.relu(x),
        "LeakyRelu": lambda n, x: functional.leaky_relu(x, n.attrs.get("alpha", 0.01)),
        "Elu": lambda n, x: functional.elu(x, n.attrs.get("alpha", 1.0)),
        "Sigmoid": _unary("sigmoid"),
        "HardSigmoid": lambda n, x: torch.clamp(
            x * n.attrs.get("alpha", 0.2) + n.attrs.get("beta", 0.5), 0, 1
        ),
        "Tanh": _unary("tanh"),
        "Erf": _unary("erf"),
        "Sqrt": _unary("sqrt"),
        "Exp": _unary("exp"),
        "Log": _unary("log"),
        "Neg": _unary("neg"),
        "Abs": _unary("abs"),
        "Reciprocal": _unary("reciprocal"),
        "Gelu": lambda n, x: functional.gelu(x, approximate=n.attrs.get("approximate", "none")),
        "Clip": _clip,
        "Range": _range,
    }


def _fold(op: Callable[[Any, Any], Any], values: tuple[Any, ...]) -> Any:
    result = values[0]
    for value in values[1:]:
        result = op(result, value)
    return result


class _Constants:
    """An ONNX graph's initializers and Constant nodes: tensors (registered as buffers by the
    module) and small int64 vectors (kept as shape values)."""

    def __init__(self) -> None:
        self.tensors: dict[str, np.ndarray] = {}
        self.shapes: dict[str, Any] = {}

    def add(self, name: str, array: np.ndarray) -> None:
        if array.dtype == np.int64 and array.ndim <= 1 and array.size <= _SHAPE_CONSTANT_MAX:
            self.shapes[name] = [int(v) for v in array.reshape(-1)] if array.ndim else int(array)
        else:
            self.tensors[name] = array


def onnx_module(path: Path, model: str) -> Any:
    """An ``nn.Module`` that computes what the ONNX file at ``path`` computes."""
    import onnx
    from onnx import numpy_helper

    torch = _torch()
    try:
        proto = onnx.load(str(path))
    except Exception as exc:  # protobuf and onnx raise many types for a bad file
        raise ModelLoadError(
            f"model '{model}': cannot read ONNX model {path.name}: {exc}"
        ) from None
    graph = proto.graph
    table = _op_table()
    unsupported = sorted(
        {
            f"{n.domain}.{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
            for n in graph.node
            if (n.op_type not in table and n.op_type != "Constant")
            or n.domain not in ("", "ai.onnx")
        }
    )
    if unsupported:
        raise ModelLoadError(
            f"model '{model}': the ONNX-to-PyTorch converter does not support operator(s) "
            f"{', '.join(unsupported)} (the onnxruntime backend serves this model as it is)"
        )
    constants = _Constants()
    for initializer in graph.initializer:
        constants.add(initializer.name, numpy_helper.to_array(initializer))
    nodes: list[_Node] = []
    for proto_node in graph.node:
        node = _Node(
            proto_node.op_type,
            proto_node.name,
            tuple(proto_node.input),
            tuple(proto_node.output),
            _attrs(proto_node),
        )
        if node.op_type != "Constant":
            nodes.append(node)
            continue
        array = next(
            (
                np.asarray(v)
                for k, v in node.attrs.items()
                if k in ("value", "value_float", "value_int", "value_floats", "value_ints")
            ),
            None,
        )
        if array is None:
            raise ModelLoadError(f"model '{model}': Constant node without a value")
        if array.dtype == np.float64:
            array = array.astype(np.float32)
        constants.add(node.outputs[0], array)
    initialized = {i.name for i in graph.initializer}
    inputs = [i.name for i in graph.input if i.name not in initialized]
    outputs = [o.name for o in graph.output]

    class OnnxModule(torch.nn.Module):  # type: ignore[misc,name-defined]
        """The converted graph (see the module docstring)."""

        def __init__(self) -> None:
            super().__init__()
            self._names: dict[str, str] = {}
            for index, (name, array) in enumerate(constants.tensors.items()):
                attribute = f"c{index}"
                self.register_buffer(attribute, torch.from_numpy(array.copy()))
                self._names[name] = attribute

        def forward(self, *args: Any) -> Any:
            values: dict[str, Any] = dict(constants.shapes)
            values.update({name: getattr(self, a) for name, a in self._names.items()})
            values.update(zip(inputs, args))
            for node in nodes:
                operands = [values[i] if i else None for i in node.inputs]
                while operands and operands[-1] is None:
                    operands.pop()
                try:
                    result = table[node.op_type](node, *operands)
                except ModelLoadError:
                    raise
                except Exception as exc:
                    raise ModelLoadError(
                        f"model '{model}': ONNX node {node.name or node.op_type} "
                        f"({node.op_type}): {exc}"
                    ) from None
                if isinstance(result, tuple):
                    values.update(zip(node.outputs, result))
                else:
                    values[node.outputs[0]] = result
            found = tuple(_tensor(values[name]) for name in outputs)
            return found[0] if len(found) == 1 else found

    return OnnxModule().eval()
