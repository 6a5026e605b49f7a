"""Protobuf messages to and from the JSON Triton speaks.

Protobuf's own JSON mapping writes 64-bit integers as strings; Triton writes them as
numbers (``"dims": [16]``), and clients index into those numbers. This module keeps
protobuf's field names and defaults and turns the 64-bit integers back into numbers.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

_INT64_TYPES = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED64,
}


def message_to_json_dict(message: Message) -> dict[str, Any]:
    """The message as Triton's JSON: snake_case names, defaults shown, int64 as numbers."""
    raw = json_format.MessageToDict(
        message,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
    )
    _numbers_for_int64(message.DESCRIPTOR, raw)
    return raw


def is_repeated(field: FieldDescriptor) -> bool:
    """Whether a field is repeated, on protobuf releases before and after ``label``."""
    flag = getattr(field, "is_repeated", None)
    if isinstance(flag, bool):
        return flag
    return bool(field.label == FieldDescriptor.LABEL_REPEATED)


def _numbers_for_int64(descriptor: Descriptor, value: dict[str, Any]) -> None:
    for field in descriptor.fields:
        if field.name not in value:
            continue
        item = value[field.name]
        if field.message_type is not None:
            entry = field.message_type
            if entry.GetOptions().map_entry:
                value_field = entry.fields_by_name["value"]
                for key, sub in item.items():
                    if value_field.message_type is not None:
                        _numbers_for_int64(value_field.message_type, sub)
                    elif value_field.type in _INT64_TYPES:
                        item[key] = int(sub)
            elif is_repeated(field):
                for sub in item:
                    _numbers_for_int64(entry, sub)
            else:
                _numbers_for_int64(entry, item)
        elif field.type in _INT64_TYPES:
            value[field.name] = [int(v) for v in item] if is_repeated(field) else int(item)


def json_dict_to_message(value: Any, message: Message) -> Message:
    """Fill ``message`` from a JSON value; unknown fields are an error."""
    json_format.ParseDict(value, message)
    return message
