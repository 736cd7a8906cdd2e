"""Compression settings: what a round announcement tells devices, and what a payload header records."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from protocol.errors import ProtocolError, Reason

METHODS = ("topk", "randk", "dense")
BITS = (32, 8, 4)
MIN_BLOCK, MAX_BLOCK = 8, 1 << 20
MAX_SEED = (1 << 64) - 1


@dataclass(frozen=True)
class CompressionSettings:
    """How a device compresses its delta.

    method: "topk" (largest magnitudes), "randk" (coordinates from a shared seed, same on every device of a cohort)
    or "dense" (every coordinate); density: fraction of coordinates sent (ignored for dense); bits: 32 (float32),
    8 or 4 (symmetric integers with one float32 scale per `block_size` values); stochastic: unbiased stochastic
    rounding instead of round-to-nearest; seed: the randk seed announced by the edge (None: the device draws its
    own coordinates and sends them); entropy: zlib the body when that makes it smaller.
    """

    method: str = "topk"
    density: float = 0.01
    bits: int = 8
    block_size: int = 256
    stochastic: bool = False
    seed: int | None = None
    entropy: bool = True

    def __post_init__(self) -> None:
        _check(self.method in METHODS, f"method {self.method!r} not in {METHODS}")
        _check(isinstance(self.density, (int, float)) and not isinstance(self.density, bool), "density not a number")
        _check(0.0 < float(self.density) <= 1.0, f"density {self.density!r} not in (0, 1]")
        _check(type(self.bits) is int and self.bits in BITS, f"bits {self.bits!r} not in {BITS}")
        _check(type(self.block_size) is int and MIN_BLOCK <= self.block_size <= MAX_BLOCK,
               f"block_size {self.block_size!r} not in [{MIN_BLOCK}, {MAX_BLOCK}]")
        _check(type(self.stochastic) is bool and type(self.entropy) is bool, "stochastic/entropy must be booleans")
        _check(self.seed is None or (type(self.seed) is int and 0 <= self.seed <= MAX_SEED),
               f"seed {self.seed!r} not a uint64")

    def k(self, n_params: int) -> int:
        """Number of coordinates sent for a model of n_params (at least one, unless the model is empty)."""
        if self.method == "dense":
            return n_params
        return min(n_params, max(1, round(self.density * n_params))) if n_params else 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: object) -> CompressionSettings:
        """Strict: exactly the known keys, exact types; ProtocolError otherwise."""
        if not isinstance(d, dict):
            raise ProtocolError(Reason.MALFORMED, "compression settings must be a map")
        names = set(cls.__dataclass_fields__)
        if set(d) != names:
            raise ProtocolError(Reason.MALFORMED, f"compression settings keys {sorted(map(str, d))} != {sorted(names)}")
        return cls(**d)


def _check(ok: bool, detail: str) -> None:
    if not ok:
        raise ProtocolError(Reason.BAD_VALUE, detail)
