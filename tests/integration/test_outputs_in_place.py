"""Large outputs that ONNX Runtime writes straight into a client's mapped system region
(I/O binding), driven by tritonclient over both protocols: the bytes land where asked, next
to an output that travels in the response, and a region whose object the client truncated
is a 400 whether the write met a missing page (the guard) or only a short last page."""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from onnx import TensorProto, helper
from tritonclient.utils import InferenceServerException

from enginehouse.core import mapping_guard
from enginehouse.core.shared_memory import IN_PLACE_OUTPUT_BYTES
from tests.conftest import InProcessServer
from tests.integration.test_shared_memory import Regions
from tests.models import save

pytestmark = pytest.mark.skipif(not mapping_guard.AVAILABLE, reason="needs the mapping guard")

ELEMENTS = 2 * IN_PLACE_OUTPUT_BYTES // 4  # FP32: twice the least that is written in place
BYTES = ELEMENTS * 4
CONFIG = f"""name: "twice"
backend: "onnxruntime"
max_batch_size: 4
input [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ {ELEMENTS} ] }} ]
output [ {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ {ELEMENTS} ] }},
         {{ name: "OUTPUT1" data_type: TYPE_FP32 dims: [ {ELEMENTS} ] }} ]
"""


def _twice() -> onnx.ModelProto:
    """OUTPUT0 = INPUT0 + INPUT0, OUTPUT1 = INPUT0."""
    shape = ["batch", ELEMENTS]
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["INPUT0", "INPUT0"], ["OUTPUT0"]),
            helper.make_node("Identity", ["INPUT0"], ["OUTPUT1"]),
        ],
        "twice",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, shape)],
        [
            helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, shape),
            helper.make_tensor_value_info("OUTPUT1", TensorProto.FLOAT, shape),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    repo = tmp_path_factory.mktemp("repo")
    save(_twice(), repo, "twice", CONFIG)
    with InProcessServer.live(
        [repo],
        "--map-shared-memory",
        "true",
        log_path=tmp_path_factory.mktemp("log") / "server.log",
    ) as server:
        yield server


@dataclass
class Client:
    """A tritonclient module, its connection, and the regions the test made through it."""

    module: Any
    connection: Any
    regions: Regions

    def region(self, size: int) -> tuple[str, str, Any]:
        return self.regions.make(size)


@pytest.fixture(params=[(httpclient, "http"), (grpcclient, "grpc")], ids=["http", "grpc"])
def client(request: pytest.FixtureRequest, served: InProcessServer) -> Iterator[Client]:
    module, protocol = request.param
    connection = module.InferenceServerClient(
        served.http_url if protocol == "http" else served.grpc_url
    )
    regions = Regions(connection)
    try:
        yield Client(module, connection, regions)
    finally:
        regions.close()


def _infer(client: Client, image: np.ndarray, output: str) -> Any:
    inputs = client.module.InferInput("INPUT0", list(image.shape), "FP32")
    inputs.set_data_from_numpy(image)
    in_place = client.module.InferRequestedOutput("OUTPUT0")
    in_place.set_shared_memory(output, image.nbytes)
    return client.connection.infer("twice", [inputs], outputs=[in_place])


def test_outputs_land_in_their_region(client: Client) -> None:
    module, connection = client.module, client.connection
    rows = 2
    image = np.random.default_rng(0).standard_normal((rows, ELEMENTS)).astype(np.float32)
    both, _, handle = client.region(2 * rows * BYTES)
    outputs = []
    for index, name in enumerate(("OUTPUT0", "OUTPUT1")):
        requested = module.InferRequestedOutput(name)
        requested.set_shared_memory(both, rows * BYTES, offset=index * rows * BYTES)
        outputs.append(requested)
    inputs = module.InferInput("INPUT0", [rows, ELEMENTS], "FP32")
    inputs.set_data_from_numpy(image)
    connection.infer("twice", [inputs], outputs=outputs)
    np.testing.assert_array_equal(
        shm.get_contents_as_numpy(handle, np.float32, [rows, ELEMENTS]), image + image
    )
    np.testing.assert_array_equal(
        shm.get_contents_as_numpy(handle, np.float32, [rows, ELEMENTS], offset=rows * BYTES),
        image,
    )
    # One output in a region, the other in the response: both right.
    one, _, one_handle = client.region(BYTES)
    in_place = module.InferRequestedOutput("OUTPUT0")
    in_place.set_shared_memory(one, BYTES)
    inputs = module.InferInput("INPUT0", [1, ELEMENTS], "FP32")
    inputs.set_data_from_numpy(image[:1])
    result = connection.infer(
        "twice", [inputs], outputs=[in_place, module.InferRequestedOutput("OUTPUT1")]
    )
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), image[:1])
    np.testing.assert_array_equal(
        shm.get_contents_as_numpy(one_handle, np.float32, [1, ELEMENTS]), image[:1] + image[:1]
    )


@pytest.mark.parametrize(
    "kept", [10 * mmap.PAGESIZE, BYTES - 100], ids=["pages-gone", "last-page-short"]
)
def test_an_output_region_truncated_before_the_run_is_refused(client: Client, kept: int) -> None:
    image = np.ones((1, ELEMENTS), np.float32)
    name, key, _ = client.region(BYTES)
    os.truncate(Path("/dev/shm") / key.lstrip("/"), kept)
    with pytest.raises(InferenceServerException) as failure:
        _infer(client, image, name)
    assert "truncated" in str(failure.value)
    assert "400" in str(failure.value.status()) or "INVALID_ARGUMENT" in str(failure.value.status())
    # The server serves on: a whole region takes the output.
    whole, _, handle = client.region(BYTES)
    _infer(client, image, whole)
    np.testing.assert_array_equal(
        shm.get_contents_as_numpy(handle, np.float32, [1, ELEMENTS]), image + image
    )
