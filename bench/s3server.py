"""moto's standalone S3 server on 127.0.0.1 (the server s3fs's own tests use), for the tests and benches of
stores at s3:// URLs: started on a free port in its own process, stopped by its PID.

    with S3Server() as s3:
        os.environ.update(s3.env())      # AWS_ENDPOINT_URL and test credentials, as a user would set them
        s3.make_bucket("m3jepa")
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

SECRET = "m3jepa-test-secret-Zq81xV"  # a recognisable secret: tests assert it is never written or printed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def forget_s3_clients() -> None:
    """Drop this process's cached S3 filesystems: fsspec reuses one instance per set of arguments, and an
    instance keeps the endpoint it was made with, so after one server stops and another starts on a new
    port (two test modules in one session) it would still call the dead one."""
    s3fs = sys.modules.get("s3fs")
    if s3fs is not None:
        s3fs.S3FileSystem.clear_instance_cache()


class S3Server:
    """One moto server process; `env()` is what points boto3/s3fs at it."""

    def __init__(self, log: str | None = None) -> None:
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self._log = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115  (closed in stop())

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "m3jepa-test-key",
            "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def start(self, timeout: float = 60.0) -> S3Server:
        for _ in range(3):  # another process may take the free port between our probe and moto's bind
            self.port = free_port()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=self._log, stderr=self._log, start_new_session=True,
            )
            if self._wait(timeout):
                return self
            self.stop()
        raise RuntimeError("moto's S3 server did not start (is moto[server] installed?)")

    def _wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2):
                    return True
            except OSError:
                time.sleep(0.1)
        return False

    def make_bucket(self, name: str) -> None:
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="k", aws_secret_access_key="s",
                     region_name="us-east-1").create_bucket(Bucket=name)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)  # by PID: nothing else on the machine is touched
            self.proc.wait()
        self.proc = None

    def __enter__(self) -> S3Server:
        forget_s3_clients()
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        forget_s3_clients()
        if self._log is not subprocess.DEVNULL:
            self._log.close()
