"""The first process of every playbook run: it puts itself in the run's cgroup, then hands
its terminal to the resident Ansible (fem_ansible.resident_server) or, where none serves
this run's environment, becomes the cold ``ansible-playbook`` itself (``exec``).

ansible-runner starts this as its ``binary`` (``python -I -S``: no site, no
``PYTHONPATH``, standard library only, so it starts in milliseconds)::

    python -I -S resident_client.py fem-resident/1 <socket | -> <seconds> -- <cold command>

(waiting up to ``<seconds>`` for a server that is starting to listen), and sees either way
the same process: its stdio are the run's pty, it ends with the run's
exit code, ansible-runner's cancel and timeout (``killpg`` of this process's group) end it.
When this process ends before the run does, the server kills the run's cgroup.  A server
that dies during the run ends this process with :data:`LOST_RC` (fem_ansible.runner then
leaves the task to recovery, as after a ``kill -9`` of the listener).

The listener names the socket by :func:`server_key` of the run's environment: a server
serves only runs whose Ansible environment is its own, but for :data:`PER_RUN`, which
Ansible reads when it uses it (docs/decisions.md, "A resident Ansible").  Not this process:
Python may add to its own environment as it starts (``LC_CTYPE``, PEP 538), as it does to
the server's.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import Iterator

#: The run's own variables, read at use: they may differ between a server and its runs.
#: FEM_JOB_ID is the run's marker, FEM_RUN_CGROUP its group; ansible-runner's artifacts dir
#: (read by its callback per event) and fact cache (a constant the server's run refreshes);
#: the run's own SSH ControlPath dir (an option of the ssh connection, read per host).
PER_RUN = frozenset({"FEM_JOB_ID", "FEM_RUN_CGROUP", "AWX_ISOLATED_DATA_DIR",
                     "ANSIBLE_CACHE_PLUGIN_CONNECTION", "ANSIBLE_SSH_CONTROL_PATH_DIR"})

#: The exit code of a run whose server died during it (ansible-playbook never uses it).
LOST_RC = 254

#: What the listener, this client and the server agree on; anything else (an upgrade in
#: place: the listener running still has the code it started with) runs cold.  The cold
#: command always follows the first ``--``, whatever the version.
PROTOCOL = "fem-resident/1"

_HEADER = struct.Struct("!I")


def server_key(env: dict[str, str]) -> str:
    """The name of the server that may run a process with ``env``: a hash of everything
    in it but :data:`PER_RUN`."""
    fixed = sorted((k, v) for k, v in env.items() if k not in PER_RUN)
    return hashlib.sha256(json.dumps(fixed).encode()).hexdigest()[:24]


def _cold(command: list[str], why: str | None) -> None:
    if why:
        print(f"fem-ansible: this run starts its own Ansible: {why}", file=sys.stderr,
              flush=True)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.execv(command[0], command)


def _join_cgroup() -> str | None:
    """Join the run's cgroup; why not, if it fails (the run then goes cold: it is found by
    its marker)."""
    group = os.environ.get("FEM_RUN_CGROUP")
    if not group:
        return "no cgroup"
    try:
        with open(os.path.join(group, "cgroup.procs"), "w", encoding="ascii") as f:
            f.write("0\n")
    except OSError as e:
        return f"its cgroup could not be joined ({e.strerror})"
    return None


def _connect(path: str, deadline: float) -> socket.socket | None:
    """A connection to the server at ``path``, tried until ``deadline`` (a server starting:
    its imports take about a second, which a cold start would spend too); only to a server
    of this process's own user, which is given the run's terminal."""
    while True:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(path)
        except OSError:
            conn.close()
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)
            continue
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        if int.from_bytes(creds[4:8], sys.byteorder) != os.getuid():
            conn.close()
            print(f"fem-ansible: {path} is another user's: not used", file=sys.stderr,
                  flush=True)
            return None
        return conn


def _request(conn: socket.socket, command: list[str]) -> None:
    body = json.dumps({"protocol": PROTOCOL, "command": command, "env": dict(os.environ),
                       "cwd": os.getcwd()}).encode()
    data = _HEADER.pack(len(body)) + body
    sent = socket.send_fds(conn, [data], [0, 1, 2])
    conn.sendall(data[sent:])


def _replies(conn: socket.socket) -> Iterator[dict]:
    buffer = b""
    while True:
        chunk = conn.recv(4096)
        if not chunk:
            return
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            yield json.loads(line)


def main(argv: list[str]) -> int:
    cut = argv.index("--")
    command = argv[cut + 1:]
    if argv[1:2] != [PROTOCOL] or cut != 4:
        _cold(command, f"the resident Ansible's client is not the listener's ({argv[1]!r}); "
              "restart the listener after an upgrade")
    server, wait = argv[2], float(argv[3])
    why = _join_cgroup()
    if why or server == "-":
        _cold(command, None if server == "-" else why)
    # A stop's SIGTERM goes to every process of the run's cgroup: the run ends by it and
    # this process with the run's exit code, which the server sends.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    conn = _connect(server, time.monotonic() + wait)
    if conn is None:
        _cold(command, None)  # no server for this environment (yet): today's way
    try:
        _request(conn, command)
    except OSError:
        conn.close()
        _cold(command, None)
    for reply in _replies(conn):
        if "cold" in reply:
            conn.close()
            _cold(command, reply["cold"])
        if "rc" in reply:
            return int(reply["rc"])
    print("fem-ansible: the resident Ansible server ended during this run", file=sys.stderr,
          flush=True)
    return LOST_RC


if __name__ == "__main__":
    sys.exit(main(sys.argv))
