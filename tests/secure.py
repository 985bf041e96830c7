"""A real nats-server started with the shipped deploy/nats/secure.conf: NKey users made by
`specedge.auth` (operator, verifier, edges) and TLS with a CA generated here."""

from __future__ import annotations

import datetime
import ipaddress
import json
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from specedge import broker, subjects
from specedge.auth import AuthDir, connect_options


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_tls(d: Path) -> tuple[Path, Path, Path]:
    """A self-signed CA and a server certificate for 127.0.0.1/localhost: (ca, cert, key)."""
    d.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("specedge test CA"))
          .issuer_name(_name("specedge test CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name("localhost")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = d / "ca.pem", d / "server.pem", d / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


@dataclass
class SecureBroker:
    srv: broker.EmbeddedNats
    auth: AuthDir
    ca: Path
    monitor_port: int

    @property
    def url(self) -> str:
        return self.srv.url

    def seed(self, user: str) -> str:
        name = f"edge-{user}.nk" if self.auth.users()[user]["role"] == "edge" else f"{user}.nk"
        return str(self.auth.creds / name)

    def opts(self, user: str, **kw) -> dict:
        """broker.connect options for one user: its seed, the test CA, its inbox prefix."""
        edge = self.auth.users()[user]["role"] == "edge"
        return connect_options(nkey_seed=self.seed(user), tls_ca=str(self.ca),
                               inbox_prefix=subjects.edge_inbox(user) if edge else None) | kw

    def connz(self) -> list[dict]:
        url = f"http://127.0.0.1:{self.monitor_port}/connz?auth=1&subs=1"
        with urllib.request.urlopen(url, timeout=5) as r:
            return json.load(r)["connections"]

    def stop(self) -> None:
        self.srv.cleanup()


def start_secure(tmp: Path, edges: list[str], consumer=None) -> SecureBroker:
    auth = AuthDir(tmp / "specedge-etc")
    auth.init()  # copies deploy/nats/secure.conf to nats.conf next to the rendered auth.conf
    for e in edges:
        auth.add(e)
    ca, cert, key = make_tls(tmp / "tls")
    mport = broker.free_port()
    srv = broker.EmbeddedNats(store_dir=tmp / "nats", config_file=str(auth.path / "nats.conf"),
                              extra_args=["-m", str(mport)],
                              env={"SPECEDGE_NATS_TLS_CERT": str(cert), "SPECEDGE_NATS_TLS_KEY": str(key)})
    srv.start()
    sb = SecureBroker(srv, auth, ca, mport)
    kw = {"consumer": consumer} if consumer else {}
    broker.run_setup(srv.url, **kw, **sb.opts("operator"))
    return sb
