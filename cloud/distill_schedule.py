"""When and how the daemon distils: every `[distill] every_rounds` closed rounds, the new global model becomes int8
students (cloud.distill) that are pushed to the devices (cloud.push), on a worker thread so rounds go on meanwhile.
One distillation at a time: a due round is skipped while one runs. Each student is one line of distill.jsonl.

Students have versions of their own, per class (run_dir/students/versions.json: 1, 2, ... for each class's bundle
`student_name(model, class)`), so a device whose trainable bundle was built with `--version 6` is never offered a
"downgrade". They are signed with `[distill] bundle_key` (the key whose public half is the devices'
`bundle_pubkey`; default: the cloud's signing_key, which then must be that key); the push manifest is signed with
the cloud key as every push is. A student that fails the quality gate is written to distill.jsonl with `refused`
and is not pushed.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud.config import CloudConfig
from cloud.distill import StudentReport, default_targets, distill_round, load_proxy
from cloud.model import EvalData
from cloud.push import PushReport, push_bundle
from protocol.atomic import atomic_write
from protocol.logs import event
from protocol.signing import load_private_key


def report_line(version: int, r: StudentReport, pushed: PushReport | None) -> dict:
    """The distill.jsonl line of one student (`version`: the global model's; `student_version`: the bundle's)."""
    return {"version": version, "device_class": r.device_class, "bundle_name": r.bundle_name,
            "student_version": r.version, "options": r.options, "student_bytes": r.student_bytes,
            "teacher_bytes": r.teacher_bytes, "agreement": r.agreement, "float_agreement": r.float_agreement,
            "method": r.method, "student_accuracy": r.student_accuracy, "teacher_accuracy": r.teacher_accuracy,
            "eval_rows": r.eval_rows, "refused": r.refused or None, "seconds": round(r.seconds, 1),
            "bundle": None if r.bundle is None else str(r.bundle),
            "pushed_s": None if pushed is None else round(pushed.seconds, 3),
            "devices": None if pushed is None else pushed.outcomes,
            "warnings": None if pushed is None else pushed.warnings}


class Distiller:
    """Distils students every N versions on one worker thread, so rounds never wait for a distillation."""

    def __init__(self, cfg: CloudConfig, key: Ed25519PrivateKey, edges: list[str], eval_data: EvalData | None,
                 log: logging.Logger) -> None:
        assert cfg.distill is not None
        self.cfg, self.schedule, self.key = cfg, cfg.distill, key
        self.bundle_key = load_private_key(cfg.distill.bundle_key) if cfg.distill.bundle_key else key
        self.edges, self.eval_data, self.log = edges, eval_data, log
        self.run_dir = Path(cfg.run_dir)
        self.worker: threading.Thread | None = None
        self.students: dict[str, list[np.ndarray]] = {}  # float student weights per class: warm starts
        self.features = None   # the federation's FeatureTransform ([features]): proxy rows are raw, students carry it

    def after_round(self, round_id: int, weights: np.ndarray, version: int) -> None:
        """Round `round_id` closed with model `version`: distil it when due and no distillation runs."""
        if not self.schedule.config().due(round_id):
            return
        if self.worker is not None and self.worker.is_alive():
            event(self.log, "distillation still running: skipping this one", logging.WARNING, round=round_id)
            return
        self.worker = threading.Thread(target=self._distill, args=(weights.copy(), version), daemon=True)
        self.worker.start()

    def join(self) -> None:
        if self.worker is not None:
            self.worker.join()

    def _versions(self) -> dict[str, int]:
        try:
            return {str(k): int(v) for k, v in json.loads((self.run_dir / "students" / "versions.json").read_text())
                    .items()}
        except (OSError, ValueError, AttributeError):
            return {}

    def _distill(self, weights: np.ndarray, version: int) -> None:
        schedule, data = self.schedule, self.eval_data
        try:
            proxy_x, proxy_y = load_proxy(schedule.proxy) if schedule.proxy else (None, None)
            if proxy_x is not None and self.features is not None:
                proxy_x = self.features.apply(proxy_x.reshape(len(proxy_x), -1)).reshape(proxy_x.shape)
            targets = [t for t in default_targets(self.cfg.model, self.cfg.model_options)
                       if t.device_class in schedule.classes]
            last = self._versions()
            versions = {t.device_class: last.get(t.device_class, 0) + 1 for t in targets}
            reports = distill_round(self.cfg.model, weights, self.cfg.model_options, self.bundle_key,
                                    self.run_dir / "students" / f"v{version}", version, proxy_x, proxy_y,
                                    data.x if data else None, data.y if data else None, targets=targets,
                                    cfg=schedule.config(), previous=self.students, versions=versions,
                                    teacher_version=version,
                                    features=self.features.to_dict() if self.features is not None else None)
            (self.run_dir / "students").mkdir(parents=True, exist_ok=True)
            atomic_write(self.run_dir / "students" / "versions.json", json.dumps({**last, **versions}).encode())
            for r in reports:
                self.students[r.device_class] = r.weights
                pushed = None
                if r.refused:
                    event(self.log, "student refused: not pushed", logging.WARNING, device_class=r.device_class,
                          reason=r.refused)
                elif schedule.push and r.bundle is not None:
                    pushed = push_bundle(r.bundle, r.device_class, self.edges, self.cfg.broker, self.key,
                                         message_cap=schedule.message_cap, bundle_key=self.bundle_key.public_key(),
                                         wait_s=schedule.push_wait_s)
                    for warning in pushed.warnings:
                        event(self.log, "push warning", logging.WARNING, device_class=r.device_class, warning=warning)
                line = report_line(version, r, pushed)
                with open(self.run_dir / "distill.jsonl", "a") as f:
                    f.write(json.dumps(line) + "\n")
                event(self.log, "student distilled", **line)
        except Exception:  # a failed distillation must not take the federation down
            self.log.exception("distillation failed", extra={"fields": {"version": version}})
