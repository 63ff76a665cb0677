"""Starts a real `stasis serve` (temporary data dir, ephemeral port) for the SDK tests."""
import os
import subprocess
import tempfile
import threading
import time
import urllib.request

import pytest

BIN = os.environ.get("STASIS_BIN", os.path.join(os.path.dirname(__file__), "../../target/release/stasis"))


class Server:
    def __init__(self, *extra_args):
        self.data_dir = tempfile.mkdtemp(prefix="stasis-sdk", dir="/tmp")
        self.key = self.create_key("sdk")
        self.proc = subprocess.Popen(
            [BIN, "serve", "--listen", "127.0.0.1:0", "--data-dir", self.data_dir, *extra_args],
            stdout=subprocess.PIPE,
            text=True,
        )
        first = self.proc.stdout.readline()
        self.base_url = next(w for w in first.split() if w.startswith("http://"))
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(self.base_url + "/health", timeout=2)
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.1)

    def create_key(self, tenant):
        out = subprocess.run(
            [BIN, "keys", "create", "--tenant", tenant, "--data-dir", self.data_dir],
            check=True, capture_output=True, text=True,
        )
        return out.stdout.strip().splitlines()[-1]

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="session")
def server():
    s = Server()
    yield s
    s.stop()


@pytest.fixture
def client(server):
    from miosa import Miosa

    return Miosa(api_key=server.key, base_url=server.base_url)
