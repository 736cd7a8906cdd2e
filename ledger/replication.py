"""Replicating the ledger over MQTT: the cloud proposes, validators sign, every replica appends after checking.

Topics (QoS 1, protocol/topics.py): the cloud publishes a proposal (an unsigned block, or signed only by the cloud)
on LEDGER_PROPOSALS; each validator answers with a Vote (a signature over the block hash, or a refusal) on
ledger_vote_topic(validator); the committed block with its quorum goes to LEDGER_BLOCKS (retained: the last one);
a replica asks "send me blocks from index N" on ledger_sync_topic(validator) and gets batches of stored blocks on
ledger_catchup_topic(validator).

The protocol logic is a pure-ish core (`Validator`, `Proposer`: bytes in, `Publish` list out, state in a Ledger);
`MqttNode` is the thin shell on a protocol.mqtt.Connection. A replica that missed blocks sees a committed block
beyond its head (or its retained copy when it connects) and asks for the range it lacks; every block it receives
passes the same rules as a local append, so the proposer cannot make a replica accept anything a quorum did not
sign.
Trust: the proposer is trusted for liveness (it alone orders blocks), not for safety.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field, replace

import cbor2
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ledger.chain import HASH_BYTES, MAX_BLOCK_BYTES, Block, sign_block, signing_payload
from ledger.store import Ledger
from protocol import signing
from protocol.codec import decode_as, limit
from protocol.errors import ProtocolError, Reason
from protocol.logs import event
from protocol.mqtt import Connection, ConnectionConfig
from protocol.topics import (
    ANY,
    LEDGER_BLOCKS,
    LEDGER_PROPOSALS,
    check_id,
    last_level,
    ledger_catchup_topic,
    ledger_sync_topic,
    ledger_vote_topic,
)

SYNC_BATCH_BYTES = 1024 * 1024
log = logging.getLogger("ledger")


@dataclass(frozen=True)
class Vote:
    """A validator's answer to a proposal: `sig` over the block hash, or `refused` = the Reason it failed."""

    validator: str = field(metadata=limit(max_len=64, min_len=1))
    index: int = field(metadata=limit(min_value=0))
    block_hash: bytes = field(metadata=limit(max_len=HASH_BYTES, min_len=HASH_BYTES))
    sig: bytes = field(metadata=limit(max_len=signing.SIGNATURE_BYTES))
    refused: int = field(metadata=limit(min_value=0, max_value=255))
    detail: str = field(default="", metadata=limit(max_len=256))


@dataclass(frozen=True)
class SyncRequest:
    """A replica's request for the committed blocks from index `start` on, sent when it finds itself behind."""

    validator: str = field(metadata=limit(max_len=64, min_len=1))
    start: int = field(metadata=limit(min_value=0))


@dataclass(frozen=True)
class Catchup:
    """A batch of stored blocks answering a SyncRequest; the replica checks each as if appending it locally."""

    blocks: list[bytes] = field(metadata=limit(max_len=4096))


def encode(obj: Vote | SyncRequest | Catchup) -> bytes:
    return cbor2.dumps(asdict(obj), canonical=True)


def _reason(code: int) -> Reason:
    try:
        return Reason(code)
    except ValueError:
        return Reason.BAD_VALUE


@dataclass(frozen=True)
class Publish:
    """A message for MqttNode to publish: what Validator and Proposer return, so the protocol core stays MQTT-free."""

    topic: str
    payload: bytes
    retain: bool = False


class Validator:
    """A replica that signs valid proposals and appends committed blocks. `genesis_hash` (pinned out of band)
    lets an empty replica accept the genesis from the network."""

    def __init__(self, validator_id: str, key: Ed25519PrivateKey, ledger: Ledger, genesis_hash: bytes | None = None
                 ) -> None:
        self.id = check_id(validator_id)
        self.key = key
        self.ledger = ledger
        self.genesis_hash = genesis_hash
        self.refused: deque[ProtocolError] = deque(maxlen=256)  # the latest refusals, for tests and metrics

    def subscriptions(self) -> list[str]:
        return [LEDGER_PROPOSALS, LEDGER_BLOCKS, ledger_catchup_topic(self.id)]

    def on_connect(self) -> list[Publish]:
        return [self._sync_request()]

    def handle(self, topic: str, payload: bytes) -> list[Publish]:
        """Never raises on bad input: a refused message is logged and remembered."""
        try:
            if topic == LEDGER_PROPOSALS:
                return self._proposal(payload)
            if topic == LEDGER_BLOCKS:
                return self._committed(Block.from_cbor(payload))
            if topic == ledger_catchup_topic(self.id):
                return self._catchup(payload)
            return self._other(topic, payload)
        except ProtocolError as exc:
            self.refused.append(exc)
            event(log, "ledger message refused", logging.WARNING, node=self.id, topic=topic,
                  reason=exc.reason.name, detail=exc.detail)
            return []

    def _other(self, topic: str, payload: bytes) -> list[Publish]:
        raise ProtocolError(Reason.WRONG_TYPE, f"unexpected topic {topic}")

    def _sync_request(self) -> Publish:
        return Publish(ledger_sync_topic(self.id), encode(SyncRequest(self.id, self.ledger.height)))

    def _proposal(self, payload: bytes) -> list[Publish]:
        block = Block.from_cbor(payload)
        if block.index > self.ledger.height:
            return [self._sync_request()]  # behind: catch up first, sign the next proposal
        try:
            self.ledger.check(block, require_quorum=False)
            self.ledger.vote(block)  # one block per index: an equivocating proposer cannot fork the chain
        except ProtocolError as exc:
            self.refused.append(exc)
            event(log, "proposal refused", logging.WARNING, node=self.id, index=block.index, reason=exc.reason.name,
                  detail=exc.detail)
            vote = Vote(self.id, block.index, block.hash, b"", int(exc.reason), exc.detail[:256])
        else:
            vote = Vote(self.id, block.index, block.hash, sign_block(block, self.id, self.key), 0)
        return [Publish(ledger_vote_topic(self.id), encode(vote))]

    def _committed(self, block: Block) -> list[Publish]:
        height = self.ledger.height
        if block.index > height:
            return [self._sync_request()]
        if block.index < height:
            stored = self.ledger.block(block.index)
            if stored is not None and stored.hash == block.hash:
                return []  # a duplicate (retained copy, catch-up overlap)
            raise ProtocolError(Reason.BAD_HASH, f"block {block.index} conflicts with the stored one (fork)")
        if block.index == 0 and (self.genesis_hash is None or block.hash != self.genesis_hash):
            raise ProtocolError(Reason.BAD_HASH, "genesis does not match the pinned genesis hash")
        self.ledger.append(block)
        event(log, "block appended", node=self.id, index=block.index, hash=block.hash.hex()[:16])
        return []

    def _catchup(self, payload: bytes) -> list[Publish]:
        batch = decode_as(Catchup, payload, MAX_BLOCK_BYTES)
        for raw in batch.blocks:
            self._committed(Block.from_cbor(raw))
        return []


class Proposer(Validator):
    """The cloud: a validator that also proposes blocks, collects votes and serves catch-up requests."""

    def __init__(self, validator_id: str, key: Ed25519PrivateKey, ledger: Ledger) -> None:
        super().__init__(validator_id, key, ledger)
        self.pending: Block | None = None
        self.refusals: dict[str, int] = {}
        self.results: dict[bytes, Block | ProtocolError] = {}

    def subscriptions(self) -> list[str]:
        return [ledger_vote_topic(ANY), ledger_sync_topic(ANY)]  # it is the source of blocks: no catch-up

    def on_connect(self) -> list[Publish]:
        head = self.ledger.head
        return [] if head is None else [Publish(LEDGER_BLOCKS, head.to_cbor(), retain=True)]

    def propose(self, block: Block) -> list[Publish]:
        """Start collecting votes for `block` (a new proposal replaces an unfinished one)."""
        self.ledger.check(block, require_quorum=False)
        if self.id in self.ledger.membership.validators:
            block = block.with_signatures({self.id: sign_block(block, self.id, self.key)})
        self.pending, self.refusals = block, {}
        return self._maybe_commit() or [Publish(LEDGER_PROPOSALS, block.to_cbor())]

    def _other(self, topic: str, payload: bytes) -> list[Publish]:
        sender = last_level(topic)
        if topic == ledger_vote_topic(sender):
            return self._vote(sender, decode_as(Vote, payload, 4096))
        if topic == ledger_sync_topic(sender):
            return self._serve(sender, decode_as(SyncRequest, payload, 4096))
        return super()._other(topic, payload)

    def _vote(self, sender: str, vote: Vote) -> list[Publish]:
        if vote.validator != sender:
            raise ProtocolError(Reason.WRONG_SENDER, f"vote from {vote.validator} on {sender}'s topic")
        block = self.pending
        if block is None or vote.block_hash != block.hash:
            return []  # late vote for a finished proposal
        membership = self.ledger.membership
        if sender not in membership.validators:
            raise ProtocolError(Reason.UNKNOWN_SENDER, f"{sender} is not a validator")
        if vote.refused:
            self.refusals[sender] = vote.refused
            if len(membership.validators) - len(self.refusals) < membership.quorum:
                self.pending = None
                self.results[block.hash] = ProtocolError(
                    _reason(vote.refused), f"block {block.index} refused by {sorted(self.refusals)}: {vote.detail}")
            return []
        signing.verify(signing.public_key_from_bytes(membership.validators[sender]), vote.sig, signing_payload(block))
        self.pending = block.with_signatures({sender: vote.sig})
        return self._maybe_commit()

    def _maybe_commit(self) -> list[Publish]:
        block = self.pending
        if block is None or len(block.signatures) < self.ledger.membership.quorum:
            return []
        self.pending = None
        try:
            self.ledger.append(block)
        except ProtocolError as exc:
            self.results[block.hash] = exc
            return []
        self.results[block.hash] = block
        event(log, "block committed", node=self.id, index=block.index, signers=sorted(block.signatures))
        return [Publish(LEDGER_BLOCKS, block.to_cbor(), retain=True)]

    def _serve(self, sender: str, request: SyncRequest) -> list[Publish]:
        if request.validator != sender:
            raise ProtocolError(Reason.WRONG_SENDER, f"sync request from {request.validator} on {sender}'s topic")
        out, batch, size = [], [], 0
        for raw in self.ledger.raw_blocks(request.start):
            if batch and (size + len(raw) > SYNC_BATCH_BYTES or len(batch) >= 4096):
                out.append(Publish(ledger_catchup_topic(sender), encode(Catchup(batch))))
                batch, size = [], 0
            batch.append(raw)
            size += len(raw)
        if batch:
            out.append(Publish(ledger_catchup_topic(sender), encode(Catchup(batch))))
        return out


class MqttNode:
    """Runs a Validator or Proposer on a Connection: subscribe on connect, feed messages, publish the answers. The
    session is always clean: a replica that was away asks for what it missed instead of replaying stale proposals."""

    def __init__(self, node: Validator, broker: ConnectionConfig, client_id: str | None = None) -> None:
        self.node = node
        self._cond = threading.Condition()
        self.conn = Connection(replace(broker, session_expiry_s=0), client_id or f"ledger-{node.id}",
                               node.subscriptions(), None, log, on_message=self._on_message,
                               on_connected=self._on_connected)

    def start(self, timeout: float | None = 10.0, stop: threading.Event | None = None) -> MqttNode:
        """Connect and wait for the broker's SUBACK, within `timeout` s (TimeoutError after it). Daemons pass None
        and their `stop` event: they retry until the broker is back, since a broker that is down (or killed between
        CONNACK and SUBACK) when a replica or the cloud starts must not end it; a set `stop` returns at once."""
        stop = stop or threading.Event()
        deadline = math.inf if timeout is None else time.monotonic() + timeout
        if self.conn.start(stop=stop, timeout_s=timeout):
            while not stop.is_set() and time.monotonic() < deadline:
                if self.conn.subscribed.wait(min(1.0, max(0.0, deadline - time.monotonic()))):
                    return self
        if stop.is_set():
            return self
        self.conn.close()
        raise TimeoutError(f"{self.node.id}: no SUBACK from {self.conn.cfg.host}:{self.conn.cfg.port}")

    def stop(self) -> None:
        self.conn.close()

    def _publish(self, messages: list[Publish]) -> None:
        for m in messages:
            self.conn.publish(m.topic, m.payload, retain=m.retain)

    def _on_connected(self) -> None:
        with self._cond:
            out = self.node.on_connect()
        self._publish(out)

    def _on_message(self, topic: str, payload: bytes) -> None:
        with self._cond:
            out = self.node.handle(topic, payload)
            self._cond.notify_all()
        self._publish(out)

    def commit(self, block: Block, timeout: float = 10.0) -> Block:
        """Propose `block` and wait until a quorum signed it (returns the committed block) or enough validators
        refused it (raises their ProtocolError). On a timeout (INCOMPLETE), retry with the same block: validators
        that signed it will not sign a different block at that index. Proposer nodes only."""
        node = self.node
        if not isinstance(node, Proposer):
            raise TypeError("only the proposer commits blocks")
        with self._cond:
            out = node.propose(block)
        self._publish(out)
        with self._cond:
            if not self._cond.wait_for(lambda: block.hash in node.results, timeout):
                node.pending = None
                raise ProtocolError(Reason.INCOMPLETE, f"block {block.index}: no quorum within {timeout} s")
            result = node.results.pop(block.hash)
        if isinstance(result, ProtocolError):
            raise result
        return result
