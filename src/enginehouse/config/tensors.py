"""A config's inputs and outputs as the request path reads them, computed once at load."""

from __future__ import annotations

from dataclasses import dataclass

from tritonclient.grpc import model_config_pb2 as mc

from enginehouse import datatypes


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A config input or output: wire datatype, client dims, and the engine's reshape."""

    name: str
    datatype: str
    dims: tuple[int, ...]
    reshape: tuple[int, ...] | None
    optional: bool

    @classmethod
    def from_config(cls, tensor: mc.ModelInput | mc.ModelOutput) -> TensorSpec:
        reshape = tuple(tensor.reshape.shape) if tensor.HasField("reshape") else None
        optional = bool(getattr(tensor, "optional", False))
        datatype = datatypes.BY_CONFIG[tensor.data_type].name
        return cls(tensor.name, datatype, tuple(tensor.dims), reshape, optional)


def input_specs(config: mc.ModelConfig) -> dict[str, TensorSpec]:
    return {t.name: TensorSpec.from_config(t) for t in config.input}


def output_specs(config: mc.ModelConfig) -> dict[str, TensorSpec]:
    return {t.name: TensorSpec.from_config(t) for t in config.output}
