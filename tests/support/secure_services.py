"""Services a security test starts for itself, beside the shared ones, and stops after:
a password-protected registry, a TLS-only RabbitMQ node; and a sampler of every process's
argv and environment (where a leaked secret would be seen by any local user).

Each listens on 127.0.0.1 only, on ports picked free, with its state in the test's tmp dir.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=120, **kw)


@dataclass(frozen=True)
class AuthRegistry:
    host: str
    username: str
    password: str
    image: str


@contextlib.contextmanager
def auth_registry(tmp: Path, source_image: str, password: str) -> Iterator[AuthRegistry]:
    """A ``docker-registry`` with htpasswd auth holding ``source_image`` as
    ``<host>/fem/busybox:secret``; the engine forgets the image afterwards."""
    port = free_port()
    host = f"127.0.0.1:{port}"
    root = tmp / "auth-registry"
    (root / "data").mkdir(parents=True)
    # The password goes through stdin, never an argv.
    _run(["htpasswd", "-B", "-i", "-c", str(root / "htpasswd"), "fem"], input=password)
    (root / "config.yml").write_text(f"""version: 0.1
log: {{level: warn, accesslog: {{disabled: true}}}}
storage: {{filesystem: {{rootdirectory: {root / 'data'}}}}}
http: {{addr: "{host}"}}
auth: {{htpasswd: {{realm: fem-test, path: {root / 'htpasswd'}}}}}
""")
    log = (root / "registry.log").open("wb")
    proc = subprocess.Popen(["docker-registry", "serve", str(root / "config.yml")],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    image = f"{host}/fem/busybox:secret"
    docker_config = root / "docker"
    docker_config.mkdir(mode=0o700)
    env = {**os.environ, "DOCKER_CONFIG": str(docker_config)}
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(f"http://{host}/v2/", timeout=2).status_code == 401:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"the auth registry did not start: "
                                   f"{(root / 'registry.log').read_text()}")
            time.sleep(0.2)
        _run(["docker", "login", "-u", "fem", "--password-stdin", host], input=password, env=env)
        _run(["docker", "tag", source_image, image])
        _run(["docker", "push", image], env=env)
        _run(["docker", "logout", host], env=env)
        # The task must pull it with the site's credentials, not find it cached.
        _run(["docker", "rmi", image])
        yield AuthRegistry(host, "fem", password, image)
    finally:
        subprocess.run(["docker", "rmi", "-f", image], capture_output=True, check=False)
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


class ProcessSampler:
    """Reads ``/proc/*/cmdline`` and ``/proc/*/environ`` of every process, over and over,
    in a thread, and keeps whatever holds one of ``secrets``."""

    def __init__(self, secrets: list[str], interval_s: float = 0.1):
        self.secrets = [s.encode() for s in secrets]
        self.interval_s = interval_s
        self.hits: list[tuple[int, str, str]] = []
        self.samples = 0
        self.processes_seen: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> ProcessSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            for entry in os.scandir("/proc"):
                if not entry.name.isdigit():
                    continue
                for what in ("cmdline", "environ"):
                    try:
                        with open(f"/proc/{entry.name}/{what}", "rb") as f:
                            data = f.read()
                    except OSError:
                        continue
                    self.processes_seen.add(int(entry.name))
                    for secret in self.secrets:
                        if secret in data:
                            self.hits.append((int(entry.name), what,
                                              data.replace(b"\0", b" ")[:300].decode(
                                                  "utf-8", "replace")))
            self.samples += 1
            self._stop.wait(self.interval_s)


def _certificates(where: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, as PEM."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("fem test CA")).issuer_name(name(
        "fem test CA")).public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    out = {"ca": where / "ca.pem"}
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for who, usage in (("server", ExtendedKeyUsageOID.SERVER_AUTH),
                       ("client", ExtendedKeyUsageOID.CLIENT_AUTH)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name(f"fem test {who}"))
                .issuer_name(ca.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5))
                .not_valid_after(now + dt.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        out[who] = where / f"{who}.pem"
        out[who].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        out[f"{who}_key"] = where / f"{who}.key"
        write_key(key, out[f"{who}_key"])
    return out


@dataclass(frozen=True)
class TlsBroker:
    url: str
    port: int
    ca_file: Path
    cert_file: Path
    key_file: Path

    def params(self, client_cert: bool = True):
        """pika connection parameters trusting the test CA, with or without the client
        certificate."""
        import ssl

        import pika

        context = ssl.create_default_context(cafile=str(self.ca_file))
        if client_cert:
            context.load_cert_chain(str(self.cert_file), str(self.key_file))
        params = pika.URLParameters(self.url)
        params.ssl_options = pika.SSLOptions(context, "127.0.0.1")
        return params


@contextlib.contextmanager
def tls_broker(tmp: Path) -> Iterator[TlsBroker]:
    """A second RabbitMQ node, ``femtls<port>@localhost``, that speaks only AMQPS on
    127.0.0.1 and requires a client certificate from the test CA.  The machine's own node is
    never touched: this one has its own name, ports, database, logs, cookie and plugins."""
    import pika

    port, dist_port = free_port(), free_port()
    node = f"femtls{port}@localhost"
    root = tmp / "tls-broker"
    (root / "certs").mkdir(parents=True)
    certs = _certificates(root / "certs")
    (root / "rabbitmq.conf").write_text(f"""listeners.tcp = none
listeners.ssl.default = 127.0.0.1:{port}
ssl_options.cacertfile = {certs['ca']}
ssl_options.certfile = {certs['server']}
ssl_options.keyfile = {certs['server_key']}
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = true
""")
    (root / "enabled_plugins").write_text("[].\n")
    (root / "rabbitmq-env.conf").write_text("")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "FEM_"))},
        "HOME": str(root),  # its own Erlang cookie
        "RABBITMQ_NODENAME": node,
        "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
        "RABBITMQ_NODE_PORT": str(port),
        "RABBITMQ_DIST_PORT": str(dist_port),
        "RABBITMQ_CONFIG_FILE": str(root / "rabbitmq"),
        "RABBITMQ_CONF_ENV_FILE": str(root / "rabbitmq-env.conf"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(root / "enabled_plugins"),
        "RABBITMQ_MNESIA_BASE": str(root / "mnesia"),
        "RABBITMQ_LOG_BASE": str(root / "log"),
        "RABBITMQ_PID_FILE": str(root / "node.pid"),
        "ERL_EPMD_ADDRESS": "127.0.0.1",
    }
    log = (root / "server.log").open("wb")
    proc = subprocess.Popen(["/usr/lib/rabbitmq/bin/rabbitmq-server"], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    broker = TlsBroker(f"amqps://guest:guest@127.0.0.1:{port}/%2F", port, certs["ca"],
                       certs["client"], certs["client_key"])
    try:
        params = broker.params()
        deadline = time.monotonic() + 90
        while True:
            try:
                pika.BlockingConnection(params).close()
                break
            except pika.exceptions.AMQPError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the TLS broker did not start:\n"
                                       + (root / "server.log").read_text()[-3000:]) from None
                time.sleep(0.5)
        yield broker
    finally:
        subprocess.run(["/usr/lib/rabbitmq/bin/rabbitmqctl", "-n", node, "stop"], env=env,
                       capture_output=True, timeout=60, check=False)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()
