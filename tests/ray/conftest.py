import pytest
import ray

from elastune.train.driver import start_local_ray


@pytest.fixture(scope="session", autouse=True)
def local_ray():
    """One local Ray for the whole session (4 logical CPUs so 3 workers fit on 2 cores)."""
    start_local_ray(num_cpus=4)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory, stdlib_dataset):
    """The uninterrupted 3-worker run (restart mode: no quorum) that live and node-loss runs track."""
    from tests.ray.live_cases import job
    from tests.ray.test_resume_world_size import run

    spec = job(tmp_path_factory.mktemp("uninterrupted"), stdlib_dataset, "uninterrupted", recovery="restart")
    _, rows, _ = run(spec)
    return spec, rows
