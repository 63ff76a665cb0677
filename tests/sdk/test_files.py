"""The official Python SDK (miosa 2.19.2), unchanged, on one real guest: files in a computer
(`computer.files`, `write_file`/`read_file`, `helpers.read_text`/`write_text`), its logs
(`computer.logs.get`/`stream`) and its metrics (`computer.metrics`)."""
import hashlib
import json
import os
import threading
import time

import pytest
from miosa import helpers
from miosa.errors import InvalidPathError, MiosaError, NotFoundError


@pytest.fixture(scope="module")
def computer(server):
    from miosa import Miosa

    client = Miosa(api_key=server.key, base_url=server.base_url)
    c = client.computers.create(name="sdk-files", size="xs")
    c.wait_until_ready(timeout=180)
    yield c
    c.destroy()


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def test_a_100_mib_random_file_goes_up_and_down_intact(computer, tmp_path):
    local = tmp_path / "random.bin"
    with open(local, "wb") as f:
        for _ in range(100):
            f.write(os.urandom(1 << 20))
    sent = sha256_of(local)
    assert computer.files.upload(local, "/root/big/random.bin").success
    # The guest has the same bytes.
    guest = computer.exec.bash("sha256sum /root/big/random.bin | cut -d' ' -f1", timeout=120).output.strip()
    assert guest == sent
    back = computer.files.download("/root/big/random.bin")
    assert len(back) == 100 << 20 and hashlib.sha256(back).hexdigest() == sent
    # Nothing of the upload's partial file is left beside it.
    assert [f.name for f in computer.files.list("/root/big")] == ["random.bin"]
    computer.files.delete("/root/big")


def test_files_are_written_listed_moved_and_removed(computer, client):
    binary = bytes(range(256)) * 3
    computer.files.write_file("/root/w/bin.dat", binary)  # parents are made
    assert computer.files.download("/root/w/bin.dat") == binary
    computer.write_file("/root/w/hello.txt", "héllo\n")
    assert computer.read_file("/root/w/hello.txt") == "héllo\n"
    helpers.write_text(client, computer.id, "/root/w/helper.txt", "via helpers")
    assert helpers.read_text(client, computer.id, "/root/w/helper.txt") == "via helpers"
    computer.write_file("/root/w/empty", b"")
    assert computer.files.download("/root/w/empty") == b""

    computer.files.mkdir("/root/w/sub/deeper", mode=0o700)
    st = computer.files.stat("/root/w/sub/deeper")
    assert st.is_dir and st.mode & 0o777 == 0o700
    computer.files.chmod("/root/w/hello.txt", 0o600)
    assert computer.files.stat("/root/w/hello.txt").mode & 0o777 == 0o600
    assert computer.exec.bash("stat -c %a /root/w/hello.txt").output.strip() == "600"

    computer.files.rename("/root/w/helper.txt", "/root/w/sub/moved.txt")
    computer.files.copy("/root/w/sub", "/root/w/copy", recursive=True)
    assert computer.read_file("/root/w/copy/moved.txt") == "via helpers"
    computer.exec.bash("ln -s /root/w/hello.txt /root/w/link")
    link = computer.files.stat("/root/w/link")
    assert link.is_symlink and link.symlink_target == "/root/w/hello.txt"

    listed = {f.name: f for f in computer.files.list("/root/w")}
    assert sorted(listed) == ["bin.dat", "copy", "empty", "hello.txt", "link", "sub"]
    assert listed["bin.dat"].size == len(binary) and not listed["bin.dat"].is_dir
    assert listed["sub"].is_dir and listed["bin.dat"].path == "/root/w/bin.dat"
    entries = {e.name: e for e in computer.files.readdir("/root/w")}
    assert entries["link"].is_symlink and entries["copy"].is_dir
    assert computer.files.export("/root/w/bin.dat").success

    computer.files.delete("/root/w/copy")
    assert "copy" not in [f.name for f in computer.files.list("/root/w")]
    computer.files.delete("/root/w")
    assert computer.exec.bash("test -e /root/w && echo there || echo gone").output.strip() == "gone"


def test_bad_paths_and_a_full_disk_get_clear_errors(computer, tmp_path):
    with pytest.raises(NotFoundError) as missing:
        computer.files.download("/root/no-such-file")
    assert "/root/no-such-file" in str(missing.value) and "no such file" in str(missing.value)
    with pytest.raises(InvalidPathError):
        computer.files.stat("relative/path")
    computer.write_file("/root/plain.txt", "x")
    with pytest.raises(MiosaError) as not_dir:
        computer.files.list("/root/plain.txt")
    assert not_dir.value.status_code == 409 and "not a directory" in str(not_dir.value)
    with pytest.raises(MiosaError) as is_dir:
        computer.files.download("/root")
    assert is_dir.value.status_code == 409 and "is a directory" in str(is_dir.value)
    with pytest.raises(MiosaError) as into_file:
        computer.write_file("/root/plain.txt/inside", "x")
    assert into_file.value.status_code == 409, into_file.value

    # A full disk: a 1 MiB file system in the guest, and 3 MiB sent to it.
    assert computer.exec.bash("mkdir -p /mnt/small && mount -t tmpfs -o size=1m tmpfs /mnt/small && echo ok").output.strip() == "ok"
    local = tmp_path / "three.bin"
    local.write_bytes(os.urandom(3 << 20))
    with pytest.raises(MiosaError) as full:
        computer.files.upload(local, "/mnt/small/three.bin")
    assert full.value.status_code == 507 and "no space" in str(full.value), full.value
    assert computer.exec.bash("ls -A /mnt/small").output.strip() == "", "the partial file was removed"
    computer.exec.bash("umount /mnt/small")


def test_logs_show_the_boot_page_on_and_follow(computer):
    page = computer.logs.get(lines=50)
    texts = [line["text"] for line in page["lines"]]
    assert any("stasis-agent: booted: kernel" in t for t in texts), texts
    assert page["cursor"] >= page["lines"][-1]["cursor"] and page["first_cursor"] == 0

    # What the guest prints on its console comes after the cursor, in order; so does a stream.
    marker = "stasis-log-test"
    computer.exec.bash(f"for i in 1 2 3; do echo {marker}-$i > /dev/console; done")
    after = computer.logs.get(since=str(page["cursor"]))
    mine = [line["text"] for line in after["lines"] if marker in line["text"]]
    assert mine == [f"{marker}-1", f"{marker}-2", f"{marker}-3"], after
    with pytest.raises(Exception) as bad:
        computer.logs.get(since="yesterday")
    assert getattr(bad.value, "status_code", None) == 422

    # The stream: the newest line first, then what is printed as it is printed.
    found = {}

    def follow():
        events = computer.logs.stream()
        first = next(events)
        found["first"] = first
        threading.Timer(0.5, lambda: computer.exec.bash(f"echo {marker}-live > /dev/console")).start()
        for n, e in enumerate(events):
            if e["type"] == "log" and json.loads(e["data"])["text"] == f"{marker}-live":
                found["live"] = e
                return
            if n > 1000:
                return

    t = threading.Thread(target=follow, daemon=True)
    t.start()
    t.join(timeout=60)
    assert found.get("first", {}).get("type") == "log", found
    assert "live" in found, "the line printed while following arrived"
    assert int(found["live"]["id"]) > json.loads(found["live"]["data"])["cursor"]


def test_metrics_move_when_the_guest_burns_cpu(computer):
    time.sleep(12)  # ~10 s of quiet first: the recent CPU figure is over the last samples
    idle = computer.metrics(window="5m")
    assert idle["cpu"]["vcpus"] == 1 and idle["window"] == "5m"
    assert idle["memory"]["total_bytes"] > 200 << 20 and idle["memory"]["host_rss_bytes"] > 0
    assert idle["disk"]["total_bytes"] > 1 << 30 and idle["network"]["rx_bytes"] >= 0
    computer.exec.bash("timeout 8 sh -c 'while :; do :; done'; true", timeout=30)
    busy = computer.metrics(window="5m")
    assert busy["cpu"]["percent"] > 50 and busy["cpu"]["percent"] > idle["cpu"]["percent"] + 20, (idle["cpu"], busy["cpu"])
    assert busy["cpu"]["seconds_total"] > idle["cpu"]["seconds_total"] + 4
    assert len(busy["samples"]) > len(idle["samples"])
    with pytest.raises(Exception) as bad:
        computer.metrics(window="forever")
    assert getattr(bad.value, "status_code", None) == 422
