"""Checkpoints on s3:// through a real S3-protocol server (moto's standalone server) on loopback.

Credentials reach pyarrow only through the environment, as they would in production; nothing
about them is in the URI, the spec or the manifest.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

from elastune.checkpoint.checkpointer import Checkpointer
from elastune.checkpoint.format import Manifest
from tests.helpers import free_port, tiny_model

BUCKET = "elastune-test"


@pytest.fixture(scope="module")
def s3_endpoint():
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:  # wait until it answers, not a fixed sleep
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=1)
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                pytest.fail("moto S3 server did not start on loopback within 30 s")
            time.sleep(0.1)
    env = {
        "AWS_ACCESS_KEY_ID": "test-key",
        "AWS_SECRET_ACCESS_KEY": "test-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": url,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    urllib.request.urlopen(urllib.request.Request(f"{url}/{BUCKET}", method="PUT"), timeout=5)
    try:
        yield url
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.terminate()
        server.wait(timeout=10)


def test_save_load_prune_on_s3(s3_endpoint):
    model = tiny_model()
    tensors = {f"model/{n}": t for n, t in model.state_dict().items()}
    uri = f"s3://{BUCKET}/jobs/demo/checkpoints"
    ckpt = Checkpointer(uri, keep_last=2)
    assert not ckpt.storage.is_local
    for step in (1, 2, 3):
        ckpt.save(Manifest(step, step * 8, "h", {}, {}), tensors)
    assert ckpt.committed_steps() == [2, 3]
    manifest, loaded = ckpt.load_latest_valid()
    assert manifest.step == 3 and manifest.samples_seen == 24
    for name, t in tensors.items():
        assert torch.equal(loaded[name], t), name
    raw = ckpt.storage.read_bytes("step-000000003/manifest.json").decode()
    assert "test-key" not in raw and "test-secret" not in raw
    assert ckpt.clear() == 2 and ckpt.latest() is None
