"""The one error type that crosses the wire boundary, with stable reason codes.

The same codes appear in rejection messages (`Ack.reason`), metrics labels and logs, so they never change meaning;
new reasons get new numbers.
"""

from __future__ import annotations

from enum import IntEnum


class Reason(IntEnum):
    """Stable reason codes shared by Ack.reason, metrics labels and logs; a code never changes meaning."""

    OK = 0
    MALFORMED = 1          # not CBOR, wrong container, missing/extra field
    TOO_LARGE = 2          # message or container over its limit
    UNKNOWN_VERSION = 3    # schema version we do not speak
    WRONG_TYPE = 4         # a field of the wrong CBOR type, or an unknown message type
    BAD_SHAPE = 5          # length/shape does not match the model version
    NON_FINITE = 6         # NaN or Inf
    BAD_INDEX = 7          # sparse index out of range, unsorted or repeated
    BAD_SIGNATURE = 8      # signature/MAC does not verify
    REPLAY = 9             # nonce seen before
    WRONG_ROUND = 10       # not the open round
    UNKNOWN_SENDER = 11    # device/edge not enrolled
    STALE = 12             # too stale for the asynchronous buffer
    DUPLICATE = 13         # (sender, round) already counted
    WRONG_SENDER = 14      # topic and claimed sender disagree
    BUDGET_EXHAUSTED = 15  # privacy budget spent
    DEADLINE = 16          # arrived after the round closed
    BAD_HASH = 17          # content hash mismatch (bundles, chunks)
    DOWNGRADE = 18         # older model/bundle version than installed
    INCOMPLETE = 19        # chunk set timed out / missing parts
    FILTERED = 20          # flagged by an anomaly filter
    BAD_VALUE = 21         # out of the allowed range
    SECAGG_ABORT = 22      # secure aggregation below threshold / protocol violation
    REVOKED = 23           # the sender's certificate is on the CRL

    @classmethod
    def name_of(cls, code: int) -> str:
        """A code read from the wire, for logs: its name, or the number when this version does not know it."""
        return cls(code).name if code in cls._value2member_map_ else str(code)


class ProtocolError(ValueError):
    """A hostile or unusable message. Carries a reason code; never leaves a half-applied state behind."""

    def __init__(self, reason: Reason, detail: str = "") -> None:
        super().__init__(f"{reason.name}: {detail}" if detail else reason.name)
        self.reason = reason
        self.detail = detail
