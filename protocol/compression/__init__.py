"""Update compression: sparsify, quantise, code indices, entropy-code; strict decoding of hostile payloads."""

from protocol.compression.adaptive import adaptive_settings
from protocol.compression.codec import (
    HEADER_BYTES,
    PayloadHeader,
    decode_sparse,
    decode_update,
    encode_update,
    encoded_size_bound,
    max_payload_bytes,
    read_header,
)
from protocol.compression.settings import CompressionSettings
from protocol.compression.sparsify import randk_indices, topk_indices

__all__ = [
    "HEADER_BYTES",
    "CompressionSettings",
    "PayloadHeader",
    "adaptive_settings",
    "decode_sparse",
    "decode_update",
    "encode_update",
    "encoded_size_bound",
    "max_payload_bytes",
    "randk_indices",
    "read_header",
    "topk_indices",
]
