"""Hash-chained, quorum-signed blocks of contribution records, and the rules every validator applies.

A block's hash is SHA-256 over the canonical CBOR (RFC 8949 core deterministic encoding, `cbor2 canonical=True`) of
its body: everything except the signatures. Validators sign `DOMAIN + hash` with Ed25519. Block 0 (genesis) carries
the consortium membership: validator ids and raw public keys, the quorum, and the reward policy; it is trusted
because its hash is pinned out of band, not because of signatures (anyone can mint keys and sign a fake genesis).
The validation rules here are the "chaincode": a block extends the chain, is signed by a quorum of known keys, and
its rewards and balances follow the policy.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from fractions import Fraction
from functools import cached_property

import cbor2
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ledger.scoring import Contribution, RewardPolicy, allocate, score
from protocol import signing
from protocol.codec import decode_as, limit
from protocol.errors import ProtocolError, Reason
from protocol.topics import check_id

VERSION = 1
HASH_BYTES = 32
ZERO_HASH = bytes(HASH_BYTES)
DOMAIN = b"fediomt-ledger-block-v1\x00"
MAX_BLOCK_BYTES = 16 * 1024 * 1024
MAX_RECORDS = 100_000
MAX_VALIDATORS = 1024


ID = limit(max_len=64, min_len=1)
SIG = limit(max_len=signing.SIGNATURE_BYTES)
KEY = limit(max_len=signing.PUBLIC_KEY_BYTES, min_len=signing.PUBLIC_KEY_BYTES)


@dataclass(frozen=True)
class Record:
    """One participant's contribution to one round, its reward and its balance after the reward."""

    participant: str = field(metadata=ID)
    samples: int = field(metadata=limit(min_value=0))
    on_time: bool
    flagged: bool
    quality: float = field(metadata=limit(min_value=-1.0, max_value=1.0))
    loo: float
    shapley: float
    score: float = field(metadata=limit(min_value=0.0))
    reward: int = field(metadata=limit(min_value=0))
    balance: int = field(metadata=limit(min_value=0))

    def __post_init__(self) -> None:
        check_id(self.participant)
        if not all(math.isfinite(v) for v in (self.quality, self.loo, self.shapley, self.score)):
            raise ProtocolError(Reason.NON_FINITE, f"{self.participant}: NaN or infinite score")

    def contribution(self) -> Contribution:
        return Contribution(self.participant, self.samples, self.on_time, self.flagged, self.quality, self.loo,
                            self.shapley)


@dataclass(frozen=True)
class Membership:
    """The consortium: validator id -> raw 32-byte Ed25519 public key, signatures needed, the reward policy."""

    validators: dict[str, bytes] = field(metadata=limit(max_len=MAX_VALIDATORS, min_len=1, items=KEY))
    quorum: int
    policy: RewardPolicy

    def __post_init__(self) -> None:
        for vid, key in self.validators.items():
            check_id(vid)
            signing.public_key_from_bytes(key)
        if not 1 <= self.quorum <= len(self.validators):
            raise ProtocolError(Reason.BAD_VALUE, f"quorum {self.quorum} of {len(self.validators)} validators")


def quorum_for(n: int, fraction: float = 2 / 3) -> int:
    """Signatures needed out of n validators: ceil(fraction * n), at least 1 (2/3 of 4 is 3)."""
    return max(1, math.ceil(Fraction(fraction).limit_denominator(1000) * n))


@dataclass(frozen=True)
class Block:
    """A block; `hash` covers every field but `signatures`. Genesis: index 0, round -1, a membership, no records."""

    index: int = field(metadata=limit(min_value=0))
    prev_hash: bytes = field(metadata=limit(max_len=HASH_BYTES, min_len=HASH_BYTES))
    round_id: int
    model_version: int
    time_ms: int
    minted: int = field(metadata=limit(min_value=0))
    records: list[Record] = field(metadata=limit(max_len=MAX_RECORDS))
    membership: Membership | None = None
    signatures: dict[str, bytes] = field(default_factory=dict, metadata=limit(max_len=MAX_VALIDATORS, items=SIG))
    version: int = VERSION

    def _plain(self, with_signatures: bool) -> dict:
        plain = asdict(self)
        if not with_signatures:
            del plain["signatures"]
        return plain

    @cached_property
    def hash(self) -> bytes:
        return hashlib.sha256(cbor2.dumps(self._plain(False), canonical=True)).digest()

    def to_cbor(self) -> bytes:
        return cbor2.dumps(self._plain(True), canonical=True)

    def with_signatures(self, signatures: Mapping[str, bytes]) -> Block:
        return replace(self, signatures={**self.signatures, **signatures})

    @classmethod
    def from_cbor(cls, data: bytes, max_bytes: int = MAX_BLOCK_BYTES) -> Block:
        """Strict decoder for blocks from the network or a database (the wire codec's rules: exact keys and
        types, finite floats, bounded sizes, no tags or trailing bytes)."""
        block = decode_as(cls, data, max_bytes)
        if block.version != VERSION:
            raise ProtocolError(Reason.UNKNOWN_VERSION, f"ledger block version {block.version}")
        return block


def make_genesis(membership: Membership, time_ms: int = 0) -> Block:
    """Block 0: the membership record. Distribute its hash out of band (pin it in each validator's config)."""
    return Block(0, ZERO_HASH, -1, 0, time_ms, 0, [], membership)


def build_block(head: Block, policy: RewardPolicy, balances: Mapping[str, int], round_id: int, model_version: int,
                contributions: Iterable[Contribution], time_ms: int) -> Block:
    """The unsigned block that records one round: scores, integer rewards per the policy, balances after them."""
    contributions = list(contributions)
    scores = [score(c, policy) for c in contributions]
    rewards = allocate(policy, scores)
    records = [Record(c.participant, int(c.samples), bool(c.on_time), bool(c.flagged), float(c.quality),
                      float(c.loo), float(c.shapley), s, r, balances.get(c.participant, 0) + r)
               for c, s, r in zip(contributions, scores, rewards)]
    return Block(head.index + 1, head.hash, round_id, model_version, time_ms, sum(rewards), records)


def signing_payload(block: Block) -> bytes:
    return DOMAIN + block.hash


def sign_block(block: Block, validator_id: str, key: Ed25519PrivateKey) -> bytes:
    """A validator's signature over the block hash (attach with `block.with_signatures({validator_id: sig})`)."""
    return signing.sign(key, signing_payload(block))


def check_signatures(block: Block, membership: Membership, require_quorum: bool = True) -> None:
    unknown = sorted(set(block.signatures) - set(membership.validators))
    if unknown:
        raise ProtocolError(Reason.UNKNOWN_SENDER, f"block {block.index} signed by unknown validators {unknown}")
    payload = signing_payload(block)
    for vid, sig in sorted(block.signatures.items()):
        try:
            signing.verify(signing.public_key_from_bytes(membership.validators[vid]), sig, payload)
        except ProtocolError as exc:
            raise ProtocolError(Reason.BAD_SIGNATURE, f"block {block.index}: {vid}: {exc.detail}") from None
    if require_quorum and len(block.signatures) < membership.quorum:
        raise ProtocolError(Reason.BAD_SIGNATURE, f"block {block.index} has {len(block.signatures)} signatures, "
                                                  f"quorum is {membership.quorum}")


def check_extends(block: Block, head: Block | None) -> None:
    if head is None:
        if block.index != 0 or block.prev_hash != ZERO_HASH or block.membership is None:
            raise ProtocolError(Reason.BAD_INDEX, "the first block must be a genesis (index 0, membership record)")
        return
    if block.index != head.index + 1:
        raise ProtocolError(Reason.BAD_INDEX, f"block {block.index} does not extend head {head.index}")
    if block.prev_hash != head.hash:
        raise ProtocolError(Reason.BAD_HASH, f"block {block.index}: previous hash does not match the head's hash")
    if block.membership is not None:
        raise ProtocolError(Reason.BAD_VALUE, f"block {block.index}: membership changes need a new genesis")
    if block.round_id <= head.round_id:
        raise ProtocolError(Reason.WRONG_ROUND, f"block {block.index}: round {block.round_id} after {head.round_id}")


def check_totals(block: Block, policy: RewardPolicy, balances: Mapping[str, int]) -> None:
    """Rewards follow the policy, sum to what the block mints, and balances are previous balance + reward."""
    if block.membership is not None:
        if block.records or block.minted:
            raise ProtocolError(Reason.BAD_VALUE, "a genesis block mints nothing")
        return
    participants = [r.participant for r in block.records]
    if len(set(participants)) != len(participants):
        raise ProtocolError(Reason.DUPLICATE, f"block {block.index}: a participant appears twice")
    rewards = [r.reward for r in block.records]
    if sum(rewards) != block.minted:
        raise ProtocolError(Reason.BAD_VALUE, f"block {block.index}: rewards sum to {sum(rewards)}, "
                                              f"block mints {block.minted}")
    if block.minted not in (0, policy.tokens_per_round) or (block.minted == 0) != (max(rewards, default=0) == 0):
        raise ProtocolError(Reason.BAD_VALUE, f"block {block.index}: mints {block.minted}, "
                                              f"policy says {policy.tokens_per_round} per round")
    for r in block.records:
        if r.score != score(r.contribution(), policy):
            raise ProtocolError(Reason.BAD_VALUE, f"block {block.index}: {r.participant}: score does not follow "
                                                  "from the contribution (late, flagged or free riders score 0)")
    if rewards != allocate(policy, [r.score for r in block.records]):
        raise ProtocolError(Reason.BAD_VALUE, f"block {block.index}: rewards are not the policy's split of the scores")
    for r in block.records:
        if r.balance != balances.get(r.participant, 0) + r.reward:
            raise ProtocolError(Reason.BAD_VALUE, f"block {block.index}: {r.participant}: balance {r.balance} is not "
                                                  f"{balances.get(r.participant, 0)} + {r.reward}")


def check_block(block: Block, head: Block | None, membership: Membership | None, balances: Mapping[str, int],
                require_quorum: bool = True) -> None:
    """Everything a validator checks before appending (or, without the quorum, before signing a proposal)."""
    check_extends(block, head)
    if block.membership is not None:  # genesis: trusted by its pinned hash, not by signatures
        check_totals(block, block.membership.policy, balances)
        return
    assert membership is not None  # a non-genesis block has a head, hence a genesis
    check_signatures(block, membership, require_quorum)
    check_totals(block, membership.policy, balances)


def apply(balances: dict[str, int], block: Block) -> None:
    for r in block.records:
        balances[r.participant] = r.balance


@dataclass
class Verdict:
    """The result of auditing a chain: `bad_index` is the first bad block (None when all holds)."""

    height: int = 0
    head_hash: bytes = b""
    genesis_hash: bytes = b""
    membership: Membership | None = None
    bad_index: int | None = None
    error: ProtocolError | None = None
    balances: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None


def verify_chain(raw_blocks: Iterable[bytes], genesis_hash: bytes | None = None, head_hash: bytes | None = None,
                 ) -> Verdict:
    """Audit a whole chain from its stored bytes: decoding, links, signatures, quorum, totals; stop at the first
    bad block. `genesis_hash` pins the membership; `head_hash` detects a truncated tail (which links cannot)."""
    v = Verdict()
    head: Block | None = None
    for position, data in enumerate(raw_blocks):
        try:
            block = Block.from_cbor(data)
            if position == 0 and genesis_hash is not None and block.hash != genesis_hash:
                raise ProtocolError(Reason.BAD_HASH, "genesis hash differs from the pinned one")
            check_block(block, head, v.membership, v.balances)
        except ProtocolError as exc:
            v.bad_index, v.error = position, exc
            return v
        if block.membership is not None:
            v.membership, v.genesis_hash = block.membership, block.hash
        apply(v.balances, block)
        head = block
        v.height, v.head_hash = position + 1, block.hash
    if head is None:
        v.bad_index, v.error = 0, ProtocolError(Reason.INCOMPLETE, "empty ledger: no genesis block")
    elif head_hash is not None and head.hash != head_hash:
        v.bad_index, v.error = v.height, ProtocolError(Reason.INCOMPLETE, "head differs from the expected head hash")
    return v
