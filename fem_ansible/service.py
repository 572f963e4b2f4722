"""``fem-ansible install-service``: what a node needs around the listener to run it as a
systemd service, from the installed package alone (issue 20 item 2).

It makes the service's user and group (a system user whose home is the work dir, in the
``docker`` group when there is one), the work, config and log dirs with their owners and
modes, the systemd unit (the package's ``contrib/fem-ansible.service`` with this install's
paths) and a logrotate snippet that rotates the listener's log and the audit log and then
sends SIGHUP (which makes the listener reopen them).  Each step looks first and changes only
what differs, so running it again is harmless; with ``dry_run`` it only says what it would do.
It does not start the service: enabling a service is the sysadmin's decision.
"""

from __future__ import annotations

import dataclasses
import difflib
import grp
import os
import pwd
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError
from .runner import data_dir

UNIT_NAME = "fem-ansible.service"
# The paths the template (contrib/fem-ansible.service) is written for.
_TEMPLATE_PATHS = {
    "exec": "/opt/fem-ansible/bin/fem-ansible",
    "config": "/etc/fem-ansible/config.yml",
    "work_dir": "/var/lib/fem-ansible",
    "log_dir": "/var/log/fem-ansible",
}
ENGINE_GROUP = "docker"
# What useradd accepts by default (Debian's NAME_REGEX, less the trailing '$' of machine
# accounts): the names go into the unit file and the logrotate snippet as they are.
_ACCOUNT_NAME = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
# Paths go there too: a line break or a blank would start another directive.
_PATH_TEXT = re.compile(r"/[A-Za-z0-9_./+@-]*")


@dataclass(frozen=True)
class ServiceLayout:
    """Where the service's parts go; every default is what docs/getting-started.md uses."""

    user: str = "fem"
    group: str = "fem"
    work_dir: Path = Path("/var/lib/fem-ansible")
    config_dir: Path = Path("/etc/fem-ansible")
    log_dir: Path = Path("/var/log/fem-ansible")
    unit_dir: Path = Path("/etc/systemd/system")
    logrotate_dir: Path = Path("/etc/logrotate.d")
    # the installed command; default: the one beside this interpreter (the venv's)
    exec_path: Path = dataclasses.field(
        default_factory=lambda: Path(sys.prefix) / "bin" / "fem-ansible")

    def __post_init__(self) -> None:
        """Names and paths are written into the unit and the snippet as text: refused here
        unless they are plain, so no value can add a directive to either."""
        for what in ("user", "group"):
            if not _ACCOUNT_NAME.fullmatch(getattr(self, what)):
                raise ConfigError(f"--{what}: {getattr(self, what)!r} is not an account name "
                                  f"({_ACCOUNT_NAME.pattern})")
        for what in ("work_dir", "config_dir", "log_dir", "unit_dir", "logrotate_dir",
                     "exec_path"):
            if not _PATH_TEXT.fullmatch(str(getattr(self, what))):
                raise ConfigError(f"--{what.replace('_', '-')}: {str(getattr(self, what))!r} "
                                  "is not an absolute path of letters, digits and ._/+@-")

    @property
    def config(self) -> Path:
        return self.config_dir / "config.yml"

    @property
    def log_file(self) -> Path:
        return self.log_dir / "listener.log"

    @property
    def audit_file(self) -> Path:
        """The config's default ``audit.file`` (``<work_dir>/audit.jsonl``)."""
        return self.work_dir / "audit.jsonl"


def unit_text(layout: ServiceLayout, engine_group: bool) -> str:
    """The unit: the package's template with this layout's paths, user and group.

    The template's ``StateDirectory=``/``LogsDirectory=``/``ConfigurationDirectory=`` name
    the default dirs under /var/lib, /var/log and /etc; with other dirs they would make
    empty ones there, so they are left out (this command made the real ones).
    """
    text = (data_dir() / "contrib" / UNIT_NAME).read_text(encoding="utf-8")
    ours = {"exec": layout.exec_path, "config": layout.config, "work_dir": layout.work_dir,
            "log_dir": layout.log_dir}
    for name, template_path in _TEMPLATE_PATHS.items():
        text = text.replace(template_path, str(ours[name]))
    text = re.sub(r"(?m)^User=.*$", f"User={layout.user}", text)
    text = re.sub(r"(?m)^Group=.*$", f"Group={layout.group}", text)
    if not engine_group:
        text = re.sub(rf"(?m)^SupplementaryGroups={ENGINE_GROUP}\n", "", text)
    for key, mine, default in (
            ("StateDirectory", layout.work_dir, _TEMPLATE_PATHS["work_dir"]),
            ("LogsDirectory", layout.log_dir, _TEMPLATE_PATHS["log_dir"]),
            ("ConfigurationDirectory", layout.config_dir, "/etc/fem-ansible")):
        if str(mine) != default:
            text = re.sub(rf"(?m)^{key}(Mode)?=.*\n", "", text)
    return f"# written by `fem-ansible install-service`; edits are overwritten by it\n{text}"


def logrotate_text(layout: ServiceLayout) -> str:
    """Weekly rotation of the listener's log and the audit log, kept a year; SIGHUP makes
    the listener reopen both at once, and without it (no systemd) both follow the rename
    at their next line (docs/operating.md).  ``su``: the dirs belong to the service
    user, and logrotate refuses to work in a dir writable by another user without it."""
    return (
        "# written by `fem-ansible install-service`; edits are overwritten by it\n"
        f"{layout.log_dir}/*.log {layout.audit_file} {{\n"
        f"    su {layout.user} {layout.group}\n"
        "    weekly\n"
        "    rotate 52\n"
        "    compress\n"
        "    delaycompress\n"
        "    missingok\n"
        "    notifempty\n"
        f"    create 0600 {layout.user} {layout.group}\n"
        "    sharedscripts\n"
        "    postrotate\n"
        f"        systemctl kill --signal=HUP --kill-whom=main {UNIT_NAME} >/dev/null 2>&1"
        " || true\n"
        "    endscript\n"
        "}\n"
    )


def _exists(lookup: Callable[[str], object], name: str) -> bool:
    try:
        lookup(name)
    except KeyError:
        return False
    return True


class _Steps:
    """Records and (unless dry) carries out each change; ``done`` lists what was changed."""

    def __init__(self, dry_run: bool, echo: Callable[[str], None]):
        self.dry_run, self.echo = dry_run, echo
        self.done: list[str] = []

    def change(self, what: str, action: Callable[[], object]) -> None:
        self.echo(("would " if self.dry_run else "") + what)
        self.done.append(what)
        if not self.dry_run:
            action()

    def run(self, what: str, argv: list[str]) -> None:
        self.change(what, lambda: subprocess.run(argv, check=True, capture_output=True))


def _dir(steps: _Steps, path: Path, owner: str, group: str, mode: int) -> None:
    def own() -> None:
        os.chown(path, pwd.getpwnam(owner).pw_uid, grp.getgrnam(group).gr_gid)

    def make() -> None:
        path.mkdir(parents=True, mode=0o700)
        own()
        os.chmod(path, mode)

    if not path.is_dir():
        steps.change(f"create {path} ({owner}:{group}, {mode:04o})", make)
        return
    st = path.stat()
    if (st.st_uid, st.st_gid) != (_uid(owner), _gid(group)):
        steps.change(f"chown {owner}:{group} {path}", own)
    if st.st_mode & 0o7777 != mode:
        steps.change(f"chmod {mode:04o} {path}", lambda: os.chmod(path, mode))


def _uid(user: str) -> int:
    return pwd.getpwnam(user).pw_uid if _exists(pwd.getpwnam, user) else -1


def _gid(group: str) -> int:
    return grp.getgrnam(group).gr_gid if _exists(grp.getgrnam, group) else -1


def _file(steps: _Steps, path: Path, text: str) -> None:
    old = path.read_text(encoding="utf-8") if path.is_file() else None
    if old == text:
        return

    def write() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)

    steps.change(f"{'update' if path.exists() else 'write'} {path}", write)
    if steps.dry_run:  # what it would write: the whole file, or how it would change
        lines = (text.splitlines() if old is None else list(difflib.unified_diff(
            old.splitlines(), text.splitlines(), str(path), f"{path} (new)", lineterm="")))
        for line in lines:
            steps.echo(f"    {line}")


def install_service(layout: ServiceLayout, *, dry_run: bool = False,
                    echo: Callable[[str], None] = print) -> list[str]:
    """Make what the service needs (module docstring); return the changes made (or, with
    ``dry_run``, that would be made), empty when everything was there already.

    :raises subprocess.CalledProcessError: when groupadd, useradd or usermod fails.
    :raises OSError: when a dir or file cannot be made (not root, typically).
    """
    steps = _Steps(dry_run, echo)
    engine_group = _exists(grp.getgrnam, ENGINE_GROUP)
    if not _exists(grp.getgrnam, layout.group):
        steps.run(f"add system group {layout.group}", ["groupadd", "--system", layout.group])
    if not _exists(pwd.getpwnam, layout.user):
        steps.run(f"add system user {layout.user} (home {layout.work_dir}"
                  + (f", in group {ENGINE_GROUP})" if engine_group else ")"),
                  ["useradd", "--system", "--gid", layout.group, "--home-dir",
                   str(layout.work_dir), "--no-create-home", "--shell", "/usr/sbin/nologin",
                   *(["--groups", ENGINE_GROUP] if engine_group else []), layout.user])
    elif engine_group and layout.user not in grp.getgrnam(ENGINE_GROUP).gr_mem and \
            pwd.getpwnam(layout.user).pw_gid != grp.getgrnam(ENGINE_GROUP).gr_gid:
        steps.run(f"add user {layout.user} to group {ENGINE_GROUP}",
                  ["usermod", "--append", "--groups", ENGINE_GROUP, layout.user])
    # work dir: the journal, audit log and runs, the user's alone (as the unit's
    # StateDirectoryMode); config: root's, readable by the group (it may hold the broker's
    # password); logs: the user's, readable by the group
    _dir(steps, layout.work_dir, layout.user, layout.group, 0o700)
    _dir(steps, layout.config_dir, "root", layout.group, 0o750)
    _dir(steps, layout.log_dir, layout.user, layout.group, 0o750)
    _file(steps, layout.unit_dir / UNIT_NAME, unit_text(layout, engine_group))
    _file(steps, layout.logrotate_dir / "fem-ansible", logrotate_text(layout))
    return steps.done
