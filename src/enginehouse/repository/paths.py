"""Paths that a model config names, kept inside the model's folder.

A config can come from a client (a repository-API load with a ``config`` override), so every
file or folder it names is client input: ``default_model_filename``, a warm-up entry's
``input_data_file``, the ``engine_calibration`` folder, and whatever is added later. Each is
resolved here, after symlinks, and refused unless it stays inside the model folder; the
loader checks all of them before it reads or builds anything, so a bad path fails the load
with a 400 naming the field and no file outside the repository is ever opened.
"""

from __future__ import annotations

from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from enginehouse.errors import ModelLoadError

# Where Triton looks for warm-up input files, relative to the model folder.
WARMUP_FOLDER = "warmup"


def contained(model_dir: Path, relative: str, field: str, model: str) -> Path:
    """``model_dir / relative`` resolved, or a 400 naming ``field`` when it is absolute or
    leads (through ``..`` or a symlink) outside the model folder."""
    root = model_dir.resolve()
    if not relative or "\x00" in relative or Path(relative).is_absolute():
        raise ModelLoadError(
            f"model '{model}': {field} '{relative}' must be a relative path inside the model folder"
        )
    path = (root / relative).resolve()
    if path != root and root not in path.parents:
        raise ModelLoadError(
            f"model '{model}': {field} '{relative}' leads outside the model folder"
        )
    return path


def check_config_paths(
    config: mc.ModelConfig, model_dir: Path, version_dirs: dict[int, Path]
) -> None:
    """Refuse a config any of whose paths leaves the model folder (checked before loading)."""
    name = config.name
    if config.default_model_filename:
        filename = config.default_model_filename
        if "/" in filename or "\\" in filename or filename in (".", ".."):
            raise ModelLoadError(
                f"model '{name}': default_model_filename '{filename}' must be a file name in "
                "the version folder, not a path"
            )
        for folder in version_dirs.values():
            contained(model_dir, f"{folder.name}/{filename}", "default_model_filename", name)
    for warmup in config.model_warmup:
        for input_name, spec in warmup.inputs.items():
            if spec.WhichOneof("input_data_type") == "input_data_file":
                contained(
                    model_dir,
                    f"{WARMUP_FOLDER}/{spec.input_data_file}",
                    f"model_warmup '{warmup.name}' input '{input_name}' input_data_file",
                    name,
                )
    if "engine_calibration" in config.parameters:
        folder = config.parameters["engine_calibration"].string_value
        if folder:
            contained(model_dir, folder, "parameter engine_calibration", name)
