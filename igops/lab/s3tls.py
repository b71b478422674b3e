"""moto behind TLS: a small nginx of its own on S3_TLS, with a certificate from a lab CA.

pgBackRest speaks S3 only over https and checks the certificate against the endpoint's name,
so the certificate names the front's address as its CN and as DNS and IP subjectAltNames.
moto stays plain http on its own address for everything else (the app, EBS). The CA and
certificate are made once with the openssl CLI and kept; the database hosts trust the CA
through [archive.repository] ca_file.
"""

from __future__ import annotations

from pathlib import Path

from igops.lab import files, proc
from igops.lab.state import MOTO, S3_TLS, Paths

CERTIFICATE_DAYS = 3650


def ca_file(paths: Paths) -> Path:
    return paths.s3_tls / "ca.crt"


def ensure_certificates(paths: Paths) -> tuple[Path, Path]:
    """The server certificate and key, made (with the CA) only when missing: (certificate, key)."""
    directory = paths.s3_tls
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = directory / "ca.key", ca_file(paths)
    key, certificate = directory / "server.key", directory / "server.crt"
    if not (ca_key.exists() and ca_cert.exists()):
        proc.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-sha256",
                "-days",
                str(CERTIFICATE_DAYS),
                "-subj",
                "/CN=igops lab CA",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
                "-keyout",
                ca_key,
                "-out",
                ca_cert,
            ]  # fmt: skip
        )
        certificate.unlink(missing_ok=True)  # signed by the CA just replaced
    if not (key.exists() and certificate.exists()):
        address = S3_TLS[0]
        extensions = directory / "server.ext"
        files.write_file(
            extensions,
            f"subjectAltName = DNS:{address}, IP:{address}\nbasicConstraints = CA:FALSE\n"
            "keyUsage = critical, digitalSignature, keyEncipherment\nextendedKeyUsage = serverAuth\n",
        )
        request = directory / "server.csr"
        proc.run(
            [
                "openssl",
                "req",
                "-new",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-sha256",
                "-subj",
                f"/CN={address}",
                "-keyout",
                key,
                "-out",
                request,
            ]  # fmt: skip
        )
        proc.run(
            [
                "openssl",
                "x509",
                "-req",
                "-sha256",
                "-in",
                request,
                "-CA",
                ca_cert,
                "-CAkey",
                ca_key,
                "-CAcreateserial",
                "-days",
                str(CERTIFICATE_DAYS),
                "-extfile",
                extensions,
                "-out",
                certificate,
            ]  # fmt: skip
        )
    for private in (ca_key, key):
        private.chmod(0o600)
    ca_cert.chmod(0o644)  # read by pgBackRest as the postgres user
    return certificate, key


def daemon(paths: Paths) -> proc.Daemon:
    directory = paths.s3_tls
    certificate, key = ensure_certificates(paths)
    for temporary in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (directory / "tmp" / temporary).mkdir(parents=True, exist_ok=True)
    files.chown(directory / "tmp", "www-data", recursive=True)
    pid_file = directory / "nginx.pid"
    config = directory / "nginx.conf"
    files.write_file(
        config,
        files.render(
            "s3-tls-nginx.conf",
            pid_file=pid_file,
            dir=directory,
            address=S3_TLS[0],
            port=S3_TLS[1],
            certificate=certificate,
            key=key,
            upstream=f"{MOTO[0]}:{MOTO[1]}",
        ),
    )
    proc.run(["/usr/sbin/nginx", "-t", "-q", "-c", config, "-e", directory / "error.log"])
    return proc.Daemon(
        "moto TLS front (nginx)",
        ("/usr/sbin/nginx", "-c", str(config), "-e", str(directory / "error.log")),
        pid_file,
        directory / "nginx.out",
        endpoint=S3_TLS,
        writes_pid_file=True,
        config_files=(config, certificate),
    )
