"""The ledger: validators refuse bad blocks, `verify` detects any tampering, kill -9 during an append is harmless."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import replace

import cbor2
import pytest

from fediomt.cli import main
from ledger.chain import Block, Membership, make_genesis, quorum_for, sign_block, verify_chain
from ledger.consortium import load_consortium, open_ledger
from ledger.scoring import Contribution, RewardPolicy
from ledger.store import Ledger, propose_block
from protocol import signing
from protocol.errors import ProtocolError, Reason

from .conftest import REPO

VALIDATORS = ["cloud", "edge-a", "edge-b", "edge-c"]


@pytest.fixture(scope="module")
def keys():
    return {v: signing.generate_signing_key() for v in VALIDATORS}


def membership(keys, tokens: int = 100) -> Membership:
    return Membership({v: signing.public_key_bytes(k.public_key()) for v, k in keys.items()}, quorum_for(len(keys)),
                      RewardPolicy(tokens_per_round=tokens))


def contributions(round_id: int) -> list[Contribution]:
    return [Contribution("dev-1", 120, True, False, 0.8, 0.02, 0.05 + 0.01 * round_id),
            Contribution("dev-2", 80, True, False, 0.6, 0.01, 0.02),
            Contribution("free-rider", 500, True, False, 0.0, 0.0, 0.04),   # zeros: quality 0
            Contribution("poisoner", 100, True, True, 0.0, 0.0, 0.0),       # flagged by a filter
            Contribution("late", 90, False, False, 0.7, 0.01, 0.03)]


def signed(block: Block, keys, signers=VALIDATORS[:3]) -> Block:
    return block.with_signatures({v: sign_block(block, v, keys[v]) for v in signers})


def build_ledger(path, keys, rounds: int = 3) -> Ledger:
    ledger = Ledger.open(path)
    ledger.append(make_genesis(membership(keys)))
    for r in range(rounds):
        ledger.append(signed(propose_block(ledger, r, 10 + r, contributions(r)), keys))
    return ledger


def store_raw(db, index: int, data: bytes) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE blocks SET data = ? WHERE idx = ?", (data, index))


def test_rounds_reward_contributors_and_no_free_rider(tmp_path, keys):
    ledger = build_ledger(tmp_path / "ledger.db", keys)
    balances = ledger.balances()
    assert sum(balances.values()) == 300
    assert balances["free-rider"] == balances["poisoner"] == balances["late"] == 0
    assert balances["dev-1"] > balances["dev-2"] > 0
    assert ledger.height == 4
    reopened = Ledger.open(tmp_path / "ledger.db")
    assert reopened.head == ledger.head and reopened.balances() == balances
    verdict = verify_chain(reopened.raw_blocks())
    assert verdict.ok and verdict.height == 4 and verdict.balances == balances


def test_block_round_trips_and_decoder_is_strict(tmp_path, keys):
    ledger = build_ledger(tmp_path / "l.db", keys, rounds=1)
    block = ledger.head
    assert Block.from_cbor(block.to_cbor()) == block and Block.from_cbor(block.to_cbor()).hash == block.hash
    wire = cbor2.loads(block.to_cbor())
    for mutate, reason in [(lambda w: w.__setitem__("extra", 1), Reason.MALFORMED),
                           (lambda w: w["records"][0].__setitem__("samples", "many"), Reason.WRONG_TYPE),
                           (lambda w: w["records"][0].__setitem__("quality", float("nan")), Reason.NON_FINITE),
                           (lambda w: w.__setitem__("prev_hash", b"short"), Reason.MALFORMED),
                           (lambda w: w["records"][0].__setitem__("participant", "a/#"), Reason.BAD_VALUE)]:
        bad = cbor2.loads(block.to_cbor())
        mutate(bad)
        with pytest.raises(ProtocolError) as exc:
            Block.from_cbor(cbor2.dumps(bad))
        assert exc.value.reason == reason
    with pytest.raises(ProtocolError):
        Block.from_cbor(b"\xff\x00garbage")
    assert wire["version"] == 1


def _refused(ledger: Ledger, block: Block, reason: Reason) -> None:
    head, height = ledger.head, ledger.height
    with pytest.raises(ProtocolError) as exc:
        ledger.append(block)
    assert exc.value.reason == reason, exc.value
    assert ledger.head == head and ledger.height == height


def test_validator_refuses_bad_blocks(tmp_path, keys):
    ledger = build_ledger(tmp_path / "l.db", keys, rounds=1)
    good = propose_block(ledger, 5, 11, contributions(5))
    _refused(ledger, signed(good, keys, VALIDATORS[:2]), Reason.BAD_SIGNATURE)  # below quorum (3 of 4)
    outsider = signing.generate_signing_key()
    forged = signed(good, keys).with_signatures({"mallory": sign_block(good, "mallory", outsider)})
    _refused(ledger, forged, Reason.UNKNOWN_SENDER)
    swapped = signed(good, keys)
    swapped = replace(swapped, signatures={**swapped.signatures, "edge-a": swapped.signatures["cloud"]})
    _refused(ledger, swapped, Reason.BAD_SIGNATURE)
    _refused(ledger, signed(replace(good, index=good.index + 1), keys), Reason.BAD_INDEX)
    _refused(ledger, signed(replace(good, prev_hash=bytes(32)), keys), Reason.BAD_HASH)
    _refused(ledger, signed(replace(good, round_id=0), keys), Reason.WRONG_ROUND)  # round 0 already recorded
    _refused(ledger, make_genesis(membership(keys), time_ms=1), Reason.BAD_INDEX)  # a second genesis
    # wrong totals, each re-signed by a full quorum: the validators' rules catch what signatures cannot
    r0 = good.records[0]
    for bad, why in [
        (replace(good, minted=good.minted + 1), "rewards sum"),
        (replace(good, records=[replace(r0, reward=r0.reward + 1, balance=r0.balance + 1), *good.records[1:]],
                 minted=good.minted + 1), "mints"),
        (replace(good, records=[replace(r0, balance=r0.balance + 5), *good.records[1:]]), "balance"),
        (replace(good, records=[good.records[1], good.records[0], *good.records[2:]]), None),  # order is fine
        (replace(good, records=[*good.records[:3], replace(good.records[3], score=1.0, reward=0)]), "score"),
        (replace(good, records=[replace(r0, reward=r0.reward - 1, balance=r0.balance - 1),
                                replace(good.records[1], reward=good.records[1].reward + 1,
                                        balance=good.records[1].balance + 1), *good.records[2:]]), "split"),
        (replace(good, records=[*good.records, good.records[0]]), "twice"),
    ]:
        if why is None:
            continue
        with pytest.raises(ProtocolError, match=why):
            ledger.append(signed(bad, keys))
    with pytest.raises(ProtocolError) as exc:  # a NaN measurement never reaches the database
        propose_block(ledger, 5, 11, [Contribution("d", 1, True, False, float("nan"), 0.0, 0.1)])
    assert exc.value.reason == Reason.NON_FINITE
    ledger.append(signed(good, keys))
    _refused(ledger, signed(good, keys), Reason.DUPLICATE)
    assert ledger.height == 3


def test_round_where_nobody_qualifies_mints_nothing(tmp_path, keys):
    ledger = build_ledger(tmp_path / "l.db", keys, rounds=0)
    block = propose_block(ledger, 0, 1, [Contribution("only-free-rider", 10, True, False, 0.0, 0.0, 1.0)])
    assert block.minted == 0 and block.records[0].reward == 0
    ledger.append(signed(block, keys))
    nxt = propose_block(ledger, 1, 1, contributions(1))
    withheld = replace(nxt, minted=0, records=[replace(r, reward=0, balance=r.balance - r.reward) for r in nxt.records])
    with pytest.raises(ProtocolError, match="split of the scores"):  # eligible contributors, nothing minted
        ledger.append(signed(withheld, keys))


def _mutations(value):
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1]
    if isinstance(value, float):
        return [value + 0.5]
    if isinstance(value, bytes):
        return [bytes([value[0] ^ 1]) + value[1:]] if value else [b"\x01"]
    if isinstance(value, str):
        return [value + "x"]
    return []


def _tampered_copies(block_wire: dict):
    """Every record field, every header field and every signature of a block, changed one at a time."""
    for j, record in enumerate(block_wire["records"]):
        for name, value in record.items():
            for new in _mutations(value):
                copy = cbor2.loads(cbor2.dumps(block_wire))
                copy["records"][j][name] = new
                yield f"records[{j}].{name}", copy
    for name, value in block_wire.items():
        for new in _mutations(value):
            copy = cbor2.loads(cbor2.dumps(block_wire))
            copy[name] = new
            yield name, copy
    for vid in block_wire["signatures"]:
        copy = cbor2.loads(cbor2.dumps(block_wire))
        copy["signatures"][vid] = bytes([copy["signatures"][vid][0] ^ 1]) + copy["signatures"][vid][1:]
        yield f"signatures.{vid}", copy
        copy = cbor2.loads(cbor2.dumps(block_wire))
        del copy["signatures"][vid]  # 3 of 4 signed: dropping one falls below quorum
        yield f"-signatures.{vid}", copy


def test_verify_detects_tampering_with_any_field_of_any_block(tmp_path, keys):
    db = tmp_path / "l.db"
    ledger = build_ledger(db, keys, rounds=3)
    original = ledger.raw_blocks()
    ledger.close()
    checked = 0
    for index in range(1, len(original)):
        wire = cbor2.loads(original[index])
        for what, copy in _tampered_copies(wire):
            tampered = list(original)
            tampered[index] = cbor2.dumps(copy, canonical=True)
            verdict = verify_chain(tampered)
            assert not verdict.ok and verdict.bad_index == index, (index, what)
            checked += 1
    assert checked > 150
    # through the database and the CLI: tamper with one reward in block 2
    wire = cbor2.loads(original[2])
    wire["records"][0]["reward"] += 1
    store_raw(db, 2, cbor2.dumps(wire, canonical=True))
    assert main(["ledger", "verify", str(db)]) == 1


def test_genesis_tampering_and_pinning(tmp_path, keys, capsys):
    db = tmp_path / "l.db"
    ledger = build_ledger(db, keys, rounds=1)
    genesis_hash = ledger.raw_blocks() and Block.from_cbor(ledger.raw_blocks()[0]).hash
    raw = ledger.raw_blocks()
    assert verify_chain(raw, genesis_hash=genesis_hash).ok
    wire = cbor2.loads(raw[0])
    wire["membership"]["policy"]["tokens_per_round"] = 10**6
    tampered = [cbor2.dumps(wire, canonical=True), *raw[1:]]
    assert verify_chain(tampered).bad_index == 1  # block 1 no longer links to it
    assert verify_chain(tampered, genesis_hash=genesis_hash).bad_index == 0
    # a whole fake chain with its own validators verifies, except against the pinned genesis
    fake_keys = {v: signing.generate_signing_key() for v in VALIDATORS}
    fake = build_ledger(tmp_path / "fake.db", fake_keys, rounds=1)
    assert verify_chain(fake.raw_blocks()).ok
    assert verify_chain(fake.raw_blocks(), genesis_hash=genesis_hash).bad_index == 0
    assert main(["ledger", "verify", str(tmp_path / "fake.db"), "--genesis-hash", genesis_hash.hex()]) == 1
    assert main(["ledger", "verify", str(db), "--genesis-hash", genesis_hash.hex()]) == 0
    validators = tmp_path / "validators.toml"
    validators.write_text("quorum = 3\n[policy]\ntokens_per_round = 100\n[validators]\n" + "".join(
        f'{v} = "{signing.public_key_bytes(k.public_key()).hex()}"\n' for v, k in keys.items()))
    assert main(["ledger", "verify", str(db), "--validators", str(validators)]) == 0
    assert main(["ledger", "verify", str(tmp_path / "fake.db"), "--validators", str(validators)]) == 1
    capsys.readouterr()
    assert main(["ledger", "genesis", str(validators)]) == 0
    assert capsys.readouterr().out.strip() == genesis_hash.hex()
    # PEM paths work as well as hex keys; the same file opens (or creates) a validator's database
    signing.save_public_key(keys["cloud"].public_key(), tmp_path / "cloud.pub")
    validators.write_text(validators.read_text().replace(
        signing.public_key_bytes(keys["cloud"].public_key()).hex(), "cloud.pub"))
    assert main(["ledger", "genesis", str(validators), str(tmp_path / "new.db")]) == 0
    assert Ledger.open(tmp_path / "new.db").block(0).hash == genesis_hash
    with pytest.raises(ProtocolError, match="another consortium"):
        open_ledger(tmp_path / "fake.db", load_consortium(validators))


def test_verify_detects_reordered_dropped_and_under_signed_blocks(tmp_path, keys, capsys):
    db = tmp_path / "l.db"
    ledger = build_ledger(db, keys, rounds=4)
    raw = ledger.raw_blocks()
    head = ledger.head.hash
    ledger.close()
    assert verify_chain([raw[0], raw[2], raw[1], *raw[3:]]).bad_index == 1
    assert verify_chain([raw[0], raw[1], *raw[3:]]).bad_index == 2
    assert verify_chain(raw[1:]).bad_index == 0
    assert verify_chain([]).bad_index == 0
    # a dropped tail still links: only a pinned head (or another replica) shows it
    assert verify_chain(raw[:-1]).ok
    assert verify_chain(raw[:-1], head_hash=head).bad_index == len(raw) - 1
    # through the database: swap two rows, then the CLI names the first bad block
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE blocks SET idx = -1 WHERE idx = 2")
        conn.execute("UPDATE blocks SET idx = 2 WHERE idx = 3")
        conn.execute("UPDATE blocks SET idx = 3 WHERE idx = -1")
    capsys.readouterr()
    assert main(["ledger", "verify", str(db)]) == 1
    assert "FAIL: block 2" in capsys.readouterr().out
    # a block signed below quorum, stored directly
    db2 = tmp_path / "l2.db"
    ledger2 = build_ledger(db2, keys, rounds=1)
    weak = signed(propose_block(ledger2, 7, 1, contributions(7)), keys, VALIDATORS[:2])
    ledger2.close()
    with sqlite3.connect(db2) as conn:
        conn.execute("INSERT INTO blocks VALUES (?, ?, ?)", (weak.index, weak.hash, weak.to_cbor()))
    proc = subprocess.run([sys.executable, "-m", "fediomt", "ledger", "verify", str(db2)], capture_output=True,
                          text=True, cwd=REPO)
    assert proc.returncode == 1 and "FAIL: block 2" in proc.stdout and "quorum" in proc.stdout


def test_report_formats(tmp_path, keys, capsys):
    db = tmp_path / "l.db"
    build_ledger(db, keys, rounds=2).close()
    capsys.readouterr()
    assert main(["ledger", "verify", str(db)]) == 0
    assert capsys.readouterr().out.startswith("OK: 3 blocks")
    assert main(["ledger", "report", str(db), "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert sum(report["balances"].values()) == 200 and report["balances"]["free-rider"] == 0
    assert len(report["contributions"]) == 10 and report["contributions"][0]["round"] == 0
    assert main(["ledger", "report", str(db), "--format", "csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("block,round,model_version,participant") and len(lines) == 11
    assert main(["ledger", "report", str(db), "--balances", "--format", "csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "participant,balance,rounds,on_time,rewarded,samples" and len(lines) == 6
    assert "late,0,2,0,0,180" in lines and "dev-1,{},2,2,2,240".format(report["balances"]["dev-1"]) in lines
    assert main(["ledger", "report", str(db)]) == 0
    assert "free-rider" in capsys.readouterr().out
    assert main(["ledger", "verify", str(tmp_path / "missing.db")]) == 1


CHILD = """
import sys
from ledger.chain import sign_block
from ledger.scoring import Contribution
from ledger.store import Ledger, propose_block
from protocol.signing import load_private_key
ledger = Ledger.open(sys.argv[1])
keys = {p.split('=')[0]: load_private_key(p.split('=')[1]) for p in sys.argv[2:]}
r = ledger.head.round_id + 1
while True:
    records = [Contribution(f"d{i}", 10 + i, True, False, 0.5, 0.1, 0.1 + i) for i in range(50)]
    block = propose_block(ledger, r, r, records)
    ledger.append(block.with_signatures({v: sign_block(block, v, k) for v, k in keys.items()}))
    r += 1
"""


def test_kill_9_during_appends_leaves_a_valid_chain(tmp_path, keys):
    db = tmp_path / "ledger.db"
    build_ledger(db, keys, rounds=0).close()
    key_args = []
    for v in VALIDATORS[:3]:
        signing.save_private_key(keys[v], tmp_path / f"{v}.pem")
        key_args.append(f"{v}={tmp_path / f'{v}.pem'}")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    heights = []
    for delay in (0.9, 1.3, 1.7):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(db), *key_args], env=env, cwd=tmp_path,
                                 stderr=subprocess.PIPE)
        time.sleep(delay)
        assert child.poll() is None, child.stderr.read().decode()
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stderr.close()
        with Ledger.open(db) as ledger:
            verdict = verify_chain(ledger.raw_blocks())
            assert verdict.ok, verdict.error
            heights.append(ledger.height)
            assert sum(ledger.balances().values()) == 100 * (ledger.height - 1)
    assert heights[0] > 1 and heights[0] < heights[1] < heights[2]


def test_benchmark_quick(tmp_path):
    from argparse import Namespace

    from experiments.bench.ledger import run

    figures = run(Namespace(quick=True, out=tmp_path))
    assert figures["replication"]["replicas_converged"]
    assert figures["ledger"]["append_blocks_per_s"] > 0 and figures["ledger"]["verify_blocks_per_s"] > 0
    gtg = [row for row in figures["shapley"] if row["method"] == "gtg"]
    assert gtg[-1]["rel_l1_error"] < gtg[0]["rel_l1_error"]
