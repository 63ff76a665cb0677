"""The official Python SDK (miosa 2.19.2), unchanged, against our server: computers."""
import os
import time

import pytest
from miosa import Miosa
from miosa.errors import MiosaError, NotFoundError, AuthenticationError


def test_lifecycle_with_the_official_sdk(client):
    computer = client.computers.create(name="sdk-dev", size="xs")
    assert computer.status in ("provisioning", "starting", "running")
    computer.wait_until_ready(timeout=180)

    r = computer.exec.bash("uname -r; python3 -c 'print(6*7)'")
    assert r.exit_code == 0 and r.success
    kernel, answer = r.output.strip().splitlines()
    assert kernel.endswith("-cloud-amd64") and kernel != os.uname().release
    assert answer == "42"

    r = computer.exec.python("import platform; print(platform.python_version_tuple()[0])")
    assert r.output == "3\n"

    r = computer.exec.bash("echo oops >&2; exit 5")
    assert (r.exit_code, r.success, r.stderr) == (5, False, "oops\n")

    assert computer.id in [c.id for c in client.computers.list()]
    assert client.computers.get(computer.id).status == "running"

    computer.exec.bash("echo kept > /root/kept")
    stopped = computer.stop()
    assert stopped.success and stopped.status == "stopped"
    with pytest.raises(MiosaError) as err:
        computer.exec.bash("true")
    assert err.value.status_code == 409
    assert "computer is not running" in err.value.message

    started = computer.start()
    assert started.success
    computer.wait_until_ready(timeout=180)
    assert computer.exec.bash("cat /root/kept").output == "kept\n"

    assert computer.destroy().success
    with pytest.raises(NotFoundError):
        client.computers.get(computer.id)


def test_exec_timeout_answers_quickly_with_124(client):
    computer = client.computers.create(name="sdk-timeout", size="xs")
    try:
        computer.wait_until_ready(timeout=180)
        t = time.time()
        r = computer.exec.bash("sleep 30", timeout=2)
        assert time.time() - t < 4
        assert r.exit_code == 124
        assert computer.exec.bash("echo next").output == "next\n"
    finally:
        computer.destroy()


def test_errors_map_to_sdk_exceptions(server, client):
    with pytest.raises(NotFoundError) as err:
        client.computers.get("00000000-0000-0000-0000-000000000000")
    assert err.value.message == "computer not found"
    assert err.value.request_id

    bad = Miosa(api_key="stasis_wrong", base_url=server.base_url)
    with pytest.raises(AuthenticationError):
        bad.computers.list()

    # Another tenant cannot see this tenant's computers.
    other = Miosa(api_key=server.create_key("someone-else"), base_url=server.base_url)
    mine = client.computers.create(name="private", size="xs")
    try:
        with pytest.raises(NotFoundError):
            other.computers.get(mine.id)
        assert mine.id not in [c.id for c in other.computers.list()]
    finally:
        mine.destroy()
