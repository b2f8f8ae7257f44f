import pytest
import ray

from elastune.train.driver import start_local_ray


@pytest.fixture(scope="session", autouse=True)
def local_ray():
    """One local Ray for the whole session (4 logical CPUs so 3 workers fit on 2 cores)."""
    start_local_ray(num_cpus=4)
    yield
    ray.shutdown()
