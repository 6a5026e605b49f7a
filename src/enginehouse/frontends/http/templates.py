"""Binary-tensor inference requests over HTTP decoded once per kind of JSON header.

With Triton's binary tensor extension a request is a JSON header that names each input's
datatype, shape and byte count, followed by the tensors' raw bytes. A client sends the same
header again and again (perf_analyzer, tritonclient's ``InferInput.set_data_from_numpy``
with ``binary_data=True``): only the bytes after it change. Parsing and checking that header
cost 25 us of the event loop's 160 us per request for two small inputs on the 2-core
machine. So a header is remembered with what it decoded to, and a later body that starts
with the same header and has the same number of bytes after it is not parsed: its tensors
are views of its own bytes at the offsets the first decode found.

A header is remembered only when it alone says everything: every input's bytes in the
binary part (no JSON ``data``, no shared-memory region, no BYTES tensors, which are parsed
element by element), no output written into a region. Everything else is decoded as
always. The model's name and version come from the URL, not the header, and each request
gets its own copy of the request parameters and the output list. A match is never wrong:
the same header bytes parse to the same metadata, and the binary part's length, which the
first decode checked against every input's size, is checked again.
"""

from __future__ import annotations

from dataclasses import dataclass

from enginehouse import datatypes
from enginehouse.core.shared_memory import SharedMemoryRegions
from enginehouse.frontends.http.codec import OutputOptions, decode_infer_request
from enginehouse.frontends.request_kinds import RequestKind, TensorPlace
from enginehouse.messages import InferRequest, RegionTensor

# Kinds remembered at once (emptied when full: a client that sends a new request id every
# time fills it with headers never seen again), and the longest header remembered.
CAPACITY = 256
MAX_HEADER_BYTES = 4096


@dataclass(frozen=True, slots=True)
class _Template:
    """What one header decoded to, but for the model and the tensors' bytes."""

    binary_bytes: int
    kind: RequestKind
    options: OutputOptions


def _template(
    request: InferRequest, options: OutputOptions, header_length: int, binary_bytes: int
) -> _Template | None:
    """The kind of a decoded request whose header says everything; None otherwise. Its
    inputs' bytes lie one after another in the binary part, which starts where the header
    ends (the header's bytes fix its length), in the order of the inputs: that is how the
    decoder took them, and where their sizes add up to the whole binary part, no input took
    its data from anywhere else (one with JSON data then has no elements and no bytes, and
    a view of no bytes is the same empty tensor). The places count from the body's start."""
    if request.output_regions is not None:
        return None
    places = []
    position = header_length
    for item in request.inputs:
        data = item.data
        if isinstance(data, RegionTensor) or datatypes.from_name(item.datatype).name == "BYTES":
            return None
        start, position = position, position + data.nbytes
        places.append(TensorPlace(item.name, item.datatype, data.dtype, item.shape, start))
    if position != header_length + binary_bytes:
        return None
    return _Template(binary_bytes, RequestKind.of(request, places), options)


class HeaderTemplates:
    """The JSON headers of binary-tensor requests seen, with what each decoded to."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        self.capacity = capacity
        self._known: dict[bytes, _Template | None] = {}
        self.hits = 0

    def decode(
        self,
        model_name: str,
        model_version: str,
        body: bytes,
        header_length: int | None,
        regions: SharedMemoryRegions | None = None,
    ) -> tuple[InferRequest, OutputOptions]:
        """What decode_infer_request makes of this body (the same request, the same
        errors)."""
        if header_length is None or not 0 < header_length <= min(len(body), MAX_HEADER_BYTES):
            return decode_infer_request(model_name, model_version, body, header_length, regions)
        header = body[:header_length]
        known = self._known.get(header)
        binary_bytes = len(body) - header_length
        if known is not None and known.binary_bytes == binary_bytes:
            self.hits += 1
            return known.kind.request(model_name, model_version, body), known.options
        request, options = decode_infer_request(
            model_name, model_version, body, header_length, regions
        )
        if header not in self._known:
            if len(self._known) >= self.capacity:
                self._known.clear()
            # None: a header that does not say everything, not looked at again.
            self._known[header] = _template(request, options, header_length, binary_bytes)
        return request, options
