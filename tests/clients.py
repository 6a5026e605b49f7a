"""Client helpers shared by tests."""

from __future__ import annotations

import queue
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import np_to_triton_dtype


def infer_all_at_once(
    client: grpcclient.InferenceServerClient, model: str, name: str, arrays: list[np.ndarray]
) -> list[np.ndarray]:
    """Send one request per array (of the array's datatype), all in flight together, and
    return each request's first output in the order sent (so that a batching server merges
    them)."""
    answers: queue.Queue[tuple[int, Any, Any]] = queue.Queue()
    for index, array in enumerate(arrays):
        item = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        item.set_data_from_numpy(array)
        client.async_infer(
            model,
            [item],
            lambda result, error, i=index: answers.put((i, result, error)),
        )
    outputs: list[np.ndarray | None] = [None] * len(arrays)
    for _ in arrays:
        index, result, error = answers.get(timeout=60)
        assert error is None, error
        assert outputs[index] is None, f"request {index} was answered twice"
        output = result.as_numpy(result.get_response().outputs[0].name)
        assert output is not None, f"request {index}'s answer has no output data"
        outputs[index] = output
    return [o for o in outputs if o is not None]


def served_and_eager_logits(
    client: httpclient.InferenceServerClient, model: str, module: Any, rows: int
) -> tuple[np.ndarray, np.ndarray]:
    """A batch of ``rows`` seeded 3x16x16 images sent to ``model`` as its ``image`` over HTTP:
    the ``logits`` it answers, and the eager PyTorch ``module``'s own for the same images."""
    import torch

    image = np.random.default_rng(rows).standard_normal((rows, 3, 16, 16), np.float32)
    tensor = httpclient.InferInput("image", list(image.shape), "FP32")
    tensor.set_data_from_numpy(image)
    served = client.infer(model, [tensor]).as_numpy("logits")
    with torch.inference_mode():
        eager = module(torch.from_numpy(image)).numpy()
    return served, eager
