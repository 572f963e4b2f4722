"""What the command line shows: stage times from event timestamps, the progress line."""

from __future__ import annotations

import io

from fem_ansible.display import Progress, duration, stage_timings


def ev(state: str, ts: str, seq: int = 0) -> dict:
    return {"state": state, "ts": f"2026-01-01T10:{ts}Z", "seq": seq}


def test_stage_timings_sum_attempts_and_skip_progress_events():
    events = [ev("RECEIVED", "00:00"), ev("STAGING_IN", "00:02"), ev("RUNNING", "00:10"),
              ev("RUNNING", "00:30"),  # a progress event: same state
              # the listener died while running; attempt 2 goes on from the run stage
              ev("RUNNING", "01:00"), ev("STAGING_OUT", "02:00"), ev("COMPLETED", "02:05")]
    assert stage_timings(events) == {"waiting": 2.0, "stage_in": 8.0, "run": 110.0,
                                     "stage_out": 5.0}


def test_duration_reads_like_a_clock():
    assert (duration(5), duration(65.4), duration(3725)) == ("0:05", "1:05", "1:02:05")


def test_progress_line_shows_state_and_upload():
    out = io.StringIO()
    progress = Progress(out)
    progress.on_event({"state": "STAGING_OUT"})
    progress.on_upload("t1", "outputs", 512 * 1024, 2 * 1024 * 1024)
    assert progress.status().startswith("STAGING_OUT")
    assert "uploading outputs 512.0 KiB of 2.0 MiB (25%)" in progress.status()
    progress.echo("  4 STAGING_OUT archiving outputs and logs")
    progress.on_event({"state": "COMPLETED"})  # a new state: the upload is done
    assert "uploading" not in progress.status()
    progress.stop()
    assert "  4 STAGING_OUT archiving outputs and logs\n" in out.getvalue()
    assert out.getvalue().endswith("\r\x1b[K")  # the status line is wiped at the end
