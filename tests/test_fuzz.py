"""Hostile input: a brief atheris run of every network-facing decoder, and hypothesis over the same targets."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import bundle, messages
from protocol.codec import registry
from protocol.fuzz import _BUNDLE_KEY, TARGETS, fuzz, message_kinds, seeds

RUNS = 4000  # per target: about 10 s for all of them on a laptop core; `fediomt bench fuzz` runs longer


@pytest.mark.parametrize("name", list(TARGETS))
def test_brief_atheris_run_finds_no_crash(name, tmp_path):
    pytest.importorskip("atheris", reason="atheris comes with the dev extra (Linux only)")
    result = fuzz(name, runs=RUNS, artifacts=tmp_path)
    print(f"fuzz {name}: {result['inputs']} inputs in {result['seconds']} s, {result['crashes']} crashes")
    assert result["crashes"] == 0, result["log"]
    assert result["inputs"] >= RUNS


def test_message_target_covers_every_registered_kind():
    kinds = message_kinds()
    assert set(kinds) == set(registry()) and {"update", "chunk", "bundle", "round"} <= set(kinds)
    seeded = {kinds[s[0]] for s in seeds("messages")}
    assert seeded == set(kinds), f"kinds without a seed sample: {set(kinds) - seeded}"
    for s in seeds("messages"):  # each seed decodes as the kind its first byte selects
        assert messages.decode(s[1:], expect=registry()[kinds[s[0]]]).KIND == kinds[s[0]]


def test_seeds_are_valid_so_mutations_start_deep():
    for s in seeds("bundle"):
        assert bundle.verify_files(bundle.unpack_files(s[1:]), _BUNDLE_KEY.public_key()).version == 1
    from protocol.compression import decode_sparse
    from protocol.fuzz import UPDATE_SIZES

    for s in seeds("update"):
        idx, values = decode_sparse(s[1:], UPDATE_SIZES[s[0]])
        assert np.isfinite(values).all() and idx.shape == values.shape


@pytest.mark.parametrize("name", list(TARGETS))
@given(data=st.binary(max_size=2048))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_random_bytes_raise_nothing_but_protocol_errors(name, data):
    TARGETS[name](data)  # a target swallows ProtocolError only, and asserts its own invariants


@pytest.mark.parametrize("name", ["messages", "update", "bundle"])
@given(st.data())
@settings(max_examples=150, deadline=None)
def test_mutated_valid_inputs_raise_nothing_but_protocol_errors(name, data):
    seed = bytearray(data.draw(st.sampled_from(seeds(name))))
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(1, len(seed) - 1))
        seed[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(seed)))
    TARGETS[name](bytes(seed[:cut]))


def test_fuzz_bench_quick_reports_inputs_and_crashes_per_target(tmp_path):
    pytest.importorskip("atheris", reason="atheris comes with the dev extra (Linux only)")
    import argparse

    from experiments.bench.fuzz import run

    figures = run(argparse.Namespace(quick=True, out=tmp_path))
    assert [r["target"] for r in figures["targets"]] == list(TARGETS)
    assert figures["crashes"] == 0 and all(r["inputs"] >= 500 for r in figures["targets"])
