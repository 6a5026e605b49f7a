"""The model repository on disk."""

from enginehouse.repository.repository import (
    ModelLocation,
    ModelRepository,
    check_model_name,
    select_versions,
)

__all__ = ["ModelLocation", "ModelRepository", "check_model_name", "select_versions"]
