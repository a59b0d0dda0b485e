"""DATA PATH: the flexemr wire protocol (header in frame.py, payloads in codec.py).

No pickle, no JSON: fixed struct headers and numpy sections only.
"""

from flexemr.wire.frame import (
    DEFAULT_MAX_PAYLOAD,
    HEADER_SIZE,
    MAGIC,
    VERSION,
    ErrorCode,
    FrameFlag,
    FrameType,
    Header,
    pack_header,
    unpack_header,
)

__all__ = [
    "DEFAULT_MAX_PAYLOAD", "HEADER_SIZE", "MAGIC", "VERSION", "ErrorCode", "FrameFlag", "FrameType",
    "Header", "pack_header", "unpack_header",
]
