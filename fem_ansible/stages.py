"""The stages of a task, named once for the listener, its verdict and what it shows.

The task playbook (playbooks/task.yml) enters each stage with a marker task whose
``fem_stage`` is one of these values (docs/roles.md, "Stages"); the playbook is YAML and
writes them as literals, and tests/test_verdict.py holds its markers to exactly this list.
"""

from __future__ import annotations

from enum import StrEnum


class Stage(StrEnum):
    """A stage a marker may name, in the order the task playbook enters them: ``done`` once
    the last stage ended well, ``cleanup`` in ``always``.  A ``str``, so that the values go
    into the journal, events, tags and metric labels as they are."""

    STAGE_IN = "stage_in"
    RUN = "run"
    STAGE_OUT = "stage_out"
    DONE = "done"
    CLEANUP = "cleanup"


# The stage a task works in while in each state of DESIGN.md §4 that has one.
STATE_STAGE: dict[str, Stage] = {
    "STAGING_IN": Stage.STAGE_IN, "RUNNING": Stage.RUN, "STAGING_OUT": Stage.STAGE_OUT,
}
