"""Everything a device must remember across restarts, in ONE file written atomically.

Weights of the installed global model, the error-feedback residual, SCAFFOLD's c_i, the privacy accountant's
history, the rounds already answered and the sent but not yet acknowledged update live together in `state.npz`,
replaced with `atomic_write` (temp file, fsync, rename): a kill -9 at any instant leaves either the previous or
the next state, never a mix (a residual from one round with the privacy history of another would be exactly the
inconsistency that costs budget).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from protocol.accountant import Entry, History
from protocol.atomic import atomic_write

STATE_FILE = "state.npz"
SEEN_ROUNDS_KEPT = 256
FORMAT = 1
ARRAYS = ("weights", "residual", "control", "server_control")


@dataclass(frozen=True)
class Unacked:
    """The open round's update until the edge acknowledges it: resent, the same bytes, until the round's deadline."""

    round_id: int
    deadline: float                               # the announcement's (wall clock)
    data: bytes                                   # the signed, encoded DeviceUpdate


@dataclass(frozen=True)
class DeviceState:
    """What a device keeps across restarts (model, residual, SCAFFOLD controls, privacy history), saved as one file."""

    model_name: str = ""
    model_version: int = -1                       # -1: no global model yet (the bundle's initial weights)
    weights: np.ndarray | None = None             # flat float32, the installed global model
    residual: np.ndarray | None = None            # error feedback: what compression has not sent yet
    control: np.ndarray | None = None             # SCAFFOLD c_i
    server_control: np.ndarray | None = None      # SCAFFOLD c of the installed global model
    history: History = ()                         # privacy accountant entries
    seen_rounds: tuple[int, ...] = ()             # rounds already answered (trained, skipped or declined)
    steps_per_s: float = 0.0                      # measured training speed (deadline planning)
    extra: dict = field(default_factory=dict)     # small JSON-able facts (e.g. the installed bundle version)
    unacked: Unacked | None = None                # saved with the spend: a restart resends it

    @property
    def run_id(self) -> str:
        """The federation run this state follows ("" before the first; kept in `extra`)."""
        return str(self.extra.get("run_id", ""))

    def for_new_run(self, run_id: str) -> DeviceState:
        """Forget the global model, answered rounds, residual, control variates and the unacknowledged update of
        the previous run; KEEP the privacy history (the lifetime budget), the measured speed and `extra`."""
        extra = {k: v for k, v in self.extra.items() if k != "after_run"}
        return DeviceState(history=self.history, steps_per_s=self.steps_per_s, extra={**extra, "run_id": run_id})

    def answered(self, round_id: int) -> DeviceState:
        seen = tuple(r for r in self.seen_rounds if r != round_id)[-(SEEN_ROUNDS_KEPT - 1):] + (round_id,)
        return replace(self, seen_rounds=seen)

    def spend(self, entry: Entry) -> DeviceState:
        return replace(self, history=(*self.history, entry))

    def for_new_model(self, name: str, version: int, weights: np.ndarray,
                      server_control: np.ndarray | None = None) -> DeviceState:
        """Install global weights; a different architecture (name or size) starts residual and c_i afresh."""
        weights = np.asarray(weights, np.float32)
        same = self.model_name == name and self.weights is not None and self.weights.size == weights.size
        return replace(self, model_name=name, model_version=version, weights=weights, server_control=server_control,
                       residual=self.residual if same else None, control=self.control if same else None)


def save_state(path: str | Path, state: DeviceState) -> None:
    meta = {"format": FORMAT, "model_name": state.model_name, "model_version": state.model_version,
            "history": [e.to_list() for e in state.history], "seen_rounds": list(state.seen_rounds),
            "steps_per_s": state.steps_per_s, "extra": state.extra}
    arrays = {name: np.asarray(value, np.float32) for name in ARRAYS
              if (value := getattr(state, name)) is not None}
    if state.unacked is not None:
        meta["unacked"] = [state.unacked.round_id, state.unacked.deadline]
        arrays["unacked"] = np.frombuffer(state.unacked.data, np.uint8)
    buf = io.BytesIO()
    np.savez(buf, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)
    atomic_write(Path(path), buf.getvalue(), mode=0o600)


def load_state(path: str | Path) -> DeviceState:
    """The saved state, or a fresh one if there is none yet."""
    path = Path(path)
    if not path.exists():
        return DeviceState()
    with np.load(path, allow_pickle=False) as npz:
        meta = json.loads(npz["meta"].tobytes())
        arrays = {name: npz[name].astype(np.float32) for name in ARRAYS if name in npz}
        unacked = Unacked(int(meta["unacked"][0]), float(meta["unacked"][1]), npz["unacked"].tobytes()) \
            if "unacked" in meta else None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: state format {meta.get('format')!r}, expected {FORMAT}")
    return DeviceState(model_name=meta["model_name"], model_version=int(meta["model_version"]),
                       history=tuple(Entry.from_list(e) for e in meta["history"]),
                       seen_rounds=tuple(int(r) for r in meta["seen_rounds"]),
                       steps_per_s=float(meta["steps_per_s"]), extra=dict(meta["extra"]), unacked=unacked, **arrays)
