"""The official Python SDK (miosa 2.19.2), unchanged: snapshots as a graph.

Lineage across restores (a restored computer's first snapshot names the one it came from,
which lists it as a child); the account-wide history with search and paging; five forks by
snapshot id alone, one retried with the same Idempotency-Key; a destroyed computer's
snapshot forked; a named snapshot deployed after its computer is gone; files read from a
snapshot's disk without restoring it; bulk delete with its confirmation guard; an expired
snapshot deleted and its objects collected.
"""
import glob
import hashlib
import io
import os
import subprocess
import tarfile
import time
import uuid

import httpx
import pytest
from miosa.errors import (
    NotFoundError,
    SnapshotAlreadyNamedError,
    SnapshotInUseError,
    SnapshotNameTakenError,
    ValidationError,
)

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


def running(client, computer_id, timeout=180):
    computer = client.computers.get(computer_id)
    computer.wait_until_ready(timeout=timeout)
    return client.computers.get(computer_id)


def snapshot(computer, comment):
    """A snapshot of a running computer, once it is ready."""
    snap = computer.checkpoints.create(comment=comment, on_progress=lambda e: None)
    snap = computer.checkpoints.get(snap.id)
    assert snap.status == "ready", snap
    return snap


def http(server):
    return httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {server.key}"}, timeout=60)


@pytest.fixture(scope="module")
def graph(server):
    """A booted computer with a counter and a file, its snapshot, a computer restored from
    that, and the restored computer's own snapshot."""
    from miosa import Miosa

    client = Miosa(api_key=server.key, base_url=server.base_url)
    tag = uuid.uuid4().hex[:6]
    root = client.computers.create(name=f"graph-root-{tag}", size="xs")
    root.wait_until_ready(timeout=180)
    assert root.exec.bash(COUNTER).output.strip() == "started"
    root.exec.bash("mkdir -p /root/tree/sub && printf before > /root/before && printf deep > /root/tree/sub/f "
                   "&& head -c 300000 /dev/urandom > /root/tree/blob && ln -s before /root/link")
    blob_sum = root.exec.bash("sha256sum /root/tree/blob | cut -d' ' -f1").output.strip()
    s1 = snapshot(root, "level 1")
    level1 = client.computers.get(root.id).checkpoints.restore(s1.id)
    level1 = running(client, level1.id)
    level1.exec.bash("printf level1 > /root/level1")
    s2 = snapshot(level1, "level 2")
    yield dict(client=client, tag=tag, root=root, s1=s1, level1=level1, s2=s2, blob_sum=blob_sum)


def test_lineage_runs_across_restores(graph):
    client, s1, s2, level1 = graph["client"], graph["s1"], graph["s2"], graph["level1"]
    # The restored computer's first snapshot descends from the one it was restored from.
    assert s2.parent_snapshot_id == s1.id
    # Where it came from, in a field the SDK's Computer keeps.
    assert client.computers.get(level1.id).data.metadata["source_snapshot_id"] == s1.id
    detail = client.snapshot_history.get(s1.id)
    assert detail["data"]["id"] == s1.id
    assert detail["data"]["resource"] == {
        "type": "computer", "id": graph["root"].id, "name": graph["root"].name, "status": "running"}
    assert s2.id in detail["children"], detail
    assert level1.id in detail["computers"], detail
    assert detail["dependents"] == []
    # The restored computer's counter went on from the snapshot.
    assert count(level1) > 0


def test_history_lists_searches_and_pages(graph):
    client, tag = graph["client"], graph["tag"]
    # The restored computer is named after the root: both match, newest first.
    mine = client.snapshot_history.list(q=f"GRAPH-root-{tag}")
    assert [s["id"] for s in mine["data"]] == [graph["s2"].id, graph["s1"].id], mine
    assert mine["total"] == 2 and mine["limit"] == 50
    # By computer id, by snapshot id (any case), and nothing for what matches nothing.
    by_resource = client.snapshot_history.list(resource_id=graph["level1"].id)
    assert [s["id"] for s in by_resource["data"]] == [graph["s2"].id]
    assert client.snapshot_history.list(q=graph["s2"].id.upper())["total"] == 1
    assert client.snapshot_history.list(q="no-such-thing-%_")["data"] == []
    # Pages: newest first, the limit capped at 200.
    everything = client.snapshot_history.list(limit=500)
    assert everything["limit"] == 200
    first = client.snapshot_history.list(limit=1)
    second = client.snapshot_history.list(limit=1, offset=1)
    assert first["data"][0]["id"] == everything["data"][0]["id"]
    assert second["data"][0]["id"] == everything["data"][1]["id"]
    stamps = [s["created_at"] for s in everything["data"]]
    assert stamps == sorted(stamps, reverse=True)
    groups = client.snapshot_history.groups(q=tag)
    assert {g["resource"]["id"] for g in groups["data"]} == {graph["root"].id, graph["level1"].id}, groups
    assert all(g["snapshot_count"] == 1 for g in groups["data"])
    with pytest.raises(ValidationError):
        client.snapshot_history.list(limit=0)
    with pytest.raises(NotFoundError):
        client.snapshot_history.get(str(uuid.uuid4()))


def test_five_forks_by_snapshot_id_one_retried_with_its_key(graph):
    client, s1 = graph["client"], graph["s1"]
    key = f"fork-{uuid.uuid4()}"
    first = client.snapshot_history.fork(s1.id, idempotency_key=key)
    again = client.snapshot_history.fork(s1.id, idempotency_key=key)
    assert again["data"]["id"] == first["data"]["id"], "the same key answers the same fork"
    assert first["snapshot"]["id"] == s1.id
    ids = [first["data"]["id"]] + [client.snapshot_history.fork(s1.id)["data"]["id"] for _ in range(4)]
    assert len(set(ids)) == 5
    forks = [running(client, i) for i in ids]
    counts = [count(f) for f in forks]
    assert all(c > 0 for c in counts), counts
    for f in forks:
        assert f.exec.bash("cat /root/before").output == "before"
        assert f.exec.bash("test -e /root/level1 && echo yes || echo no").output == "no\n"
    # Each counts on its own.
    forks[0].exec.bash("pkill -f '[w]hile True'; sleep 0.3; echo 0 > /tmp/n")
    time.sleep(0.5)
    assert count(forks[0]) == 0 and count(forks[1]) > 0
    with pytest.raises(ValidationError):
        client.snapshot_history.fork(s1.id, environment="prod")
    for f in forks:
        f.destroy()


def test_files_are_read_from_a_snapshot_without_restoring_it(graph, server):
    client, s1 = graph["client"], graph["s1"]
    before = len(client.computers.list())
    tree = client.snapshot_history.tree(s1.id, path="/root")
    entries = {e["name"]: e for e in tree["data"]}
    assert entries["before"]["type"] == "file" and entries["before"]["size"] == 6
    assert entries["tree"]["type"] == "dir"
    assert entries["link"]["type"] == "symlink" and entries["link"]["target"] == "before"
    assert client.snapshot_history.file(s1.id, path="/root/before") == b"before"
    blob = client.snapshot_history.file(s1.id, path="/root/tree/blob")
    assert hashlib.sha256(blob).hexdigest() == graph["blob_sum"]
    # A folder comes as a tar.
    tar = tarfile.open(fileobj=io.BytesIO(client.snapshot_history.file(s1.id, path="/root/tree")))
    names = {n.rstrip("/") for n in tar.getnames()}
    assert {"tree", "tree/sub", "tree/sub/f", "tree/blob"} <= names, names
    assert tar.extractfile("tree/sub/f").read() == b"deep"
    # What the snapshot does not hold: written after it, or never.
    assert "level1" not in {e["name"] for e in tree["data"]}
    assert "level1" in {e["name"] for e in client.snapshot_history.tree(graph["s2"].id, path="/root")["data"]}
    assert client.snapshot_history.file(graph["s2"].id, path="/root/level1") == b"level1"
    # (The SDK hands a download's answer back raw, whatever its status.)
    with http(server) as h:
        missing = h.get(f"/snapshots/{s1.id}/files", params={"path": "/root/level1"})
        assert missing.status_code == 404, missing.text
        assert "/root/level1" in missing.json()["error"]["message"]
        assert h.get(f"/snapshots/{s1.id}/files").status_code == 422
    with pytest.raises(NotFoundError):
        client.snapshot_history.tree(s1.id, path="/no/such/dir")
    # Nothing was restored to read them.
    assert len(client.computers.list()) == before


def test_named_snapshots_pin_and_deploy_after_the_computer_is_gone(graph, server):
    client, s1, root = graph["client"], graph["s1"], graph["root"]
    name = f"base-{graph['tag']}"
    made = client.named_snapshots.create(name, snapshot_id=s1.id)
    assert made["data"]["name"] == name and made["data"]["status"] == "ready"
    with pytest.raises(SnapshotNameTakenError):
        client.named_snapshots.create(name, snapshot_id=graph["s2"].id)
    with pytest.raises(SnapshotAlreadyNamedError):
        client.named_snapshots.create(f"other-{graph['tag']}", snapshot_id=s1.id)
    with pytest.raises(ValidationError):
        client.named_snapshots.create("bad name!", snapshot_id=s1.id)
    # A pinned snapshot is not in the history and cannot be deleted.
    assert s1.id not in [s["id"] for s in client.snapshot_history.list(limit=200)["data"]]
    with pytest.raises(SnapshotInUseError):
        client.snapshot_history.delete(s1.id)
    assert client.snapshot_history.get(s1.id)["dependents"] == [{"kind": "named_snapshot", "name": name}]
    assert name in [n["name"] for n in client.named_snapshots.list()["data"]]

    # The computer goes; its snapshot stays reachable by id and by name.
    root.destroy()
    with pytest.raises(NotFoundError):
        client.computers.get(root.id).exec.bash("true")
    assert client.snapshot_history.get(s1.id)["data"]["resource"]["status"] in ("destroying", "destroyed")
    key = f"deploy-{uuid.uuid4()}"
    deployed = client.named_snapshots.deploy(name, idempotency_key=key)
    assert client.named_snapshots.deploy(name, idempotency_key=key)["data"]["id"] == deployed["data"]["id"]
    computer = running(client, deployed["data"]["id"])
    assert computer.exec.bash("cat /root/before").output == "before"
    assert count(computer) > 0
    # A destroyed computer's snapshot forks by its id as well.
    forked = running(client, client.snapshot_history.fork(s1.id)["data"]["id"])
    assert forked.exec.bash("cat /root/before").output == "before"
    forked.destroy()
    computer.destroy()

    removed = client.named_snapshots.delete(name)
    assert removed["outcome"] == "released"
    with pytest.raises(NotFoundError):
        client.named_snapshots.get(name)
    assert s1.id in [s["id"] for s in client.snapshot_history.list(limit=200)["data"]]


def test_bulk_delete_guards_a_whole_history_and_judges_each(graph, server):
    client, level1 = graph["client"], graph["level1"]
    extra = snapshot(level1, "extra")
    with pytest.raises(ValidationError):
        client.snapshot_history.bulk_delete(resource_id=level1.id, all=True, confirm="yes")
    with pytest.raises(ValidationError):
        client.snapshot_history.bulk_delete(resource_id=level1.id, confirm=level1.id)
    ghost = str(uuid.uuid4())
    out = client.snapshot_history.bulk_delete(ids=[extra.id, ghost])
    assert out["deleted"] == 1
    assert [(i["id"], i["outcome"]) for i in out["data"]] == [(extra.id, "deleted"), (ghost, "not_found")]
    whole = client.snapshot_history.bulk_delete(resource_id=level1.id, all=True, confirm=level1.id)
    assert [i["id"] for i in whole["data"]] == [graph["s2"].id] and whole["deleted"] == 1
    assert client.snapshot_history.list(resource_id=level1.id)["data"] == []
    # Deleting the parent broke nothing: the child's computer still runs, and its lineage
    # still names the parent.
    assert level1.exec.bash("cat /root/level1").output == "level1"


def test_an_expired_snapshot_is_deleted_and_collected(graph, server):
    level1 = graph["level1"]
    with http(server) as h:
        bad = h.post(f"/computers/{level1.id}/snapshots", json={"ttl_seconds": 0})
        assert bad.status_code == 422 and "ttl_seconds" in bad.text
        past = h.post(f"/computers/{level1.id}/snapshots", json={"expires_at": "2020-01-01T00:00:00Z"})
        assert past.status_code == 422 and "expires_at" in past.text
        made = h.post(f"/computers/{level1.id}/snapshots", json={"comment": "short-lived", "ttl_seconds": 4})
        assert made.status_code == 201, made.text
        snap = made.json()["data"]
        assert snap["expires_at"] is not None
        sid = snap["id"]
        manifest = os.path.join(server.data_dir, "objects", "snapshots", sid, "manifest.zst")
        deadline = time.time() + 90
        while h.get(f"/computers/{level1.id}/snapshots/{sid}").json()["data"]["status"] != "ready":
            assert time.time() < deadline
            time.sleep(0.5)
        assert os.path.isfile(manifest), "the manifest is in the store while the snapshot lives"
        while h.get(f"/snapshots/{sid}").status_code != 404:
            assert time.time() < deadline, "the expired snapshot is still there"
            time.sleep(0.5)
        # Its deletion says why, and collection takes its objects from the store.
        events = h.get(f"/computers/{level1.id}/snapshots/{sid}/events",
                       headers={"Last-Event-ID": "0", "Accept": "text/event-stream"}).text
        assert '"step":"expired"' in events, events
        while os.path.exists(manifest):
            assert time.time() < deadline, "the expired snapshot's manifest was not collected"
            time.sleep(0.5)


def test_a_paused_computer_holds_no_memory_and_resumes_in_place_with_its_processes(graph, server):
    client = graph["client"]
    computer = running(client, client.snapshot_history.fork(graph["s1"].id)["data"]["id"])
    assert count(computer) > 0
    with http(server) as h:
        r = h.post(f"/computers/{computer.id}/pause")
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "paused"
        hibernation = r.json()["message"].rsplit(" ", 1)[-1]
        assert client.computers.get(computer.id).status == "paused"
        # No QEMU runs for it, and once its snapshot is stored no RAM copy is kept in tmpfs.
        assert subprocess.run(["pgrep", "-f", f"stasis-{computer.id}"], capture_output=True).returncode == 1
        deadline = time.time() + 120
        while h.get(f"/snapshots/{hibernation}").json()["data"]["status"] != "ready":
            assert time.time() < deadline
            time.sleep(0.5)
        ram = [p for p in glob.glob("/dev/shm/stasis-*/**", recursive=True) if hibernation in p]
        assert ram == [], ram
        # Its RAM is parked on the host's disk instead, for a resume without a download.
        parked = glob.glob(f"{server.data_dir}/cache/**/{hibernation}/memory.parked", recursive=True)
        assert len(parked) == 1 and os.path.getsize(parked[0]) > 0, parked
        # Not in the history: the pause made it, not the user.
        assert hibernation not in [s["id"] for s in client.snapshot_history.list(limit=200)["data"]]
        frozen_at = None
        # The SDK's start resumes it: same id, the counter process still running.
        started = client.computers.get(computer.id).start()
        assert started.success
        computer = running(client, computer.id)
        frozen_at = count(computer)
        time.sleep(1)
        assert count(computer) > frozen_at, "the counter runs on"
        assert computer.exec.bash("cat /root/before").output == "before"
        # Resumed from its own snapshot, which it now rests on; the pause is over.
        assert client.computers.get(computer.id).data.metadata["source_snapshot_id"] == graph["s1"].id
        assert h.get(f"/snapshots/{hibernation}").status_code == 404
        assert not os.path.exists(parked[0]), "the parked RAM went once it was taken back"
        again = h.post(f"/computers/{computer.id}/resume")
        assert again.status_code == 200 and again.json()["status"] == "running"
    computer.destroy()


def test_the_idle_timeout_pauses_rather_than_discards(graph, server):
    client = graph["client"]
    computer = running(client, client.snapshot_history.fork(graph["s1"].id)["data"]["id"])
    assert computer.auto_stop.get() == {"seconds": 0, "action": "pause"}
    with pytest.raises(ValidationError):
        computer.auto_stop.update(10**9)
    assert computer.auto_stop.update(3) == {"seconds": 3, "action": "pause"}
    before = count(computer)
    deadline = time.time() + 60
    while client.computers.get(computer.id).status != "paused":
        assert time.time() < deadline, "the idle computer was not paused"
        time.sleep(0.5)
    client.computers.get(computer.id).start()
    computer = running(client, computer.id)
    now = count(computer)
    assert now >= before, (before, now)
    time.sleep(1)
    assert count(computer) > now, "its counter runs on after the idle pause"
    computer.auto_stop.update(0)
    computer.destroy()


def test_a_chain_of_ten_keeps_every_levels_memory_and_files(graph):
    client = graph["client"]
    computer = running(client, client.snapshot_history.fork(graph["s1"].id)["data"]["id"])
    sums, parent_snap, counted = {}, graph["s1"].id, 0
    for level in range(1, 11):
        # The counter process came through every restore, counting on from where it was.
        now = count(computer)
        assert now >= counted, (level, counted, now)
        for name, digest in sums.items():
            assert computer.exec.bash(f"sha256sum /root/{name} | cut -d' ' -f1").output.strip() == digest, (level, name)
        # About 1% of its RAM and 10 MiB of its disk change at this level.
        computer.exec.bash(
            "nohup python3 -c 'import os,time; b=os.urandom(2621440); time.sleep(10**6)' >/dev/null 2>&1 & "
            f"dd if=/dev/urandom of=/root/level-{level} bs=1M count=10 oflag=direct status=none")
        sums[f"level-{level}"] = computer.exec.bash(f"sha256sum /root/level-{level} | cut -d' ' -f1").output.strip()
        counted = count(computer)
        snap = snapshot(computer, f"level {level}")
        assert snap.parent_snapshot_id == parent_snap, (level, snap.parent_snapshot_id, parent_snap)
        parent_snap = snap.id
        restored = computer.checkpoints.restore(snap.id)
        computer.destroy()
        computer = running(client, restored.id)
    assert int(computer.exec.bash("pgrep -fc '[o]s.urandom'").output) == 10, "every level's process is still there"
    for name, digest in sums.items():
        assert computer.exec.bash(f"sha256sum /root/{name} | cut -d' ' -f1").output.strip() == digest, name
    computer.destroy()
