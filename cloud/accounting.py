"""Two-level privacy accounting with dp-accounting (RDP and PLD), Opacus-style: the state is a history of
(noise_mult, sample_rate, steps) entries and epsilon is derived from it (with protocol.accountant, the code the devices
run), so anyone can recompute the report from the checkpoint.

- Device level (example-level DP-SGD on each device): one event per round (noise_mult, sample_rate q = batch /
  local examples, steps), re-derived from the round's plan and the smallest counted device's dataset that the edges
  report (EdgeAggregate.min_device_samples; a masked round, which cannot report it, the smallest per-edge mean:
  cloud.rounds.account_round), composed as if that device took part in every round. Where the plan lets devices
  calibrate their noise to a target epsilon, the event takes the noise that device calibrates after this history.
  The devices' own reports (EdgeAggregate.max_device_epsilon, each device's accountant over its actual rounds and
  dataset) are kept next to it; the device-level epsilon is the larger of the two.
- Edge level (user-level central DP: each device's delta clipped, Gaussian noise on the sum): one event per round
  (noise_mult, sampling_rate, 1 step), taking the weakest edge of the round (smallest noise, largest rate).
An entry with noise 0 and at least one step makes epsilon infinite (reported as None in JSON).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from device.training import calibrated_plan, planned_steps
from protocol.accountant import ACCOUNTANTS, Entry
from protocol.accountant import epsilon as history_epsilon
from protocol.messages import CentralDPReport, TrainingPlan

__all__ = ["ACCOUNTANTS", "Entry", "PrivacyLedger", "central_event", "device_event", "epsilon", "exhausted",
           "json_epsilon"]


def epsilon(history: Iterable[Entry], delta: float, accountant: str = "rdp") -> float:
    """epsilon(delta) of `history` (protocol.accountant's composition); entries with the same noise and rate are
    merged first: the same mechanism composed, and PLD's cost grows with the number of entries."""
    groups: Counter = Counter()
    for e in history:
        groups[(e.noise_mult, e.sample_rate)] += e.steps
    return history_epsilon(tuple(Entry(z, q, n) for (z, q), n in sorted(groups.items())), delta, accountant)


def device_event(plan: TrainingPlan, min_local_examples: int, history: Sequence[Entry] = ()) -> Entry:
    """A device's example-level DP-SGD in one round as the device runs it (device.training.planned_steps):
    q = batch / n examples, epochs * ceil(n / batch) steps, capped by max_steps; under plan.target_epsilon the
    noise a device whose own budget and delta are at least the plan's target calibrates after `history`
    (device.training.calibrated_plan, the device's own function; a device with a smaller budget or delta, or an
    earlier lifetime history, adds more)."""
    if min_local_examples <= 0:
        return Entry(plan.noise_mult, 0.0, 0)
    plan = calibrated_plan(plan, history, min_local_examples, plan.target_epsilon, plan.target_delta)
    return Entry(plan.noise_mult, min(1.0, plan.batch_size / min_local_examples),
                 planned_steps(plan, min_local_examples, plan.batch_size))


def central_event(reports: Iterable[CentralDPReport | None]) -> Entry:
    """The weakest edge's user-level mechanism this round; an edge without central DP makes it noise 0."""
    reports = list(reports)
    if not reports:
        return Entry(0.0, 0.0, 0)
    if any(r is None for r in reports):
        return Entry(0.0, 1.0, 1)
    return Entry(min(r.noise_mult for r in reports), max(r.sampling_rate for r in reports), 1)


@dataclass
class PrivacyLedger:
    """Histories per level plus the largest device epsilon the edges reported; JSON-serialisable for checkpoints."""

    delta: float = 1e-5
    device: list[Entry] = field(default_factory=list)
    central: list[Entry] = field(default_factory=list)
    device_reported: float = 0.0

    def report(self, accountant: str = "rdp", extra_device: Entry | None = None,
               extra_central: Entry | None = None) -> dict[str, float]:
        """epsilon(delta) per level ("device" = max(derived, reported)); `extra_*` project one more round."""
        device = epsilon(self.device + ([extra_device] if extra_device else []), self.delta, accountant)
        return {"device": max(device, self.device_reported), "device_derived": device,
                "device_reported": self.device_reported,
                "central": epsilon(self.central + ([extra_central] if extra_central else []), self.delta, accountant)}

    def to_dict(self) -> dict:
        return {"delta": self.delta, "device": [e.to_list() for e in self.device],
                "central": [e.to_list() for e in self.central], "device_reported": self.device_reported}

    @classmethod
    def from_dict(cls, d: dict) -> PrivacyLedger:
        return cls(float(d["delta"]), [Entry.from_list(e) for e in d["device"]],
                   [Entry.from_list(e) for e in d["central"]], float(d["device_reported"]))


def exhausted(report: dict[str, float], device_budget: float, central_budget: float) -> str | None:
    """A clear message naming the spent level, or None while both budgets (0 = unlimited) hold."""
    for level, budget in (("device", device_budget), ("central", central_budget)):
        if budget > 0 and report[level] > budget:
            return (f"privacy budget spent: {level}-level epsilon would reach {report[level]:.3f} > budget "
                    f"{budget:g}")
    return None


def json_epsilon(report: dict[str, float]) -> dict[str, float | None]:
    """JSON has no infinity: an unbounded epsilon is null."""
    return {k: (None if math.isinf(v) else round(v, 6)) for k, v in report.items()}
