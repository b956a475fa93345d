"""Credentials folders in the layout of QEMU's ``tls-creds-x509``, made with openssl for
the TLS tests (tests/test_tls.py, tests/test_multifd_tls.py): a CA, server and client
certificates it signed, and the wrong ones a stranger would bring."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def _run(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(where: Path, name: str) -> Path:
    where.mkdir(parents=True)
    _run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca-key.pem", "-out", "ca-cert.pem",
         "-days", "2", "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=where)
    return where


def _cert(ca: Path, out: Path, role: str) -> None:
    """``role``-cert.pem / -key.pem in ``out``, signed by ``ca``, as QEMU checks them."""
    purpose = "serverAuth" if role == "server" else "clientAuth"
    ext = out / f"{role}.ext"
    ext.write_text("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
                   f"extendedKeyUsage={purpose}\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{role}-key.pem", "-out", f"{role}.csr",
         "-subj", f"/CN=mignet test {role}", cwd=out)
    _run("x509", "-req", "-in", f"{role}.csr", "-CA", str(ca / "ca-cert.pem"), "-CAkey", str(ca / "ca-key.pem"),
         "-CAcreateserial", "-out", f"{role}-cert.pem", "-days", "2", "-extfile", str(ext), cwd=out)


def make_creds(root: Path) -> dict[str, Path]:
    """server/ and client/ folders of one CA; rogue/: a client of another CA; anon/: only
    the CA (a client without a certificate); wrong-ca/: only the other CA (a client that
    cannot verify our server)."""
    ca, other = _ca(root / "ca", "mignet test CA"), _ca(root / "other-ca", "someone else")
    folders = {}
    for name, signer, role in [("server", ca, "server"), ("client", ca, "client"), ("rogue", other, "client")]:
        d = root / name
        d.mkdir()
        shutil.copy(ca / "ca-cert.pem", d / "ca-cert.pem")
        _cert(signer, d, role)
        folders[name] = d
    anon = root / "anon"
    anon.mkdir()
    shutil.copy(ca / "ca-cert.pem", anon / "ca-cert.pem")
    folders["anon"] = anon
    wrong_ca = root / "wrong-ca"
    wrong_ca.mkdir()
    shutil.copy(other / "ca-cert.pem", wrong_ca / "ca-cert.pem")
    folders["wrong-ca"] = wrong_ca
    return folders
