"""What a worker group says when it starts: what it restored, and a changed dataset or a corrupt
checkpoint as loud warnings (a changed world size is the driver's to report: test_faults)."""

from elastune.batch_plan import batch_plan
from elastune.events import to_json
from elastune.train.loop import announce
from elastune.train.progress import describe_event


def collect(restored, dataset, world=3):
    return announce(batch_plan(24, 4, world), restored, dataset)


DATA = {"count": 100, "content_hash": "abc"}


def test_fresh_start_is_just_a_start():
    assert [e.kind for e in collect({"resumed_from_step": None}, DATA)] == ["start"]


def test_resume_at_another_world_size_says_what_was_loaded():
    events = collect(
        {
            "resumed_from_step": 20,
            "resumed_samples_seen": 480,
            "saved_world_size": 2,
            "dataset": DATA,
            "load_seconds": 0.5,
            "load_bytes": 2_000_000,
        },
        DATA,
    )
    assert [e.kind for e in events] == ["start"]
    assert describe_event(events[0]).endswith("checkpoint saved by 2 worker(s), 2.00 MB loaded in 0.50 s.")
    assert events[0].saved_world_size == 2 and events[0].micro_batches == (2, 2, 2)  # what the driver's resize rule reads
    assert "dataset" not in to_json(events[0])


def test_changed_dataset_is_a_loud_warning():
    events = collect(
        {"resumed_from_step": 20, "resumed_samples_seen": 480, "saved_world_size": 3, "dataset": DATA},
        {"count": 90, "content_hash": "def"},
    )
    assert [e.kind for e in events] == ["start", "warning"]
    assert "dataset changed since the checkpoint" in describe_event(events[1])


def test_corrupt_checkpoints_passed_over_are_reported():
    events = collect(
        {
            "resumed_from_step": 10,
            "resumed_samples_seen": 240,
            "saved_world_size": 3,
            "dataset": DATA,
            "load_seconds": 0.1,
            "load_bytes": 10,
            "skipped_checkpoints": ["step 20: checksum mismatch"],
        },
        DATA,
    )
    assert [e.kind for e in events] == ["start", "warning"]
    assert describe_event(events[1]).endswith("CHECKPOINT CORRUPT, used an older one: step 20: checksum mismatch")
