"""Which version of a model serves a request that names none.

As in Triton, the highest-numbered ready version, unless the config asks for a canary
split: ``parameters { key: "version_weights" value { string_value: "2:10,1:90" } }`` sends
unversioned requests to versions 2 and 1 in proportion 10:90. Versions left out of the
weights (or weighted 0) serve only requests that name them. The weights are part of the
model's config, so a reload that changes only them switches the split without reloading
any version.
"""

from __future__ import annotations

import bisect
import logging
import random
from dataclasses import dataclass
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from enginehouse.config import model_config
from enginehouse.core.model import ModelVersion
from enginehouse.errors import ModelLoadError

log = logging.getLogger(__name__)

WEIGHTS_PARAMETER = "version_weights"


def parse_version_weights(config: mc.ModelConfig) -> dict[int, float]:
    """The ``version_weights`` parameter as {version: weight}; empty when not set."""
    text = model_config.parameter(config, WEIGHTS_PARAMETER).strip()
    if not text:
        return {}
    weights: dict[int, float] = {}
    for item in text.split(","):
        version, sep, weight = item.partition(":")
        try:
            number, share = int(version), float(weight)
        except ValueError:
            number, share = 0, -1.0
        if not sep or number <= 0 or not share >= 0 or share == float("inf"):
            raise ModelLoadError(
                f"model '{config.name}': parameter {WEIGHTS_PARAMETER} must look like "
                f"'2:10,1:90' (version:weight, weights >= 0); got '{text}'"
            )
        weights[number] = share
    if not any(weights.values()):
        raise ModelLoadError(f"model '{config.name}': {WEIGHTS_PARAMETER} are all zero")
    return weights


@dataclass(slots=True)
class ServedModel:
    """The ready versions of one model and how an unversioned request finds one."""

    config: mc.ModelConfig
    versions: dict[str, ModelVersion]
    default: ModelVersion
    # Cumulative weight bounds and their versions, when a canary split is configured.
    bounds: list[float] | None = None
    weighted: list[ModelVersion] | None = None
    # The folder a load request's file overrides were written to; removed with the model.
    staging: Path | None = None

    @classmethod
    def of(
        cls,
        config: mc.ModelConfig,
        versions: dict[int, ModelVersion],
        staging: Path | None = None,
    ) -> ServedModel:
        ordered = sorted(versions)
        served = cls(
            config,
            {str(v): versions[v] for v in ordered},
            versions[ordered[-1]],
            staging=staging,
        )
        weights = parse_version_weights(config)
        split = [(v, w) for v, w in sorted(weights.items()) if w > 0 and v in versions]
        if weights and not split:
            log.warning(
                "model '%s': no version in %s is ready; serving version %d",
                config.name,
                WEIGHTS_PARAMETER,
                ordered[-1],
            )
        elif split:
            total = sum(w for _, w in split)
            running = 0.0
            served.bounds, served.weighted = [], []
            for version, weight in split:
                running += weight / total
                served.bounds.append(running)
                served.weighted.append(versions[version])
            served.bounds[-1] = 1.0
            absent = sorted(set(weights) - set(versions))
            if absent:
                log.warning(
                    "model '%s': versions %s of %s are not ready; their share goes to the others",
                    config.name,
                    absent,
                    WEIGHTS_PARAMETER,
                )
        return served

    def pick(self) -> ModelVersion:
        """The version for a request without one: the default, or a weighted draw."""
        if self.bounds is None or self.weighted is None:
            return self.default
        index = bisect.bisect_right(self.bounds, random.random())
        return self.weighted[min(index, len(self.weighted) - 1)]
