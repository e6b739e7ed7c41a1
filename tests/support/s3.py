"""A real S3-protocol server on 127.0.0.1 for tests: moto's standalone server, started and stopped by PID.

``S3Server.start()`` launches ``moto_server`` as a child process on a free port, waits until it answers,
creates the bucket and returns the environment (``AWS_ENDPOINT_URL`` and credentials) under which
``s3://<bucket>/...`` resolves to it, the same variables a user sets for any S3-compatible store.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from adrec.runtime import free_port


@dataclass
class S3Server:
    bucket: str = "adrec-test"
    port: int = 0
    proc: subprocess.Popen | None = None
    env: dict = field(default_factory=dict)
    log_path: Path | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, log_dir: Path | None = None, timeout_s: float = 30.0) -> "S3Server":
        self.port = self.port or free_port(30000, 39999)
        exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
        cmd = [exe, "-H", "127.0.0.1", "-p", str(self.port)] if exe else \
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        self.log_path = Path(log_dir) / "moto.log" if log_dir else None
        out = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                urllib.request.urlopen(self.endpoint, timeout=1).read()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto_server did not start on {self.endpoint}")
                time.sleep(0.2)
        self.env = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                    "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
        self.create_bucket(self.bucket)
        return self

    def create_bucket(self, name: str) -> None:
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing",
                     aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket=name)

    def keys(self, prefix: str = "") -> list[str]:
        import boto3

        s3 = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
        out: list[str] = []
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            out += [o["Key"] for o in page.get("Contents", [])]
        return out

    def requests_served(self) -> int | None:
        """How many HTTP requests the server has logged so far (its log's request lines), None without a log:
        what a measurement shows to have touched the store (or not) is the difference of two readings."""
        if self.log_path is None or not self.log_path.is_file():
            return None
        return sum(1 for line in self.log_path.read_bytes().splitlines() if b'HTTP/1.1" ' in line)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None
