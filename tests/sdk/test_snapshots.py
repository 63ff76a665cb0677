"""The official Python SDK (miosa 2.19.2), unchanged, against our server: snapshots.

Acceptance of the snapshots issue: a counter in memory continues in a restored computer
while the original goes on alone; files before the snapshot are there, files after are
not; five restores of one snapshot at once are five independent computers; restored
clones are distinct machines (RNG, clock).
"""
import threading
import time

import pytest
from miosa.errors import NotFoundError

COUNTER = (
    "nohup python3 -c 'import time\n"
    "i=0\n"
    "while True:\n"
    "  i+=1\n"
    "  open(\"/tmp/n\",\"w\").write(str(i))\n"
    "  time.sleep(0.05)' >/dev/null 2>&1 & sleep 1; echo started"
)


def count(computer):
    return int(computer.exec.bash("cat /tmp/n").output)


def ready_computer(client, name):
    computer = client.computers.create(name=name, size="xs")
    computer.wait_until_ready(timeout=180)
    return computer


def test_a_restored_computer_continues_where_the_snapshot_was_taken(client):
    original = ready_computer(client, "counter")
    assert original.exec.bash(COUNTER).output.strip() == "started"
    original.exec.bash("echo before > /root/before")

    seen = []
    snap = original.checkpoints.create(comment="counter-running", on_progress=seen.append)
    assert snap.computer_id == original.id
    statuses = [e.status for e in seen]
    assert statuses[-1] == "ready", statuses
    assert "uploading" in statuses, statuses
    assert any(e.progress is not None and 0 < e.progress < 1 for e in seen), [e.progress for e in seen]

    snap = original.checkpoints.get(snap.id)
    assert snap.status == "ready"
    assert snap.memory_size_bytes == 256 * 1024 * 1024
    assert snap.compressed_size_bytes and snap.state_size_bytes and snap.rootfs_size_bytes
    at_snapshot_ceiling = count(original)
    original.exec.bash("echo after > /root/after")

    restored = original.checkpoints.restore(snap.id)
    assert restored.id != original.id
    restored.wait_until_ready(timeout=180)

    continued = count(restored)
    # The restored counter starts from the snapshot's value (below what the original has
    # reached since) and keeps counting by itself.
    assert 0 < continued <= at_snapshot_ceiling + 5, (continued, at_snapshot_ceiling)
    time.sleep(1)
    assert count(restored) > continued
    assert count(original) > count(restored), "the original counted on, on its own"

    assert restored.exec.bash("cat /root/before").output == "before\n"
    assert restored.exec.bash("test -e /root/after && echo yes || echo no").output == "no\n"
    assert original.exec.bash("cat /root/after").output == "after\n", "the original is unchanged"

    # A new machine: its clock is now, and its hostname its own.
    guest_now = int(restored.exec.bash("date +%s").output)
    assert abs(guest_now - time.time()) <= 2
    assert original.checkpoints.get(snap.id).status == "ready"


def test_the_seed_python_recipe(client):
    # The seed's recipe, with the SDK's spelling (client.snapshots is an admin index in 2.19.2;
    # snapshots of a computer are its `checkpoints`).
    computer = ready_computer(client, "recipe")
    checkpoints = client.computers.get(computer.id).checkpoints
    snap = checkpoints.create(comment="pre-migration")
    assert snap.status == "creating"
    while snap.status not in ("ready", "failed"):
        time.sleep(0.5)
        snap = checkpoints.get(snap.id)
    if snap.status == "failed":
        raise RuntimeError(f"Snapshot failed: {snap.error}")
    assert [s.id for s in checkpoints.list()] == [snap.id]

    events = list(checkpoints.events(snap.id))
    assert events[-1].status == "ready" and events[-1].snapshot_id == snap.id

    deleted = checkpoints.delete(snap.id)
    assert deleted.status == "deleted"
    with pytest.raises(NotFoundError):
        checkpoints.get(snap.id)
    assert checkpoints.list() == []


def test_five_restores_of_one_baseline_at_once(client):
    baseline = ready_computer(client, "baseline")
    baseline.exec.bash("echo baseline > /root/env")
    snap = baseline.checkpoints.create(comment="baseline-env", on_progress=lambda e: None)
    assert baseline.checkpoints.get(snap.id).status == "ready"

    workers, errors = [None] * 5, []

    def restore(i):
        try:
            workers[i] = baseline.checkpoints.restore(snap.id)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=restore, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len({w.id for w in workers}) == 5
    for w in workers:
        w.wait_until_ready(timeout=240)
        assert client.computers.get(w.id).status == "running"

    for i, w in enumerate(workers):
        assert w.exec.bash("cat /root/env").output == "baseline\n"
        w.exec.bash(f"echo {i} > /root/worker-{i}")
    for i, w in enumerate(workers):
        assert w.exec.bash("ls /root | grep worker- | tr '\\n' ' '").output.strip() == f"worker-{i}"
    randoms = {w.exec.bash("head -c 16 /dev/urandom | od -An -tx1").output for w in workers}
    assert len(randoms) == 5, "each clone has its own RNG"
    assert baseline.checkpoints.get(snap.id).status == "ready"
