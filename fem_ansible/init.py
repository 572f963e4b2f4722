"""``fem-ansible init``: a starter config and inventory for a new site.

The config is the example config (every key, commented, from the config model) with the
node id, the inventory and what the sysadmin passed filled in, so a site starts from a file
that documents itself.  Existing files are never overwritten: a sysadmin's config is
precious and ``init`` may be run by mistake on a configured node.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .config import parse_config
from .docgen import example_config
from .errors import ConfigError

INVENTORY = """\
# fem-ansible inventory: the hosts tasks may run on (docs/customising.md).
# A task names a host or group here in `target` (allowed by policy.targets.allow);
# execution.target is the default.
all:
  hosts:
    localhost:
      ansible_connection: local
      # the listener's own Python (its venv has the Docker SDK the modules need)
      ansible_python_interpreter: "{{ ansible_playbook_python }}"
  # children:
  #   gpu:
  #     hosts:
  #       gpu1:
  #         ansible_host: 10.0.0.7
  #         ansible_user: fem
"""


# Written by ``init --legacy`` in place of the config's generic commented ``legacy.tools``
# entry: the site's tool catalogue, commented, one entry per json_launcher.json entry.
LEGACY_CATALOGUE = """\
  # The site's tool catalogue: one entry per entry of the original client's
  # json_launcher.json (docs/legacy.md, "Mapping a json_launcher.json"). A submit_run of a
  # tool not listed here is refused. Uncomment, then name images policy.images allows.
  # tools:
  #   # Kaapana's fem-adapter; the message's task_info.command becomes the argv words.
  #   kaapana-fem-adapter:
  #     image: registry.example.org/kaapana/fem-adapter:1.0
  #     command: ["%%TASK_COMMAND%%"]
  #     # the token only ever as an env value: passed as a secret, never in argv or logs
  #     env: {FEM_TOKEN: "%%token%%", EXECUTION_ID: "%%execution_id%%"}
  #     mounts:
  #       - {source: sandbox, mount: /sandbox}     # <sandbox_path>/<user>/<execution>/
  #   # DataTools4Heart flcore: a sandbox sub-directory, the site's certificates read-only,
  #   # its SSL variables; its ports need a network the policy allows (policy.networks).
  #   flcore-client:
  #     image: registry.example.org/dt4h/flcore:1.0
  #     command: ["python", "client.py", "--node", "%%node_name%%",
  #               "--sandbox", "%%sandbox_fem%%"]
  #     env: {FLOWER_SSL_CACERT: /certs/rootCA_cert.pem}
  #     mounts:
  #       - {source: sandbox/flcore, mount: /sandbox}
  #       - {source: /etc/fem-ansible/rabbitmq-certificates, mount: /certs}
  #     network: host
  #     memory: 2Gi
  #   # health-check is built in (as a tool and as an action): no entry needed.
"""


def init_site(directory: Path, node_id: str, broker_url: str | None = None,
              work_dir: str | None = None, legacy: bool = False) -> list[Path]:
    """Write ``config.yml`` and ``inventory.yml`` into ``directory``.

    :param legacy: also serve the original FEM-client protocol: ``legacy.enabled`` and a
        sandbox path set, and a commented tool catalogue to fill in.

    :returns: the files written.
    :raises ConfigError: when either file exists already, or when the config would not be
        valid (a bad node id or broker URL): nothing is written then, so a corrected
        ``init`` finds no half-made config in its way.
    """
    config_path, inventory_path = directory / "config.yml", directory / "inventory.yml"
    existing = [str(p) for p in (config_path, inventory_path) if p.exists()]
    if existing:
        raise ConfigError(f"{' and '.join(existing)} exist already; init overwrites nothing")
    values = {"execution.inventory": json.dumps(str(inventory_path.resolve()))}
    if broker_url:
        values["broker.url"] = json.dumps(broker_url)
    if work_dir:
        values["execution.work_dir"] = json.dumps(work_dir)
    if legacy:
        values["legacy.enabled"] = "true"
        values["legacy.sandbox_path"] = json.dumps(
            str(Path(work_dir or "/var/lib/fem-ansible") / "sandbox"))
    text = example_config(node_id=node_id, values=values,
                          blocks={"legacy.tools": LEGACY_CATALOGUE} if legacy else None)
    parse_config(text, config_path, environ={})
    directory.mkdir(parents=True, exist_ok=True)
    # the config may come to hold a broker password: readable by its owner only
    for path, content, mode in ((config_path, text, 0o600), (inventory_path, INVENTORY, 0o644)):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(content)
    return [config_path, inventory_path]
