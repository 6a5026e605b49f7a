"""int8 and fp8 GPU engines: an exported program's linear layers quantised by torchao.

torchao quantises ``nn.Linear`` modules, but the module of an exported program calls
``aten.linear`` on plain attributes. ``lift_linears`` turns every such call whose weight
(and bias) are constant attributes back into a call of a real ``nn.Linear`` that holds them,
so ``quantize_`` finds all of them; Inductor then fuses the per-batch activation
quantisation into the neighbouring kernels. Everything outside the linear layers stays in
bf16. Quantising the weights takes well under a second, so the engine cache keeps the bf16
program and the compiled kernels, and the weights are quantised again on every load.

- ``int8``: int8 weights per output channel, activations quantised per token at run time.
- ``fp8``: float8 (e4m3) weights per output channel, activations per token at run time
  (GPUs of compute capability 8.9 and newer: H100, L4, L40).
"""

from __future__ import annotations

import logging
from typing import Any

from enginehouse.errors import ModelLoadError

log = logging.getLogger(__name__)

QUANTIZED = ("int8", "fp8")
# Linear layers this small gain nothing from quantisation (and fp8 needs multiples of 16).
_MIN_FEATURES = 16
# torch._int_mm on CUDA multiplies matrices of more than 16 rows only.
_MIN_ROWS_INT8 = 16


def lift_linears(torch: Any, module: Any) -> int:
    """Replace ``aten.linear(x, weight, bias)`` calls on constant attributes of ``module``
    (a GraphModule) by calls of ``nn.Linear`` submodules holding them; returns how many."""
    linear_ops = {torch.ops.aten.linear.default, torch.nn.functional.linear}
    lifted = 0
    moved: set[str] = set()
    for node in list(module.graph.nodes):
        if node.op != "call_function" or node.target not in linear_ops:
            continue
        if node.kwargs or not 2 <= len(node.args) <= 3:
            continue
        params = [_attribute(module, arg) for arg in node.args[1:]]
        if any(p is None for p in params):
            continue
        weight = params[0]
        bias = params[1] if len(params) == 2 else None
        out_features, in_features = weight.shape
        # Made on the meta device: its own weights would only be replaced.
        layer = torch.nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
        layer.weight = torch.nn.Parameter(weight.detach(), requires_grad=False)
        if bias is not None:
            layer.bias = torch.nn.Parameter(bias.detach(), requires_grad=False)
        name = f"lifted_linear_{lifted}"
        module.add_module(name, layer)
        with module.graph.inserting_before(node):
            call = module.graph.call_module(name, (node.args[0],))
        moved.update(arg.target for arg in node.args[1:])
        node.replace_all_uses_with(call)
        module.graph.erase_node(node)
        lifted += 1
    if lifted:
        module.graph.eliminate_dead_code()
        # The old attributes would keep a second copy of every weight once quantised.
        still_read = {n.target for n in module.graph.nodes if n.op == "get_attr"}
        for target in moved - still_read:
            owner, _, name = target.rpartition(".")
            delattr(module.get_submodule(owner) if owner else module, name)
        module.recompile()
    return lifted


def _attribute(module: Any, node: Any) -> Any:
    """The tensor a ``get_attr`` node reads, or None for anything computed."""
    if getattr(node, "op", None) != "get_attr":
        return None
    value = module
    for part in node.target.split("."):
        value = getattr(value, part, None)
        if value is None:
            return None
    return value if getattr(value, "ndim", 0) in (1, 2) else None


def rows_at_batch_one(torch: Any, module: Any, example: list[Any]) -> dict[str, int]:
    """Rows (all leading dims) each ``nn.Linear`` of ``module`` sees for ``example``."""
    rows: dict[str, int] = {}
    hooks = []
    for name, layer in module.named_modules():
        if isinstance(layer, torch.nn.Linear):

            def record(_layer: Any, args: tuple[Any, ...], _out: Any, name: str = name) -> None:
                rows[name] = min(rows.get(name, 1 << 62), args[0].numel() // args[0].shape[-1])

            hooks.append(layer.register_forward_hook(record))
    try:
        with torch.inference_mode():
            module(*example)
    finally:
        for hook in hooks:
            hook.remove()
    return rows


def quantize(torch: Any, module: Any, precision: str, model: str, example: list[Any]) -> Any:
    """``module`` (bf16, on its GPU) with its linear layers quantised to ``precision``.

    ``example`` is a batch of one: int8 matrix products on the GPU need more than 16 rows,
    so int8 leaves alone the layers that see 16 rows or fewer for one request (a
    classifier head after pooling, say)."""
    try:
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            Int8DynamicActivationInt8WeightConfig,
            PerRow,
            quantize_,
        )
    except ImportError:
        raise ModelLoadError(
            f"model '{model}': {precision} PyTorch engines need torchao: pip install torchao"
        ) from None
    device = next((p.device for p in module.parameters()), None)
    if device is None or device.type != "cuda":
        raise ModelLoadError(
            f"model '{model}': {precision} PyTorch engines are built for the cuda target "
            "(use the onnxruntime backend for int8 on the CPU)"
        )
    if precision == "fp8" and torch.cuda.get_device_capability(device) < (8, 9):
        raise ModelLoadError(
            f"model '{model}': fp8 needs a GPU of compute capability 8.9 or newer, "
            f"{torch.cuda.get_device_name(device)} has "
            "{}.{}".format(*torch.cuda.get_device_capability(device))
        )
    lifted = lift_linears(torch, module)
    rows = rows_at_batch_one(torch, module, example) if precision == "int8" else {}
    config = (
        Int8DynamicActivationInt8WeightConfig()
        if precision == "int8"
        else Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    )

    def worth_it(layer: Any, name: str) -> bool:
        return (
            isinstance(layer, torch.nn.Linear)
            and rows.get(name, _MIN_ROWS_INT8 + 1) > _MIN_ROWS_INT8
            and layer.in_features >= _MIN_FEATURES
            and layer.out_features >= _MIN_FEATURES
            and layer.in_features % 16 == 0
            and layer.out_features % 16 == 0
        )

    quantized = sum(1 for name, layer in module.named_modules() if worth_it(layer, name))
    if not quantized:
        raise ModelLoadError(
            f"model '{model}': {precision} found no linear layer to quantise "
            f"({lifted} linear calls on constant weights)"
        )
    quantize_(module, config, filter_fn=worth_it)
    log.info("model '%s': %d linear layers quantised to %s", model, quantized, precision)
    return module
