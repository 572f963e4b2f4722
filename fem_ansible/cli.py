"""The ``fem-ansible`` command line: parse, call the library, map errors to exit codes.

Exit codes (DESIGN.md §8): 0 COMPLETED or valid, 1 FAILED/TIMED_OUT/CANCELLED, 2 usage or
config error, 3 REJECTED or invalid.  This module is the only place that decides them.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from . import __version__
from .config import CONFIG_ENV, DEFAULT_CONFIG_PATH, ENV_PREFIX, Config, load_config
from .errors import ConfigError, RejectedError
from .logs import setup_logging, task_context

if TYPE_CHECKING:
    from .intake import Intake, Task

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_REJECTED = 0, 1, 2, 3
STATE_EXIT = {"COMPLETED": EXIT_OK, "FAILED": EXIT_FAILED, "TIMED_OUT": EXIT_FAILED,
              "CANCELLED": EXIT_FAILED, "REJECTED": EXIT_REJECTED}

config_option = click.option(
    "--config", "config_path", type=click.Path(dir_okay=False), default=DEFAULT_CONFIG_PATH,
    show_default=True, envvar=CONFIG_ENV, show_envvar=True,
    help="The site config file.",
)
log_format_option = click.option(
    "--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
    help="Log lines for a terminal (text) or a log pipeline (json).",
)


@contextlib.contextmanager
def _config_errors() -> Iterator[None]:
    """A config problem, in the file or found when the service starts (the inventory, the
    collections), is a message and exit code 2, not a traceback."""
    try:
        yield
    except ConfigError as e:
        click.echo(f"fem-ansible: config error: {e}", err=True)
        sys.exit(EXIT_USAGE)


def _config(path: str, *, scrub: bool = False) -> Config:
    with _config_errors():
        return load_config(path, scrub_environ=scrub)


def _read_file(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        click.echo(f"fem-ansible: cannot read {path}: {e.strerror}", err=True)
        sys.exit(EXIT_USAGE)


def _print_event(event: dict[str, Any]) -> None:
    from .display import format_event

    click.echo(format_event(event))


class _Commands(click.Group):
    """Every command: a file the user may not read or write, or that is not there, is one
    line saying which and what to do, never a traceback (issue 20)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except OSError as e:
            if e.filename is None or e.strerror is None:
                raise
            click.echo(f"fem-ansible: {e.filename}: {e.strerror} — {_os_error_fix(e)}",
                       err=True)
            sys.exit(EXIT_USAGE)


def _os_error_fix(e: OSError) -> str:
    if isinstance(e, PermissionError):
        return ("run it as the service's user (sudo -u fem fem-ansible …), or give that "
                "user the path: `fem-ansible install-service` makes the work, config and "
                "log dirs with the owners the service needs")
    if isinstance(e, FileNotFoundError):
        return "create it, or correct the path (in the config, or on the command line)"
    return "correct the path or its file system, then try again"


@click.group(cls=_Commands)
@click.version_option(__version__, prog_name="fem-ansible")
def main() -> None:
    """fem-ansible: runs Federated Execution Manager tasks next to this site's data.

    The config file is --config, or $FEM_ANSIBLE_CONFIG; any config key can be overridden by
    FEM_ANSIBLE_ + its path in upper case joined by __ (FEM_ANSIBLE_BROKER__URL).
    """


@main.command()
@config_option
@log_format_option
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=None,
              help="Serve Prometheus metrics on this port (/metrics).")
@click.option("--metrics-address", default="127.0.0.1", show_default=True,
              help="Address the metrics port listens on (0.0.0.0: every interface).")
@click.option("--log-file", type=click.Path(dir_okay=False), default=None,
              help="Append the log to this file instead of stderr (reopened on SIGHUP).")
def listen(config_path: str, log_format: str, metrics_port: int | None,
           metrics_address: str, log_file: str | None) -> None:
    """Run the service: consume this node's tasks from the broker.

    SIGTERM: stop taking tasks and let running ones finish.  SIGHUP: reopen the log and
    audit files, read the inventory again.
    """
    setup_logging(log_format, path=log_file)
    config = _config(config_path, scrub=True)
    from .legacy import adapters
    from .listener import Listener

    with _config_errors():
        if metrics_port is None:
            Listener(config, adapters=adapters(config)).run()
            return
        from .metrics import Metrics

        metrics = Metrics(config)
        listener = Listener(config, observer=metrics, adapters=adapters(config))
        metrics.watch(listener)
        try:
            metrics.serve(metrics_port, metrics_address)
        except OSError as e:
            click.echo(f"fem-ansible: cannot serve metrics on {metrics_address}:{metrics_port}: "
                       f"{e.strerror}", err=True)
            sys.exit(EXIT_USAGE)
        listener.run()


@main.command()
@config_option
@log_format_option
@click.argument("task_file", type=click.Path(dir_okay=False))
def run(config_path: str, log_format: str, task_file: str) -> None:
    """Run one task (fem.task/v1 JSON) here without a broker, printing its events."""
    setup_logging(log_format, level="WARNING")
    config = _config(config_path, scrub=True)
    _not_as_root_in(config.work_dir)
    body = _read_file(task_file)
    from .display import Progress, format_event
    from .journal import Journal
    from .lifecycle import Node

    journal = Journal(config.work_dir / "journal.sqlite")
    # On a terminal a live status line (stage, time, upload); elsewhere plain event lines.
    progress = Progress(sys.stdout).start() if sys.stdout.isatty() else None
    echo = progress.echo if progress else click.echo

    def show() -> None:
        for event_id, event in journal.unpublished():
            echo(format_event(event))
            journal.mark_published(event_id)

    with _config_errors():
        node = Node(config, journal, notify=show, observer=progress)
    try:
        task = node.read(body, None, signed=False)
    except RejectedError as e:
        node.reject(e)
        sys.exit(EXIT_REJECTED)
    _event, existing = node.accept(task)
    if existing is not None and existing.terminal:
        click.echo(f"task {task.task_id} already ran here: {existing.state}", err=True)
        sys.exit(STATE_EXIT[existing.state])
    try:
        with task_context(task.task_id):
            final = node.execute(task.task_id)
    finally:
        if progress:
            progress.stop()
    sys.exit(STATE_EXIT.get(final.get("state", "FAILED"), EXIT_FAILED))


def _not_as_root_in(work_dir: Path) -> None:
    """``run`` as root in a work dir that is another user's (the service's) would leave
    files there that the service cannot change (journal, run dirs): refused, with the
    command to use instead (issue 31)."""
    import os
    import pwd

    try:
        owner = work_dir.stat().st_uid
    except FileNotFoundError:
        return
    if os.geteuid() != 0 or owner == 0:
        return
    try:
        user = pwd.getpwuid(owner).pw_name
    except KeyError:
        user = str(owner)
    click.echo(f"fem-ansible: not as root: {work_dir} is {user}'s, and root would leave files "
               f"there that {user} cannot change — run it as that user: "
               f"runuser -u {user} -- fem-ansible run …", err=True)
    sys.exit(EXIT_USAGE)


@contextlib.contextmanager
def _local_intake(config: Config) -> Iterator[Intake]:
    """The intake ``listen`` uses, for a file on this machine (``validate``, ``submit``):
    the same schema, policy, inventory and executor roles; no signature (the file is the
    sysadmin's own) and nothing written to the work dir."""
    import tempfile

    from .intake import Intake
    from .runner import collections_view
    from .signatures import Verifier
    from .targets import Targets

    with _config_errors(), tempfile.TemporaryDirectory(prefix="fem-intake-") as tmp:
        collections = collections_view(Path(tmp), tuple(config.execution.collections))
        yield Intake(config, Targets(config, collections), verifier=Verifier("none"))


def _check_file(config: Config, body: bytes) -> Task:
    """``body`` through :func:`_local_intake`; its problems are printed, a heading per
    error code and one reason a line, and exit 3."""
    with _local_intake(config) as intake:
        problems = intake.problems(body)
        if not problems:
            return intake.read(body, None, signed=False)
        for e in problems:
            click.echo(f"invalid ({e.code}):")
            for reason in e.reasons:
                click.echo(f"  {reason}")
        sys.exit(EXIT_REJECTED)


@main.command()
@config_option
@click.argument("task_file", type=click.Path(dir_okay=False))
def validate(config_path: str, task_file: str) -> None:
    """Check a task as `listen` would: schema, node, site policy, inventory target and
    executor role (no signature); every problem is listed."""
    config = _config(config_path)
    task = _check_file(config, _read_file(task_file))
    click.echo(f"valid: task {task.task_id} may run on node {config.node_id} "
               f"(target {task.target}, executor {task.executor})")


@main.command()
@config_option
def doctor(config_path: str) -> None:
    """Check that this node is ready to take tasks; one line per check, ✓ ! or ✗."""
    try:
        config = load_config(config_path)
    except ConfigError as e:
        # an override's error starts with its variable's name: the file is not to blame
        variable = str(e).split(":", 1)[0]
        fix = (f"correct or unset {variable} in this environment (the service's: its unit's "
               "Environment=)" if variable.startswith(ENV_PREFIX)
               else f"correct {config_path} (docs/configuration.md)")
        click.echo(f"✗ config: {e} — {fix}")
        sys.exit(EXIT_USAGE)
    click.echo(f"✓ config: {config_path}, node {config.node_id}, listener {config.listener_id}")
    from .doctor import diagnose

    failed = False
    for check in diagnose(config):
        click.echo(check.line())
        failed = failed or check.status == "fail"
    sys.exit(EXIT_FAILED if failed else EXIT_OK)


@main.command()
@click.option("--node-id", required=True, help="This node's id (routing key of its queues).")
@click.option("--dir", "directory", type=click.Path(file_okay=False), default="/etc/fem-ansible",
              show_default=True, help="Where to write config.yml and inventory.yml.")
@click.option("--broker-url", default=None, help="The broker's AMQP URL.")
@click.option("--work-dir", default=None, help="execution.work_dir (default /var/lib/fem-ansible).")
@click.option("--legacy", is_flag=True,
              help="Also serve the original FEM-client protocol, with a commented tool "
                   "catalogue to fill in (docs/legacy.md).")
def init(node_id: str, directory: str, broker_url: str | None, work_dir: str | None,
         legacy: bool) -> None:
    """Write a starter config (every key, commented) and inventory for this site."""
    from .init import init_site

    try:
        written = init_site(Path(directory), node_id, broker_url, work_dir, legacy=legacy)
    except ConfigError as e:
        click.echo(f"fem-ansible: {e}", err=True)
        sys.exit(EXIT_USAGE)
    for path in written:
        click.echo(f"wrote {path}")
    click.echo(f"next: edit the policy in {written[0]}, then: fem-ansible doctor --config "
               f"{written[0]}")


@main.command()
def schema() -> None:
    """Print the JSON Schemas of every message, keyed by schema id."""
    from .schema import SCHEMAS

    click.echo(json.dumps(SCHEMAS, indent=2))


@main.command()
@config_option
@click.argument("task_file", type=click.Path(dir_okay=False))
@click.option("--wait/--no-wait", default=False, help="Follow the task's events to its end.")
@click.option("--timeout", type=float, default=3600, show_default=True,
              help="Seconds to wait for the terminal event.")
@click.option("--sign-key", type=click.Path(dir_okay=False), default=None,
              help="HMAC key file to sign with (default: the config's, in hmac mode).")
@click.option("--check/--no-check", default=True, show_default=True,
              help="Check the task as `validate` does first, and publish only a valid one "
                   "(--no-check: publish anything, e.g. to see the listener refuse it).")
def submit(config_path: str, task_file: str, wait: bool, timeout: float,
           sign_key: str | None, check: bool) -> None:
    """Publish a task as an orchestrator would, and optionally follow its events."""
    config = _config(config_path)
    body = _read_file(task_file)
    from .orchestrator import submit_task
    from .schema import parse_json, task_id_of

    if check:
        task_id: str | None = _check_file(config, body).task_id
    else:
        try:
            task_id = task_id_of(parse_json(body, len(body)))
        except RejectedError:
            task_id = None
    final = submit_task(
        config, body, task_id, wait=wait, timeout=timeout, sign_key=sign_key,
        on_event=_print_event,
        on_no_consumer=lambda queue: click.echo(
            f"fem-ansible: no listener consumes {queue} now (none runs for node "
            f"{config.node_id}, or every slot is busy); the task waits there, and so does "
            f"this command (--timeout {timeout:g}s)", err=True))
    if not wait:
        click.echo(f"published task {task_id}")
        return
    if final is None:
        click.echo("no terminal event before the timeout", err=True)
        sys.exit(EXIT_FAILED)
    sys.exit(STATE_EXIT[final["state"]])


@main.command()
@config_option
@click.argument("task_id")
def cancel(config_path: str, task_id: str) -> None:
    """Ask every listener of this node to cancel a task.

    Exits 1 when this node's journal has no such task (a typo?) or it has ended already.
    """
    config = _config(config_path)
    from .journal import Journal
    from .orchestrator import send_cancel

    journal_path = config.work_dir / "journal.sqlite"
    rec = Journal(journal_path).get(task_id) if journal_path.is_file() else None
    if rec is not None and rec.terminal:
        click.echo(f"fem-ansible: task {task_id} has ended already ({rec.state}); nothing to "
                   "cancel", err=True)
        sys.exit(EXIT_FAILED)
    send_cancel(config, task_id)
    if rec is None:
        # Still sent: another listener of this node may have it, or it may arrive later
        # (a recorded cancel stops it from starting).
        click.echo(f"fem-ansible: no task {task_id} in this node's journal ({journal_path}): "
                   "check the id with `fem-ansible tasks`; the cancel was sent all the same, "
                   "for a listener elsewhere or a task yet to arrive", err=True)
        sys.exit(EXIT_FAILED)
    click.echo(f"cancel sent for {task_id}")


@main.command()
@config_option
@click.argument("task_id", required=False)
@click.option("--limit", type=int, default=30, show_default=True, help="How many tasks.")
@click.option("--json", "as_json", is_flag=True,
              help="JSON for scripts: a list of tasks, or one task with its events.")
def tasks(config_path: str, task_id: str | None, limit: int, as_json: bool) -> None:
    """The journal: recent tasks, or one task's events, stage times and logs."""
    config = _config(config_path)
    from .display import rejection_detail, task_detail, task_summary, task_table
    from .journal import Journal

    journal = Journal(config.work_dir / "journal.sqlite")
    if task_id:
        rec = journal.get(task_id, with_events=True)
        rejected = journal.rejections(task_id)
        if rec is None and not rejected:
            click.echo(f"no task {task_id} in the journal", err=True)
            sys.exit(EXIT_FAILED)
        if as_json:
            # The task when one was accepted, else its newest rejection; every rejection of
            # the id under "rejections".
            summary = task_summary(rec or rejected[-1], with_events=rec is not None)
            if rejected:
                summary["rejections"] = [task_summary(r) for r in rejected]
            click.echo(json.dumps(summary, indent=2))
            return
        if rec is None:
            lines = [f"task {task_id}: REJECTED", *rejection_detail(rejected)]
        else:
            from .logs import listener_log_files

            lines = (task_detail(rec, config, listener_log_files(config_path))
                     + rejection_detail(rejected))
    elif as_json:
        click.echo(json.dumps([task_summary(r) for r in journal.recent(limit)], indent=2))
        return
    else:
        recent = journal.recent(limit)
        lines = task_table(recent, errors=journal.errors(
            [r.task_id for r in recent if r.finished_at and not r.rejection]))
    for line in lines:
        click.echo(line)


@main.command("install-service")
@click.option("--user", default="fem", show_default=True, help="The service's system user.")
@click.option("--group", default=None, help="Its group (default: named as the user).")
@click.option("--work-dir", type=click.Path(file_okay=False), default="/var/lib/fem-ansible",
              show_default=True, help="execution.work_dir, the user's home.")
@click.option("--config-dir", type=click.Path(file_okay=False), default="/etc/fem-ansible",
              show_default=True, help="Where `init` writes config.yml.")
@click.option("--log-dir", type=click.Path(file_okay=False), default="/var/log/fem-ansible",
              show_default=True, help="The listener's log file's dir.")
@click.option("--unit-dir", type=click.Path(file_okay=False), default="/etc/systemd/system",
              show_default=True, help="Where the systemd unit goes.")
@click.option("--logrotate-dir", type=click.Path(file_okay=False),
              default="/etc/logrotate.d", show_default=True,
              help="Where the logrotate snippet goes.")
@click.option("--exec", "exec_path", type=click.Path(dir_okay=False), default=None,
              help="The fem-ansible command the unit starts (default: this one's venv).")
@click.option("--dry-run", is_flag=True, help="Only print what would be done.")
def install_service(user: str, group: str | None, work_dir: str, config_dir: str,
                    log_dir: str, unit_dir: str, logrotate_dir: str, exec_path: str | None,
                    dry_run: bool) -> None:
    """Make the service's user, dirs, systemd unit and logrotate snippet (as root).

    Idempotent: changes only what differs, and says what it changed.  It does not start the
    service: `systemctl daemon-reload && systemctl enable --now fem-ansible` does.
    """
    import subprocess

    from .service import ServiceLayout, install_service

    paths = {"work_dir": work_dir, "config_dir": config_dir, "log_dir": log_dir,
             "unit_dir": unit_dir, "logrotate_dir": logrotate_dir}
    try:
        layout = ServiceLayout(user=user, group=group or user,
                               **{k: Path(v).absolute() for k, v in paths.items()},
                               **({"exec_path": Path(exec_path).absolute()} if exec_path else {}))
    except ConfigError as e:
        click.echo(f"fem-ansible: {e}", err=True)
        sys.exit(EXIT_USAGE)
    try:
        changed = install_service(layout, dry_run=dry_run, echo=click.echo)
    except subprocess.CalledProcessError as e:
        click.echo(f"fem-ansible: {e.cmd[0]} failed: {e.stderr.decode(errors='replace').strip()}"
                   " — run install-service as root", err=True)
        sys.exit(EXIT_FAILED)
    if not changed:
        click.echo("nothing to do: user, dirs, unit and logrotate snippet are as they should be")
    elif not dry_run:
        click.echo("next: fem-ansible init --node-id NODE_ID --dir " + str(layout.config_dir)
                   + " …, then "
                   "systemctl daemon-reload && systemctl enable --now fem-ansible")
