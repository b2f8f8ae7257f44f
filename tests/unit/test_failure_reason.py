from ray.train import WorkerGroupError

from elastune.errors import CheckpointError, SpecError
from elastune.train.outcome import failure_reason


def test_our_error_inside_a_worker_group_error_is_what_the_user_sees():
    inner = CheckpointError("ckpt step 3 was saved from a different model; run with --fresh")
    outer = WorkerGroupError("Training failed due to worker errors", {0: inner, 1: RuntimeError("peer gone")})
    assert failure_reason(outer) == inner.message


def test_foreign_errors_keep_their_type_and_text():
    assert failure_reason(RuntimeError("boom")) == "RuntimeError: boom"


def test_errors_pickle_across_processes():
    import pickle

    err = pickle.loads(pickle.dumps(SpecError("bad field")))
    assert isinstance(err, SpecError) and err.message == "bad field" and err.user_error
