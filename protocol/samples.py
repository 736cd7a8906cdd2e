"""One valid, signed sample of every message type: seeds for the fuzzers and fixtures for the schema tests."""

from __future__ import annotations

import numpy as np

from protocol import messages as m
from protocol.signing import generate_signing_key

PLAN = m.TrainingPlan(lr=0.05, local_epochs=1, batch_size=32, clip=1.0, noise_mult=1.1, mu=0.01, target_epsilon=8.0,
                       target_delta=1e-5, rounds_left=20)
CAPABILITY = m.Capability(compute_class="wearable", memory_mb=256, bandwidth_bps=250_000.0, steps_per_s=80.0,
                          battery=0.8)
COMPRESSION = {"method": "topk", "density": 0.01, "bits": 8, "block_size": 256, "stochastic": True, "seed": None,
               "entropy": False}


def sample_messages() -> list:
    key = generate_signing_key()
    weights = np.arange(10, dtype=np.float32)
    samples = [
        m.RoundAnnouncement(round_id=3, model_name="har_mlp", model_version=2, strategy="fediomt", deadline=1.7e9,
                            plan=PLAN, compression=COMPRESSION, edges=["edge1"], cohort=["d01", "d02"],
                            lr_scale={"d01": 1.0}, sample_weight={"d01": 1.25},
                            central_dp=m.CentralDPReport(clip=1.0, noise_mult=0.5, sampling_rate=1.0),
                            secagg={"mode": "trusted_edge"}, run_id=m.new_run_id(1.7e9), statistics="summary",
                            features='{"numeric": ["age", "chol"], "categorical": []}'),
        m.global_model("har_mlp", 2, weights, run_id=m.new_run_id(1.7e9)),
        m.DeviceUpdate(device_id="d01", edge_id="edge1", round_id=3, base_version=2, num_samples=120, local_steps=4,
                       train_loss=0.7, privacy=m.PrivacySpent(epsilon=0.9, delta=1e-5, accountant="rdp",
                                                               noise_mult=1.1, sample_rate=0.25, steps=4),
                       n_params=10, delta=b"\x01\x02", capability=CAPABILITY,
                       nonce=m.new_nonce(), timestamp=1.7e9),
        m.EdgeAggregate(edge_id="edge1", round_id=3, base_version=2, num_devices=2, num_samples=240, weight_sum=240.0,
                        n_params=10, delta=b"\x01", significant=True,
                        central_dp=m.CentralDPReport(clip=1.0, noise_mult=0.5, sampling_rate=1.0, num_clipped=1),
                        filtered=["d03"], rejected={"BAD_SIGNATURE": 1}, device_ids=["d01", "d02"],
                        max_device_epsilon=0.9, mean_local_steps=4.0, nonce=m.new_nonce(), timestamp=1.7e9),
        m.AggregateReceipt(edge_id="edge1", round_id=3, aggregate_nonce=m.new_nonce(), accepted=True, reason=0,
                           timestamp=1.7e9),
        m.Ack(sender="edge1", device_id="d01", round_id=3, accepted=False, reason=8, detail="signature"),
        m.DeviceStatus(device_id="d01", edge_id="edge1", state="skipped", model_version=2, bundle_version=1,
                       epsilon_spent=0.9, epsilon_budget=8.0, timestamp=1.7e9, round_id=3, capability=CAPABILITY),
        m.Chunk(transfer_id=b"\x00" * 16, index=0, total=2, total_size=5, sha256=b"\x11" * 32, data=b"abc"),
        m.BundleManifest(device_class="wearable", name="wearable_cnn", version=2, size=5, sha256=b"\x11" * 32,
                         chunk_size=3, total=2, transfer_id=b"\x00" * 16, timestamp=1.7e9),
    ]
    samples += secagg_samples()
    return [m.sign_message(s, key) if hasattr(s, "sig") else s for s in samples]


def secagg_samples() -> list:
    from protocol.secagg import messages as sa

    share = sa.SealedShare(sender="d01", recipient="d02", nonce=b"\x00" * 12, ciphertext=b"\x01" * 104)
    advert = sa.AdvertiseKeys(edge_id="edge1", round_id=3, device_id="d01", c_pk=b"\x02" * 32, s_pk=b"\x03" * 32,
                              seed_commit=b"\x04" * 32, nonce=m.new_nonce(), sig=b"\x05" * 64)
    return [
        sa.RoundOpen(edge_id="edge1", round_id=3, length=10), advert,
        sa.Roster(edge_id="edge1", round_id=3, config={"graph": "sparse", "k": 0, "threshold": 0.5}, length=10,
                  adverts=[advert]),
        sa.ShareKeys(edge_id="edge1", round_id=3, device_id="d01", shares=[share], nonce=m.new_nonce()),
        sa.ShareInbox(edge_id="edge1", round_id=3, device_id="d02", shares=[share]),
        sa.MaskedInput(edge_id="edge1", round_id=3, device_id="d01", data=b"\x06" * 20, bad_senders=["d03"],
                       nonce=m.new_nonce()),
        sa.UnmaskRequest(edge_id="edge1", round_id=3, survivors=["d01", "d02"], dropped=["d03"]),
        sa.UnmaskShares(edge_id="edge1", round_id=3, device_id="d01", seed_shares={"d02": b"\x07" * 44},
                        key_shares={"d03": b"\x08" * 44}, nonce=m.new_nonce()),
        sa.Outcome(edge_id="edge1", round_id=3, aborted=False, survivors=["d01", "d02"]),
    ]
