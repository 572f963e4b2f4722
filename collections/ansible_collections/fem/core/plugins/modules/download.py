#!/usr/bin/python
# Copyright: fem-ansible developers
# SPDX-License-Identifier: Apache-2.0
"""Download a task input: streamed, size-capped, sha256-checked, redirects refused."""

# Ansible module layout (documentation before imports); runs on the target's Python (>= 3.8).
# ruff: noqa: E402

from __future__ import annotations

DOCUMENTATION = r"""
---
module: download
short_description: Download one file for a fem task, refusing redirects
version_added: 1.0.0
description:
  - Streams O(url) to O(dest) through a temporary file in the same directory, renamed only
    when the download is whole, its size at most O(max_bytes) and, when O(sha256) is given,
    its digest equal to it.
  - A redirect is an error, never followed - DESIGN.md says redirects are not followed, since
    one could send a request with the task's headers anywhere.
    M(ansible.builtin.get_url) has no option for that.
  - No proxy from the environment and no C(.netrc) are used.
options:
  url:
    description: The URL (http or https); may hold a presigned query string.
    type: str
    required: true
  dest:
    description: The file to write; its directory must exist.
    type: path
    required: true
  headers:
    description: Request headers (may hold credentials).
    type: dict
    default: {}
  sha256:
    description: Expected sha256 (hex) of the content.
    type: str
  max_bytes:
    description:
      - Largest content accepted; with O(total_dir), largest total of the files under
        O(total_dir) once this one is written.
    type: int
    required: true
  total_dir:
    description:
      - Directory whose files (the inputs already downloaded; symbolic links counted as
        links) count towards O(max_bytes) with this one; a file at O(dest) that this
        download replaces does not count.
    type: path
  timeout:
    description: Seconds without progress before the download fails.
    type: int
    default: 60
  deadline:
    description:
      - Seconds the whole download may take, the wait for the answer included; past it the
        connection is shut and the download fails. A server that sends a byte every few
        seconds never trips O(timeout), which bounds each read only.
    type: int
    default: 3600
  ca_file:
    description: CA bundle to verify https servers with; default the system's.
    type: path
author:
  - fem-ansible developers
"""

EXAMPLES = r"""
- name: Download an input
  fem.core.download:
    url: https://bucket.example.org/in.csv?X-Amz-Signature=...
    dest: /var/lib/fem-ansible/tasks/fem-site-t1/input/in.csv
    max_bytes: 1073741824
  no_log: true
"""

RETURN = r"""
size:
  description: Bytes written.
  returned: success
  type: int
sha256:
  description: sha256 (hex) of the content.
  returned: success
  type: str
"""

import contextlib
import hashlib
import http.client
import os
import socket
import ssl
import tempfile
import threading
import urllib.error
import urllib.request

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.fem.core.plugins.module_utils.disk import tree_bytes

CHUNK = 1024 * 1024


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise urllib.error.HTTPError(req.full_url, code, "redirect refused", headers, fp)


class Deadline:
    """Shuts the download's sockets down once ``seconds`` have passed, which wakes a read
    blocked on them (a timer thread cannot raise in the reading one)."""

    def __init__(self, seconds):
        self.seconds, self.expired, self._socks = seconds, False, []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self):
        self._timer.start()
        return self

    def __exit__(self, *exc):
        self._timer.cancel()

    def watch(self, sock):
        with self._lock:
            self._socks.append(sock)
            if self.expired:
                shut(sock)

    def _expire(self):
        with self._lock:
            self.expired = True
            for sock in self._socks:
                shut(sock)

    def connection(self, base):
        """``base`` (an http.client connection class) telling this deadline its socket."""
        deadline = self

        class Watched(base):
            def connect(self):
                super().connect()
                deadline.watch(self.sock)

        return Watched


def shut(sock):
    # The plain socket's shutdown, also under TLS, whose state is the reading thread's.
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


class WatchedHTTP(urllib.request.HTTPHandler):
    def __init__(self, deadline):
        super().__init__()
        self.deadline = deadline

    def http_open(self, req):
        return self.do_open(self.deadline.connection(http.client.HTTPConnection), req)


class WatchedHTTPS(urllib.request.HTTPSHandler):
    def __init__(self, deadline, context):
        super().__init__(context=context)
        self.deadline = deadline

    def https_open(self, req):
        return self.do_open(self.deadline.connection(http.client.HTTPSConnection), req,
                            context=self._context)


def main():
    module = AnsibleModule(
        argument_spec={
            "url": {"type": "str", "required": True, "no_log": True},
            "dest": {"type": "path", "required": True},
            "headers": {"type": "dict", "default": {}, "no_log": True},
            "sha256": {"type": "str"},
            "max_bytes": {"type": "int", "required": True},
            "timeout": {"type": "int", "default": 60},
            "deadline": {"type": "int", "default": 3600},
            "ca_file": {"type": "path"},
            "total_dir": {"type": "path"},
        },
        supports_check_mode=False,
    )
    p = module.params
    if not p["url"].lower().startswith(("http://", "https://")):
        module.fail_json(msg="only http and https inputs can be downloaded")
    if p["deadline"] < 1:
        module.fail_json(msg=f"Invalid deadline {p['deadline']}: at least 1 second")
    context = ssl.create_default_context(cafile=p["ca_file"])
    deadline = Deadline(p["deadline"])
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), NoRedirect(),
        WatchedHTTP(deadline), WatchedHTTPS(deadline, context),
    )
    request = urllib.request.Request(p["url"], headers=p["headers"])
    name = os.path.basename(p["dest"])
    limit, what = p["max_bytes"], f"input {name} is"
    if p["total_dir"]:
        replaced = os.lstat(p["dest"]).st_size if os.path.lexists(p["dest"]) else 0
        limit -= tree_bytes(p["total_dir"]) - replaced
        what = f"the inputs with {name} are"
    digest, size = hashlib.sha256(), 0
    fd, partial = tempfile.mkstemp(prefix=".download-", dir=os.path.dirname(p["dest"]))
    late = f"input {name}: not downloaded within {p['deadline']}s"
    try:
        with deadline, os.fdopen(fd, "wb") as out, \
                opener.open(request, timeout=p["timeout"]) as resp:
            while True:
                chunk = resp.read(CHUNK)
                if not chunk:
                    break
                size += len(chunk)
                if size > limit:
                    module.fail_json(msg=f"{what} over the site's limit of "
                                         f"{p['max_bytes']} bytes (policy.limits.input_bytes)")
                digest.update(chunk)
                out.write(chunk)
        if deadline.expired:  # a body without a length just ends when its socket is shut
            module.fail_json(msg=late)
        if p["sha256"] and digest.hexdigest() != p["sha256"].lower():
            module.fail_json(msg=f"input {name}: sha256 {digest.hexdigest()} is not the "
                                 f"expected {p['sha256']}")
        os.chmod(partial, 0o644)
        os.replace(partial, p["dest"])
    except urllib.error.HTTPError as e:
        module.fail_json(msg=f"input {name}: HTTP {e.code} ({e.msg}); redirects are not followed")
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        module.fail_json(msg=late if deadline.expired else
                         f"input {name}: download failed: {getattr(e, 'reason', e)}")
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    module.exit_json(changed=True, size=size, sha256=digest.hexdigest())


if __name__ == "__main__":
    main()
