"""When a round closes, and how old an update may be: pure decisions, the gateway acts on them.

Synchronous mode: a round closes at the first of (a) quorum: ceil(quorum * expected) accepted updates, where the
expected devices are the announcement's cohort (or every enrolled device when the cohort is empty), and at least
`min_updates`; (b) the deadline: the cloud's deadline minus `deadline_margin_s` (time to aggregate and forward), or
`round_timeout_s` after the edge saw the announcement when that is sooner. Updates for any other round are
WRONG_ROUND; updates for this round after it closed are DEADLINE.

Buffered asynchronous mode (FedBuff, Nguyen et al. 2022): every `buffer_k` accepted updates form one aggregate.
An update trained on model version v arriving when the current version is V has staleness s = V - v and weight
sigma(s) = (1 + s)^(-a) (a = `staleness_exponent`; Xie et al.'s polynomial staleness function); s > `max_staleness`
is rejected as STALE. Duplicates are keyed by (device, round) in both modes and counted once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from protocol.errors import ProtocolError, Reason

MODES = ("sync", "async")
ROUND_EXCUSES = ("skipped", "declined", "budget_exhausted")   # statuses that excuse a device from their round


@dataclass(frozen=True)
class RoundsConfig:
    """The edge's [rounds] table: sync quorum, minimum and deadline margin, or async buffer size and staleness limit."""

    mode: str = "sync"
    quorum: float = 1.0
    min_updates: int = 1
    deadline_margin_s: float = 0.0
    round_timeout_s: float = 0.0
    buffer_k: int = 10
    max_staleness: int = 4
    staleness_exponent: float = 0.5

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"rounds.mode {self.mode!r} not in {MODES}")
        if not 0.0 < self.quorum <= 1.0 or self.min_updates < 0 or self.buffer_k < 1 or self.max_staleness < 0:
            raise ValueError("rounds: need 0 < quorum <= 1, min_updates >= 0, buffer_k >= 1, max_staleness >= 0")


def expected_devices(cohort: list[str], enrolled: set[str]) -> set[str]:
    """The devices a round waits for: the cohort's enrolled ones, or every enrolled device when the cohort is empty."""
    return set(cohort) & enrolled if cohort else set(enrolled)


def excuses(status: tuple[str, int | None] | None, round_id: int) -> bool:
    """Whether a device's last known status (state, round) excuses it from round `round_id`'s quorum: "offline"
    until it returns (an "online"/"training" status or an update replaces it); "skipped", "declined" and
    "budget_exhausted" for the round they name only."""
    if status is None:
        return False
    state, status_round = status
    return state == "offline" or (state in ROUND_EXCUSES and status_round == round_id)


def quorum_count(n_expected: int, cfg: RoundsConfig) -> int:
    """Accepted updates that close a synchronous round early: ceil(quorum * expected), at least `min_updates`."""
    return max(cfg.min_updates, math.ceil(cfg.quorum * n_expected))


def close_time(deadline: float, opened: float, cfg: RoundsConfig) -> float:
    """When a synchronous round closes at the latest: the cloud's deadline minus the margin, or `round_timeout_s`
    after opening when that is sooner."""
    end = deadline - cfg.deadline_margin_s
    return min(end, opened + cfg.round_timeout_s) if cfg.round_timeout_s > 0 else end


def sync_close_reason(n_accepted: int, n_expected: int, now: float, deadline: float, opened: float,
                      cfg: RoundsConfig) -> str | None:
    """"quorum", "deadline" or None (keep collecting)."""
    if n_expected and n_accepted >= quorum_count(n_expected, cfg):
        return "quorum"
    if now >= close_time(deadline, opened, cfg):
        return "deadline"
    return None


def staleness(current_version: int, base_version: int, cfg: RoundsConfig) -> int:
    """s = current - base; ProtocolError(STALE) beyond max_staleness, BAD_VALUE for an update from the future."""
    s = current_version - base_version
    if s < 0:
        raise ProtocolError(Reason.BAD_VALUE, f"base version {base_version} is newer than {current_version}")
    if s > cfg.max_staleness:
        raise ProtocolError(Reason.STALE, f"staleness {s} > {cfg.max_staleness}")
    return s


def staleness_weight(s: np.ndarray | int, exponent: float) -> np.ndarray:
    """FedBuff's weight sigma(s) = (1 + s)^-exponent of an update with staleness s."""
    return (1.0 + np.asarray(s, dtype=np.float64)) ** (-exponent)
