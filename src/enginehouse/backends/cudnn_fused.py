"""Shapes for cuDNN's fused convolutions, so that programs holding them trace and compile.

``aten.cudnn_convolution_relu`` (convolution, bias, ReLU) and
``aten.cudnn_convolution_add_relu`` (the same with a residual added before the ReLU) run as
one cuDNN call each, but torch registers no meta kernels for them: export with a symbolic
batch, Inductor's fake tensors and its shape planning cannot tell what they return. The
kernels here say it as the CUDA kernels do: the convolution's output size, in the memory
format cuDNN is asked for (channels-last where the image or the weight is), so that the
strides Inductor plans with are the ones the kernels then produce.

The builder puts these ops into GPU programs (builder/conv_fusion.py); an engine that loads
such a program registers the kernels before anything traces it.
"""

from __future__ import annotations

from typing import Any

from enginehouse.backends.torch_programs import import_torch

RELU = "cudnn_convolution_relu"
ADD_RELU = "cudnn_convolution_add_relu"

# The library handle keeps the registrations alive for the life of the process.
_LIBRARY: Any = None


def _output(torch: Any, image: Any, weight: Any, stride: Any, padding: Any, dilation: Any) -> Any:
    """The empty output of a 2-D convolution of ``image`` by ``weight``."""
    sizes = [image.shape[0], weight.shape[0]]
    for axis in range(2):
        span = dilation[axis] * (weight.shape[2 + axis] - 1) + 1
        sizes.append((image.shape[2 + axis] + 2 * padding[axis] - span) // stride[axis] + 1)
    from torch._prims_common import suggest_memory_format

    channels_last = torch.channels_last in (
        suggest_memory_format(image),
        suggest_memory_format(weight),
    )
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(sizes, dtype=image.dtype, device=image.device, memory_format=layout)


def register(torch: Any = None) -> None:
    """Register the meta kernels once, where this torch has none of its own."""
    global _LIBRARY
    if _LIBRARY is not None:
        return
    torch = torch or import_torch()
    library = torch.library.Library("aten", "IMPL", "Meta")

    def kernel(image: Any, weight: Any, *rest: Any) -> Any:
        # Both ops end with the convolution's geometry: stride, padding, dilation, groups.
        stride, padding, dilation, _ = rest[-4:]
        return _output(torch, image, weight, stride, padding, dilation)

    for name in (RELU, ADD_RELU):
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{name}", "Meta"):
            library.impl(name, kernel)
    _LIBRARY = library
