"""`fediomt ledger verify DB` (audit the whole chain) and `fediomt ledger report DB` (balances, contributions)."""

from __future__ import annotations

import argparse
import csv
import json
import sqlite3
import sys
from dataclasses import asdict
from pathlib import Path

from ledger.chain import Block, make_genesis, verify_chain
from ledger.consortium import load_consortium, open_ledger
from protocol.table import print_table

CONTRIBUTION_COLUMNS = ["block", "round", "model_version", "participant", "samples", "on_time", "flagged", "quality",
                        "loo", "shapley", "score", "reward", "balance"]


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    v = sub.add_parser("verify", help="check hashes, links, signatures, quorum and totals; exit 0 only if all hold",
                       description="Audit a ledger database. The validators' public keys come from its genesis "
                                   "block; pin that block with --genesis-hash (or --validators) to trust them.")
    v.add_argument("db", type=Path, help="ledger SQLite database (e.g. RUN/ledger.db)")
    v.add_argument("--genesis-hash", help="hex SHA-256 of the genesis block, distributed out of band")
    v.add_argument("--head-hash", help="hex hash of the expected last block (detects a dropped tail)")
    v.add_argument("--validators", type=Path, metavar="CONSORTIUM",
                   help="consortium TOML (validators, quorum, policy; see docs/ledger.md): the genesis must be "
                        "exactly the one it defines")
    v.set_defaults(func=_clear_errors(verify))
    r = sub.add_parser("report", help="print balances and per-round contributions")
    r.add_argument("db", type=Path)
    r.add_argument("--format", choices=["table", "csv", "json"], default="table")
    r.add_argument("--balances", action="store_true", help="only the balances")
    r.set_defaults(func=_clear_errors(report))
    g = sub.add_parser("genesis", help="print the genesis hash a consortium file defines (and create DB with it)")
    g.add_argument("consortium", type=Path, help="consortium TOML")
    g.add_argument("db", type=Path, nargs="?", help="create (or check) this ledger database")
    g.set_defaults(func=_clear_errors(genesis))
    p = sub.add_parser("replica", help="run a validator: sign valid proposals, replicate committed blocks over MQTT",
                       description="A validator daemon (one per edge). Stops cleanly on SIGTERM/SIGINT.")
    p.add_argument("db", type=Path, help="this validator's ledger database (created from the consortium file)")
    p.add_argument("--consortium", type=Path, required=True, help="consortium TOML (its genesis is pinned)")
    p.add_argument("--id", required=True, help="this validator's id in the consortium")
    p.add_argument("--key", type=Path, required=True, help="this validator's Ed25519 signing key (PEM)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=1883)
    p.add_argument("--pki", type=Path, help="PKI directory: connect with mutual TLS as edge ID")
    p.set_defaults(func=_clear_errors(replica))


def _clear_errors(func):
    """A missing or malformed consortium file, key or database is a one-line error and exit status 1."""

    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except (OSError, ValueError, sqlite3.Error) as exc:  # ProtocolError and TOML errors are ValueErrors
            print(f"fediomt ledger {args.action}: {exc}", file=sys.stderr)
            return 1

    return run


def raw_blocks(db: Path) -> list[bytes]:
    """Stored block bytes in index order, read-only (an audit must not create or migrate anything)."""
    if not db.is_file():
        raise FileNotFoundError(f"{db}: no such ledger database")
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return [row[0] for row in conn.execute("SELECT data FROM blocks ORDER BY idx")]
    finally:
        conn.close()


def _hex(value: str | None, what: str) -> bytes | None:
    if value is None:
        return None
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise SystemExit(f"{what} must be 64 hex digits")
    return raw


def verify(args: argparse.Namespace) -> int:
    raw = raw_blocks(args.db)
    pinned = _hex(args.genesis_hash, "--genesis-hash")
    if args.validators is not None:
        from_file = make_genesis(load_consortium(args.validators)).hash
        if pinned is not None and pinned != from_file:
            print(f"FAIL: {args.validators} does not define the genesis {args.genesis_hash}")
            return 1
        pinned = from_file
    verdict = verify_chain(raw, pinned, _hex(args.head_hash, "--head-hash"))
    if not verdict.ok:
        print(f"FAIL: block {verdict.bad_index}: {verdict.error} "
              f"({verdict.height} blocks before it verified)")
        return 1
    m = verdict.membership
    print(f"OK: {verdict.height} blocks, head {verdict.head_hash.hex()}, genesis {verdict.genesis_hash.hex()}, "
          f"{len(m.validators)} validators, quorum {m.quorum}, {sum(verdict.balances.values())} tokens issued")
    if args.genesis_hash is None and args.validators is None:
        print("note: the genesis (validator keys) was not pinned; compare its hash with the consortium's")
    return 0


def _rows(raw: list[bytes]) -> list[dict]:
    rows = []
    for data in raw:
        block = Block.from_cbor(data)
        for r in block.records:
            rows.append({"block": block.index, "round": block.round_id, "model_version": block.model_version,
                         **asdict(r)})
    return [{c: row[c] for c in CONTRIBUTION_COLUMNS} for row in rows]


def report(args: argparse.Namespace) -> int:
    raw = raw_blocks(args.db)
    rows = _rows(raw)
    verdict = verify_chain(raw)
    if not verdict.ok:
        print(f"warning: the ledger does not verify (block {verdict.bad_index}: {verdict.error}); "
              "balances below are as stored", file=sys.stderr)
    totals: dict[str, dict] = {}
    for row in rows:
        t = totals.setdefault(row["participant"], {"participant": row["participant"], "balance": 0, "rounds": 0,
                                                   "on_time": 0, "rewarded": 0, "samples": 0})
        t["balance"] = row["balance"]
        t["rounds"] += 1
        t["on_time"] += row["on_time"]
        t["rewarded"] += row["reward"] > 0
        t["samples"] += row["samples"]
    balance_rows = [totals[p] for p in sorted(totals)]
    balances = {p: t["balance"] for p, t in sorted(totals.items())}
    if args.format == "json":
        out = {"balances": balances, "participants": balance_rows}
        if not args.balances:
            out["contributions"] = rows
        print(json.dumps(out, indent=2))
    elif args.format == "csv":
        chosen = balance_rows if args.balances else rows
        writer = csv.DictWriter(sys.stdout, fieldnames=list(chosen[0]) if chosen else CONTRIBUTION_COLUMNS)
        writer.writeheader()
        writer.writerows(chosen)
    else:
        if not args.balances:
            print_table(rows, CONTRIBUTION_COLUMNS, file=sys.stdout)
            print()
        print_table(balance_rows, file=sys.stdout)
    return 0


def genesis(args: argparse.Namespace) -> int:
    membership = load_consortium(args.consortium)
    if args.db is not None:
        open_ledger(args.db, membership).close()
    print(make_genesis(membership).hash.hex())
    return 0


def replica(args: argparse.Namespace) -> int:
    import signal
    import threading

    from ledger.replication import MqttNode, Validator
    from protocol.logs import event, setup
    from protocol.mqtt import ConnectionConfig
    from protocol.signing import load_private_key
    from protocol.tls import identity

    log = setup("ledger")
    ledger = open_ledger(args.db, load_consortium(args.consortium))
    broker = ConnectionConfig(host=args.host, port=args.port)
    if args.pki is not None:
        ident = identity(args.pki, "edge", args.id)
        cert, key = ident.role("ledger")   # its own certificate: the edge's bridge holds the edge's client id
        broker = ConnectionConfig(host=args.host, port=args.port, ca=ident.ca, cert=cert, key=key)
    validator = Validator(args.id, load_private_key(args.key), ledger, genesis_hash=ledger.block(0).hash)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    node = MqttNode(validator, broker).start(timeout=None, stop=stop)
    if not stop.is_set():
        event(log, "replica started", id=args.id, height=ledger.height, host=args.host, port=args.port)
        stop.wait()
    node.stop()
    ledger.close()
    event(log, "replica stopped", id=args.id, height=ledger.height)
    return 0
