"""What Ray's raylets push to a driver (a dead worker's or raylet's last words, worker-pool size
warnings) stays out of Elastune's console unless --verbose; the driver's own workers' logs
(--verbose) still print. Checked on Ray's own printing function, the one its listener calls."""

from __future__ import annotations

import ray._private.worker as ray_worker

from elastune.cluster import log_cluster_messages


def test_raylet_messages_go_to_the_log_and_worker_logs_still_print(capsys, monkeypatch, caplog):
    monkeypatch.setattr(ray_worker, "print_to_stdstream", ray_worker.print_to_stdstream)  # restored after the test
    log_cluster_messages()
    log_cluster_messages()  # idempotent: one wrapper, however often a process connects
    caplog.set_level("INFO", logger="elastune.cluster")
    ray_worker.print_to_stdstream(
        {"lines": ["\x1b[33m12 PYTHON worker processes have been started\x1b[0m"], "pid": "raylet", "is_err": False}, False
    )
    ray_worker.print_to_stdstream(
        {
            "lines": ["a worker's own line"],
            "pid": 1234,
            "ip": "127.0.0.1",
            "is_err": False,
            "task_name": "w",
            "actor_name": "",
            "job": "01000000",
        },
        True,
    )
    out = capsys.readouterr()
    assert "PYTHON worker processes" not in out.out + out.err and "a worker's own line" in out.out + out.err
    assert "PYTHON worker processes have been started" in caplog.text
