"""An S3-compatible object store on 127.0.0.1 for tests: moto's server mode (a real S3 HTTP API
in its own process), reached through ``AWS_ENDPOINT_URL`` as the cluster reaches AWS S3."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from typing import Iterator

from raytrain_at.runtime.ports import free_local_port

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "rehearsal", "AWS_SECRET_ACCESS_KEY": "rehearsal",
               "AWS_DEFAULT_REGION": "us-east-1"}


@contextmanager
def object_store(bucket: str | None = None) -> Iterator[str]:
    """Start moto on a free port, set the AWS variables of this process, create ``bucket``;
    yield the endpoint URL; stop the server (by its PID) and restore the environment."""
    port = free_local_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                               str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    saved = {k: os.environ.get(k) for k in [*CREDENTIALS, "AWS_ENDPOINT_URL"]}
    os.environ.update(CREDENTIALS, AWS_ENDPOINT_URL=endpoint)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.2)
        if bucket:
            import pyarrow.fs as pafs

            pafs.S3FileSystem(endpoint_override=endpoint, region="us-east-1",
                              allow_bucket_creation=True).create_dir(bucket)
        yield endpoint
    finally:
        server.terminate()
        server.wait(timeout=10)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
