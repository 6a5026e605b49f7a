from __future__ import annotations

import numpy as np
import pytest

from enginehouse import datatypes
from enginehouse.errors import InvalidArgumentError


def test_tables_agree() -> None:
    for name, dtype in datatypes.BY_NAME.items():
        assert datatypes.BY_CONFIG[dtype.config_type] is dtype
        assert datatypes.BY_ONNX[dtype.onnx] is dtype
        assert dtype.name == name


def test_bytes_round_trip() -> None:
    array = np.array([[b"a", b""], [b"\x00\xff", "\u00e9".encode()]], dtype=np.object_)
    wire = datatypes.serialize_bytes(array)
    assert wire[:4] == (1).to_bytes(4, "little")
    back = datatypes.from_wire_bytes(wire, datatypes.BY_NAME["BYTES"], (2, 2), "x")
    assert back.tolist() == array.tolist()


@pytest.mark.parametrize("wire", [b"\x05\x00\x00\x00abc", b"\x01\x00\x00\x00a\x00", b"\x01\x00"])
def test_bytes_framing_errors_name_the_input(wire: bytes) -> None:
    with pytest.raises(InvalidArgumentError, match="'tokens'"):
        datatypes.deserialize_bytes(wire, 1, "tokens")


def test_fixed_size_views_do_not_copy() -> None:
    body = bytearray(np.arange(6, dtype=np.float32).tobytes())
    view = datatypes.from_wire_bytes(memoryview(body), datatypes.BY_NAME["FP32"], (2, 3), "x")
    body[0:4] = np.float32(9).tobytes()
    assert view[0, 0] == 9


def test_fixed_size_length_mismatch() -> None:
    with pytest.raises(InvalidArgumentError, match="expected 24 bytes"):
        datatypes.from_wire_bytes(b"\x00" * 20, datatypes.BY_NAME["FP32"], (2, 3), "x")


def test_unknown_names() -> None:
    with pytest.raises(InvalidArgumentError, match="FLOAT"):
        datatypes.from_name("FLOAT")
    assert datatypes.from_numpy(np.dtype("U3")).name == "BYTES"
