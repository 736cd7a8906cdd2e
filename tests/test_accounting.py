"""Two-level privacy accounting: known dp-accounting values, grouping, derivation from round parameters, budgets."""

from __future__ import annotations

import dataclasses
import math

import pytest

from cloud.accounting import (
    Entry,
    PrivacyLedger,
    central_event,
    device_event,
    epsilon,
    exhausted,
    json_epsilon,
)
from protocol.messages import CentralDPReport, TrainingPlan


def test_epsilon_matches_the_published_dp_sgd_figure():
    history = [Entry(1.1, 0.01, 1000)]
    assert epsilon(history, 1e-5, "rdp") == pytest.approx(1.712, abs=2e-3)  # tensorflow-privacy prints 1.712
    assert epsilon(history, 1e-5, "pld") == pytest.approx(1.515, abs=2e-2)


def test_history_of_rounds_composes_like_one_long_run_and_grows():
    rounds = [Entry(1.1, 0.01, 100)] * 10
    assert epsilon(rounds, 1e-5) == pytest.approx(epsilon([Entry(1.1, 0.01, 1000)], 1e-5))
    assert epsilon(rounds[:5], 1e-5) < epsilon(rounds, 1e-5)
    assert epsilon(rounds + [Entry(2.0, 1.0, 1)], 1e-5) > epsilon(rounds, 1e-5)  # q = 1: no sampling


def test_no_noise_is_infinite_and_nothing_is_zero():
    assert math.isinf(epsilon([Entry(1.0, 0.1, 5), Entry(0.0, 0.1, 1)], 1e-5))
    assert epsilon([], 1e-5) == 0.0 and epsilon([Entry(0.0, 0.0, 0)], 1e-5) == 0.0
    with pytest.raises(ValueError):
        epsilon([], 1e-5, "moments")


def test_device_event_is_rederived_from_the_plan():
    plan = TrainingPlan(lr=0.1, local_epochs=2, batch_size=16, clip=1.0, noise_mult=1.2)
    assert device_event(plan, 160) == Entry(1.2, 0.1, 20)

    assert device_event(dataclasses.replace(plan, max_steps=5), 160) == Entry(1.2, 0.1, 5)
    assert device_event(plan, 8) == Entry(1.2, 1.0, 2)  # fewer examples than a batch: q = 1


def test_central_event_takes_the_weakest_edge():
    a = CentralDPReport(clip=1.0, noise_mult=1.5, sampling_rate=0.3)
    b = CentralDPReport(clip=1.0, noise_mult=0.8, sampling_rate=0.1)
    assert central_event([a, b]) == Entry(0.8, 0.3, 1)
    assert central_event([a, None]).noise_mult == 0.0  # an edge that added no noise
    assert central_event([]).steps == 0


def test_ledger_report_budget_and_round_trip():
    ledger = PrivacyLedger(1e-5, [Entry(1.0, 0.05, 100)] * 3, [Entry(1.0, 0.5, 1)] * 3, device_reported=0.1)
    report = ledger.report()
    assert report["device"] == report["device_derived"] > 0.1 and report["central"] > 0
    projected = ledger.report(extra_central=Entry(1.0, 0.5, 1))
    assert projected["central"] > report["central"]
    assert exhausted(report, 0, 0) is None
    message = exhausted(projected, 0, report["central"])
    assert message.startswith("privacy budget spent: central-level epsilon")
    assert PrivacyLedger.from_dict(ledger.to_dict()) == ledger
    assert json_epsilon({"device": math.inf, "central": 1.23456789}) == {"device": None, "central": 1.234568}
    higher = PrivacyLedger(1e-5, ledger.device, ledger.central, device_reported=99.0).report()
    assert higher["device"] == 99.0  # the devices' own reports win when they are larger
