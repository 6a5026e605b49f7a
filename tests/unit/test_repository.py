from __future__ import annotations

from pathlib import Path

import pytest
from tritonclient.grpc import model_config_pb2 as mc

from enginehouse.errors import InvalidArgumentError, ModelLoadError, NotFoundError
from enginehouse.repository import ModelRepository, check_model_name, select_versions


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", "a\\b", ".hidden", "x\x00"])
def test_unsafe_names(name: str) -> None:
    with pytest.raises(InvalidArgumentError):
        check_model_name(name)


def test_locate_and_versions(tmp_path: Path) -> None:
    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "12").mkdir()
    (tmp_path / "m" / "01").mkdir()
    (tmp_path / "m" / "notes").mkdir()
    repo = ModelRepository([tmp_path])
    location = repo.locate("m")
    assert sorted(location.version_dirs()) == [1, 12]
    with pytest.raises(NotFoundError):
        repo.locate("other")


def test_symlink_out_of_the_repository_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "repo"
    root.mkdir()
    (root / "escape").symlink_to(outside)
    with pytest.raises(InvalidArgumentError, match="outside"):
        ModelRepository([root]).locate("escape")


def test_duplicate_names_across_repositories(tmp_path: Path) -> None:
    for root in ("a", "b"):
        (tmp_path / root / "m").mkdir(parents=True)
    repo = ModelRepository([tmp_path / "a", tmp_path / "b"])
    assert repo.model_names() == ["m"]
    with pytest.raises(ModelLoadError, match="more than one"):
        repo.locate("m")


def test_version_policies() -> None:
    versions = [3, 1, 7, 2]
    assert select_versions(mc.ModelVersionPolicy(), versions) == [7]
    latest = mc.ModelVersionPolicy(latest=mc.ModelVersionPolicy.Latest(num_versions=2))
    assert select_versions(latest, versions) == [3, 7]
    assert select_versions(mc.ModelVersionPolicy(all=mc.ModelVersionPolicy.All()), versions) == [
        1,
        2,
        3,
        7,
    ]
    specific = mc.ModelVersionPolicy(specific=mc.ModelVersionPolicy.Specific(versions=[2, 9]))
    assert select_versions(specific, versions) == [2]
