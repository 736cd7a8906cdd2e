"""The consortium PKI: certificates, identity namespace, rotation, revocation, key hygiene (no broker needed)."""

from __future__ import annotations

import json
import stat
import subprocess
import sys

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fediomt import pki
from protocol import signing
from protocol.errors import ProtocolError


@pytest.fixture
def ca(tmp_path):
    pki.init_ca(tmp_path / "pki")
    return tmp_path / "pki"


def _cert(path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_device_certificate_names_the_mqtt_user_and_chains_to_the_ca(ca):
    ident = pki.issue(ca, "device", "d-17")
    cert, root = _cert(ident.cert), _cert(pki.ca_cert_path(ca))
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "d-17"
    cert.verify_directly_issued_by(root)
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_private_keys_are_0600_and_the_ca_key_is_fenced(ca):
    ident = pki.issue(ca, "edge", "e1")
    assert _mode(ident.key) == 0o600 and _mode(ident.sign_key) == 0o600
    assert _mode(ca / "private" / "ca.key") == 0o600 and _mode(ca / "private") == 0o700
    assert _mode(ident.cert) == 0o644 and _mode(pki.ca_cert_path(ca)) == 0o644


def test_signing_keypair_is_ed25519_and_usable_by_the_protocol(ca):
    ident = pki.issue(ca, "device", "d1")
    key, pub = signing.load_private_key(ident.sign_key), signing.load_public_key(ident.sign_pub)
    signing.verify(pub, signing.sign(key, b"update"), b"update")
    with pytest.raises(ProtocolError):
        signing.verify(pub, signing.sign(key, b"update"), b"forged")


def test_server_certificate_has_loopback_and_configured_names_and_cannot_log_in(ca):
    ident = pki.issue(ca, "server", "broker-e1", hosts=["edge1.example.org", "10.0.0.5"])
    cert = _cert(ident.cert)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"localhost", "edge1.example.org"}
    assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1", "10.0.0.5"}
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH]
    assert ident.sign_key is None


def test_identity_namespace_is_unique_across_kinds(ca):
    pki.issue(ca, "edge", "e1")
    with pytest.raises(pki.PkiError, match="unique"):
        pki.issue(ca, "device", "e1")
    with pytest.raises(pki.PkiError, match="reserved"):
        pki.issue(ca, "device", "cloud")
    with pytest.raises(pki.PkiError, match="rotate"):
        pki.issue(ca, "edge", "e1")
    with pytest.raises(ProtocolError):
        pki.issue(ca, "device", "d1/#")


def test_revoke_puts_every_live_serial_in_a_signed_crl(ca):
    first = _cert(pki.issue(ca, "device", "d1").cert).serial_number
    second = _cert(pki.issue(ca, "device", "d1", rotate=True).cert).serial_number
    kept = _cert(pki.issue(ca, "device", "d2").cert).serial_number
    crl = x509.load_pem_x509_crl(pki.crl_path(ca).read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(first) is not None  # rotation revokes the old key
    assert crl.get_revoked_certificate_by_serial_number(second) is None
    assert pki.revoke(ca, "d1") == 1
    crl = x509.load_pem_x509_crl(pki.crl_path(ca).read_bytes())
    assert crl.is_signature_valid(_cert(pki.ca_cert_path(ca)).public_key())
    assert crl.get_revoked_certificate_by_serial_number(second) is not None
    assert crl.get_revoked_certificate_by_serial_number(kept) is None
    with pytest.raises(pki.PkiError):
        pki.revoke(ca, "d1")


def test_crl_numbers_increase_and_init_refuses_to_overwrite(ca):
    numbers = []
    for _ in range(2):
        crl = x509.load_pem_x509_crl(pki.write_crl(ca).read_bytes())
        numbers.append(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)
    assert numbers[1] == numbers[0] + 1
    with pytest.raises(pki.PkiError, match="already"):
        pki.init_ca(ca)


def test_export_copies_one_hosts_material_without_the_ca_key(ca, tmp_path):
    pki.issue(ca, "edge", "e1")
    pki.issue(ca, "server", "broker-e1")
    pki.issue(ca, "device", "d1")
    out = pki.export(ca, tmp_path / "e1-host", [("edge", "e1"), ("server", "broker-e1")])
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert files == {"ca.crt", "crl.pem", "edges/e1/tls.crt", "edges/e1/tls.key", "edges/e1/sign.key",
                     "edges/e1/sign.pub", "edges/e1/ledger.crt", "edges/e1/ledger.key", "servers/broker-e1/tls.crt",
                     "servers/broker-e1/tls.key"}
    assert _mode(out / "edges/e1/tls.key") == _mode(out / "edges/e1/ledger.key") == 0o600


def test_each_extra_connection_gets_a_role_certificate_revoked_and_rotated_with_its_identity(ca):
    """Brokers bind client ids to CNs (issue 18), so the cloud's and an edge's extra connections need certificates
    of their own: CN "ID.ROLE", clientAuth only, which no device id can take (ids have no ".")."""
    cloud = pki.issue(ca, "cloud")
    edge = pki.issue(ca, "edge", "e1")
    cns = {role: _cert(cloud.role(role)[0]).subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
           for role in ("secagg", "ledger", "push")}
    assert cns == {"secagg": "cloud.secagg", "ledger": "cloud.ledger", "push": "cloud.push"}
    ledger_cert, ledger_key = edge.role("ledger")
    assert _cert(ledger_cert).extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == \
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
    assert _mode(ledger_key) == 0o600
    with pytest.raises(ValueError, match="no 'push'"):
        edge.role("push")
    with pytest.raises(ProtocolError):
        pki.issue(ca, "device", "e1.ledger")
    # An identity issued before role certificates existed gets just the missing ones; its own keys stay.
    ledger_cert.unlink()
    ledger_key.unlink()
    index = json.loads((ca / "index.json").read_text())
    index["certs"] = [e for e in index["certs"] if (e["name"], e.get("role")) != ("e1", "ledger")]
    (ca / "index.json").write_text(json.dumps(index))
    own = edge.cert.read_bytes()
    pki.issue(ca, "edge", "e1")
    assert ledger_cert.exists() and edge.cert.read_bytes() == own
    old_role = _cert(ledger_cert).serial_number
    pki.issue(ca, "edge", "e1", rotate=True)
    crl = x509.load_pem_x509_crl(pki.crl_path(ca).read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(old_role) is not None   # rotation revokes the role too
    assert pki.revoke(ca, "e1") == 2
    crl = x509.load_pem_x509_crl(pki.crl_path(ca).read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(_cert(ledger_cert).serial_number) is not None


def test_enrolment_dir_follows_issue_and_revoke(ca, tmp_path):
    d1, _ = pki.issue(ca, "device", "d1"), pki.issue(ca, "device", "d2")
    pki.issue(ca, "edge", "e1")
    out = tmp_path / "enrolled"
    assert pki.enrolment(ca, out) == ["d1", "d2"]
    assert (out / "d1.pub").read_bytes() == d1.sign_pub.read_bytes()
    signing.load_public_key(out / "d2.pub")
    pki.revoke(ca, "d2")
    assert pki.enrolment(ca, out) == ["d1"]
    assert sorted(p.name for p in out.iterdir()) == ["d1.crt", "d1.pub"]
    assert pki.enrolment(ca, tmp_path / "edges", kind="edge") == ["e1"]


def test_cli_prints_paths_never_key_material(tmp_path):
    def fediomt(*argv):
        return subprocess.run([sys.executable, "-m", "fediomt", "pki", *argv, "--dir", str(tmp_path / "p")],
                              capture_output=True, text=True)

    assert fediomt("init").returncode == 0
    issued = fediomt("issue", "--device", "d9")
    assert issued.returncode == 0
    assert "PRIVATE KEY" not in issued.stdout + issued.stderr
    assert str(tmp_path / "p" / "devices" / "d9" / "tls.key") in issued.stdout
    clash = fediomt("issue", "--edge", "d9")
    assert clash.returncode == 1 and "unique" in clash.stderr
    assert fediomt("revoke", "d9").returncode == 0
    assert fediomt("crl").returncode == 0


def test_a_daemons_extra_connection_picks_its_role_certificate_beside_the_main_one(ca, tmp_path):
    from protocol.mqtt import ConnectionConfig, role_connection

    cloud = pki.issue(ca, "cloud")
    plain = ConnectionConfig()
    assert role_connection(plain, "push") is plain   # no client certificate: nothing to pick
    main = ConnectionConfig(ca=cloud.ca, cert=cloud.cert, key=cloud.key)
    push = role_connection(main, "push")
    assert (push.cert, push.key) == cloud.role("push") and push.ca == cloud.ca
    assert role_connection(push, "push") == push     # `fediomt push --cert push.crt` as given
    device = pki.issue(ca, "device", "d1")           # a device has no roles: its directory has no ledger.crt
    with pytest.raises(FileNotFoundError, match=r"ledger\.crt: the ledger connection needs its own certificate"):
        role_connection(ConnectionConfig(ca=device.ca, cert=device.cert, key=device.key), "ledger")
