"""A real S3 server on loopback for tests: ministack behind a socat TLS terminator.

Why this shape:
- ministack checks SigV4 signatures (for IAM-user keys when AUTH=true), validates
  Content-MD5 / x-amz-checksum-sha256 (BadDigest) and enforces If-None-Match (412), like R2.
- Over plain http boto3 sends checksums as headers; over https it uses the aws-chunked format
  that production (R2) sees. socat terminates TLS with a throwaway CA so the client talks https.
- Root keys are never signature-checked by ministack, so the server creates an IAM user with an
  s3:* policy and hands out that user's key pair.
- Region: ministack answers a presigned GET signed for region "auto" with a 301, and CreateBucket
  with "auto" fails, so test clients use "us-east-1" (R2 accepts it as an alias of "auto").

With faults=True a FaultProxy (tests/faultproxy.py) sits between socat and ministack, and
`server.faults` injects 5xx answers, dropped connections, truncated responses, corrupted bodies
and stalls into chosen requests.

Usage:
    with run_s3_server(tmp_dir) as server:
        bucket = server.create_bucket("videos")
        client = server.client()
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3

from tasks.upload import make_s3_client
from tests.faultproxy import FaultProxy

ROOT_KEY = ROOT_SECRET = "test"  # ministack's root credentials (only used to create the IAM user)
TEST_REGION = "us-east-1"


@dataclass(frozen=True)
class S3TestServer:
    endpoint_url: str        # https://127.0.0.1:<port> (socat TLS in front of ministack)
    http_endpoint_url: str   # http://127.0.0.1:<port> (ministack itself)
    ca_path: Path
    access_key_id: str
    secret_access_key: str
    region: str = TEST_REGION
    faults: FaultProxy | None = None   # between socat and ministack when run with faults=True

    def client(self, *, secret_access_key: str | None = None, **kwargs: Any) -> Any:
        """An R2-configured client (tasks.upload.make_s3_client) talking https to this server."""
        return make_s3_client(self.endpoint_url, access_key_id=self.access_key_id,
                              secret_access_key=secret_access_key or self.secret_access_key,
                              region=self.region, verify=str(self.ca_path), **kwargs)

    def create_bucket(self, name: str | None = None) -> str:
        name = name or f"test-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name


@contextmanager
def run_s3_server(workdir: Path, startup_timeout: float = 20.0, *,
                  faults: bool = False) -> Iterator[S3TestServer]:
    workdir.mkdir(parents=True, exist_ok=True)
    ca_path, cert_path, key_path = _write_tls_material(workdir)
    with ExitStack() as stack:
        http_port = _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(GATEWAY_PORT=str(http_port), BIND_HOST="127.0.0.1", AUTH="true", LOG_LEVEL="WARNING",
                   AWS_ACCESS_KEY_ID=ROOT_KEY, AWS_SECRET_ACCESS_KEY=ROOT_SECRET)
        ministack = _start(stack, [sys.executable, "-m", "ministack"], env, workdir / "ministack.log")
        _wait_for_port(http_port, ministack, startup_timeout, workdir / "ministack.log")
        proxy = stack.enter_context(FaultProxy(http_port)) if faults else None

        tls_port = _free_port()
        socat = _start(stack, [
            "socat", f"OPENSSL-LISTEN:{tls_port},bind=127.0.0.1,reuseaddr,fork,"
                     f"cert={cert_path},key={key_path},verify=0",
            f"TCP:127.0.0.1:{proxy.port if proxy else http_port}"], dict(os.environ), workdir / "socat.log")
        _wait_for_port(tls_port, socat, startup_timeout, workdir / "socat.log")

        http_url = f"http://127.0.0.1:{http_port}"
        access_key_id, secret = _create_iam_user(http_url)
        yield S3TestServer(endpoint_url=f"https://127.0.0.1:{tls_port}", http_endpoint_url=http_url,
                           ca_path=ca_path, access_key_id=access_key_id, secret_access_key=secret,
                           faults=proxy)


def _create_iam_user(http_url: str) -> tuple[str, str]:
    iam = boto3.session.Session().client("iam", endpoint_url=http_url, region_name=TEST_REGION,
                                         aws_access_key_id=ROOT_KEY, aws_secret_access_key=ROOT_SECRET)
    iam.create_user(UserName="uploader")
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    iam.put_user_policy(UserName="uploader", PolicyName="s3-all", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="uploader")["AccessKey"]
    return key["AccessKeyId"], key["SecretAccessKey"]


def _start(stack: ExitStack, argv: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    log = stack.enter_context(log_path.open("wb"))
    process = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    stack.callback(_stop, process)
    return process


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Terminate, then kill if it does not exit within 5 s."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode} before listening on {port}; "
                               f"log: {log_path.read_text(errors='replace')[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listened on 127.0.0.1:{port} within {timeout} s; see {log_path}")


def _write_tls_material(workdir: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1/localhost signed by it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "turbo-batch test CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False,
                                            encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
               .sign(ca_key, hashes.SHA256()))
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
                   .issuer_name(ca_name).public_key(server_key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
                   .add_extension(x509.SubjectAlternativeName([
                       x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), critical=False)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                                  critical=False)
                   .sign(ca_key, hashes.SHA256()))
    ca_path, cert_path, key_path = workdir / "ca.pem", workdir / "server.pem", workdir / "server.key"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    return ca_path, cert_path, key_path
