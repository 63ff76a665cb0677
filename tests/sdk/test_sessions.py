"""The official Python SDK (miosa 2.19.2), unchanged: `exec.spawn` over the WebSocket
`/computers/{id}/exec/stream`, terminals (`terminal.create`, `terminal.resize` and the
session's stream), background commands (`/commands` with `detached`), and the per-computer
session cap. One computer serves every check; the long spawn runs while the others do."""
import asyncio
import json
import time
import urllib.error
import urllib.request

import pytest
import websockets
from miosa import AsyncMiosa
from miosa.errors import NotFoundError, ValidationError

MAX_SESSIONS = 16
# Reads a line, then writes to both streams for over 60 s (the SDK's HTTP timeout, which a
# one-shot exec cannot outlast), then exits 7.
LONG = (
    'read line; echo "got $line from $GREETING in $PWD"; '
    'for i in $(seq 1 32); do echo "out $i"; echo "err $i" >&2; sleep 2; done; exit 7'
)


def origin(server):
    """http://host:port, without the API's /api/v1."""
    return server.base_url.rstrip("/").removesuffix("/api/v1")


def ws_url(server, path):
    return "ws://" + origin(server).split("://", 1)[1] + path


async def collect(stream):
    return "".join([chunk async for chunk in stream])


async def frames_until(ws, want, limit=60):
    """Text of stdout frames until `want` appears in it (bounded in time)."""
    seen = ""
    deadline = time.monotonic() + limit
    while want not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"{want!r} did not come; got {seen!r}"
        frame = json.loads(await asyncio.wait_for(ws.recv(), left))
        if frame["type"] == "exit":
            raise AssertionError(f"exited ({frame}) before {want!r}; got {seen!r}")
        if frame["type"] in ("stdout", "stderr"):
            seen += frame["data"]
    return seen


def http(server, method, path, body=None):
    req = urllib.request.Request(
        origin(server) + "/api/v1" + path,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {server.key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


@pytest.fixture(scope="module")
def computer(server):
    from miosa import Miosa

    c = Miosa(api_key=server.key, base_url=server.base_url).computers.create(
        name="sdk-sessions", size="xs", env={"GREETING": "computer-env"}
    )
    c.wait_until_ready(timeout=180)
    yield c
    c.destroy()


async def check_long_spawn(c):
    start = time.monotonic()
    proc = await c.exec.spawn(LONG, cwd="/tmp")
    await proc.write("hello\n")
    out_task = asyncio.ensure_future(collect(proc.stdout()))
    err_task = asyncio.ensure_future(collect(proc.stderr()))
    code = await asyncio.wait_for(proc.wait(), 240)
    out, err = await out_task, await err_task
    took = time.monotonic() - start
    await proc.close()
    assert code == 7
    assert took > 60, took
    lines = out.splitlines()
    assert lines[0] == "got hello from computer-env in /tmp"
    assert lines[1:] == [f"out {i}" for i in range(1, 33)]
    assert err.splitlines() == [f"err {i}" for i in range(1, 33)]
    return took


async def check_disconnect_kills(c, sync_computer):
    proc = await c.exec.spawn("echo $$ > /tmp/spawned.pid; echo ready; sleep 600")
    async for chunk in proc.stdout():
        if "ready" in chunk:
            break
    bash = lambda cmd: asyncio.to_thread(sync_computer.exec.bash, cmd)  # noqa: E731
    pid = (await bash("cat /tmp/spawned.pid")).output.strip()
    assert (await bash(f"kill -0 {pid}")).exit_code == 0
    # The client goes without a word (no kill frame): its program goes too.
    await proc._ws.close()
    deadline = time.monotonic() + 30
    while (await bash(f"kill -0 {pid} 2>/dev/null")).exit_code == 0:
        assert time.monotonic() < deadline, "the spawned program outlived its client"
        await asyncio.sleep(0.5)


async def check_spawn_details(c):
    # Explicit args (comma-joined by the SDK), a per-spawn variable, a terminal size.
    proc = await c.exec.spawn("/usr/bin/env", args=["printenv", "ONLY_HERE"], env={"ONLY_HERE": "yes"})
    assert await collect(proc.stdout()) == "yes\n"
    assert await proc.wait() == 0
    proc = await c.exec.spawn("stty size; exit 4", rows=33, cols=101)
    assert "33 101" in await collect(proc.stdout())
    assert await proc.wait() == 4
    # stdin_close ends the input; kill() sends SIGKILL and closes.
    proc = await c.exec.spawn("wc -c")
    await proc.write("12345")
    await proc.close_stdin()
    assert (await collect(proc.stdout())).strip() == "5"
    assert await proc.wait() == 0
    proc = await c.exec.spawn("sleep 600")
    await proc.kill()
    # A program that cannot start: the shell's 127, its message on stderr.
    proc = await c.exec.spawn("/no/such/program")
    err = await collect(proc.stderr())
    assert await proc.wait() == 127 and "No such file" in err


async def check_terminal(server, c):
    made = await c.terminal.create(cols=100, rows=30, cwd="/tmp", env={"TERM_VAR": "tv"})
    sid = made["session_id"]
    assert (made["cols"], made["rows"]) == (100, 30)
    headers = [("Authorization", f"Bearer {server.key}")]
    url = ws_url(server, made["stream_url"])
    async with websockets.connect(url, additional_headers=headers) as ws:
        # One client at a time.
        with pytest.raises(websockets.exceptions.InvalidStatus) as taken:
            async with websockets.connect(url, additional_headers=headers):
                pass
        assert taken.value.response.status_code == 409
        await ws.send(json.dumps({"type": "stdin", "data": "echo $TERM_VAR-$PWD; stty size\n"}))
        seen = await frames_until(ws, "30 100")
        assert "tv-/tmp" in seen
        resized = await c.terminal.resize(sid, 120, 40)
        assert (resized["cols"], resized["rows"]) == (120, 40)
        await ws.send(json.dumps({"type": "stdin", "data": "stty size\n"}))
        await frames_until(ws, "40 120")
        # A resize frame does the same.
        await ws.send(json.dumps({"type": "resize", "rows": 50, "cols": 132}))
        await ws.send(json.dumps({"type": "stdin", "data": "stty size\n"}))
        await frames_until(ws, "50 132")
        await ws.send(json.dumps({"type": "stdin", "data": "exit 3\n"}))
        while True:
            frame = json.loads(await asyncio.wait_for(ws.recv(), 60))
            if frame["type"] == "exit":
                assert frame["code"] == 3
                break
    with pytest.raises(NotFoundError):
        await c.terminal.resize(sid, 80, 24)
    with pytest.raises(ValidationError) as bad:
        await c.terminal.create(cols=0)
    assert "cols" in str(bad.value)


def check_background(server, cid):
    status, started = http(server, "POST", f"/computers/{cid}/commands",
                           {"command": "echo begun; echo warn >&2; sleep 600", "detached": True, "cwd": "/tmp"})
    assert status == 202 and started["status"] == "running", started
    pid = started["pid"]
    status, listed = http(server, "GET", f"/computers/{cid}/commands")
    assert status == 200 and pid in [c["pid"] for c in listed["data"]]
    deadline = time.monotonic() + 30
    while True:
        status, logs = http(server, "GET", f"/computers/{cid}/commands/{pid}/logs")
        assert status == 200
        if logs["stdout"] == "begun\n" and logs["stderr"] == "warn\n":
            break
        assert time.monotonic() < deadline, logs
        time.sleep(0.5)
    status, killed = http(server, "POST", f"/computers/{cid}/commands/{pid}/kill", {"signal": "SIGTERM"})
    assert status == 200 and killed["status"] == "exited" and killed["exit_code"] == 128 + 15, killed
    status, missing = http(server, "GET", f"/computers/{cid}/commands/999999")
    assert status == 404 and missing["error"]["code"] == "COMMAND_NOT_FOUND", missing


async def check_session_cap(server, c):
    """The long spawn holds one session; fill the rest, then one more is a 429."""
    held = []
    try:
        for _ in range(MAX_SESSIONS - 1):
            held.append(await c.exec.spawn("sleep 600"))
        with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
            await c.exec.spawn("sleep 600")
        assert refused.value.response.status_code == 429
        body = json.loads(refused.value.response.body)
        assert body["error"]["code"] == "TOO_MANY_SESSIONS" and "sessions" in body["error"]["message"]
    finally:
        for p in held:
            await p.kill()


def test_spawn_terminals_background_commands_and_the_session_cap(server, computer):
    async def main():
        async with AsyncMiosa(api_key=server.key, base_url=server.base_url) as client:
            c = await client.computers.get(computer.id)
            long = asyncio.ensure_future(check_long_spawn(c))
            await check_spawn_details(c)
            await check_disconnect_kills(c, computer)
            await check_terminal(server, c)
            await asyncio.to_thread(check_background, server, computer.id)
            await check_session_cap(server, c)
            took = await long
            print(f"long spawn: {took:.1f} s, exit 7")

    asyncio.run(main())


def test_a_socket_endpoint_asked_without_an_upgrade_says_so(server, computer):
    status, body = http(server, "GET", f"/computers/{computer.id}/exec/stream?command=true")
    assert status == 426 and body["error"]["code"] == "WEBSOCKET_REQUIRED", body
    status, body = http(server, "GET", f"/computers/{computer.id}/exec/stream")
    assert status == 422 and "command" in body["error"]["message"], body


def test_a_restored_clone_keeps_background_commands_and_ends_streamed_ones(server, computer):
    """A snapshot of a computer with a background command and a spawn running: its clone runs
    the background command on (its output goes on from where it was), while the spawn, whose
    client belongs to the original, is ended in the clone and goes on in the original."""
    status, bg = http(server, "POST", f"/computers/{computer.id}/commands",
                      {"command": "i=0; while true; do i=$((i+1)); echo tick $i; sleep 1; done", "detached": True})
    assert status == 202, bg

    async def main():
        async with AsyncMiosa(api_key=server.key, base_url=server.base_url) as client:
            c = await client.computers.get(computer.id)
            proc = await c.exec.spawn("echo $$ > /tmp/streamed.pid; echo up; sleep 600")
            async for chunk in proc.stdout():
                if "up" in chunk:
                    break
            pid = (await asyncio.to_thread(computer.exec.bash, "cat /tmp/streamed.pid")).output.strip()
            snap = await asyncio.to_thread(computer.checkpoints.create, comment="sessions")
            clone = await asyncio.to_thread(computer.checkpoints.restore, snap.id)
            try:
                await asyncio.to_thread(clone.wait_until_ready, timeout=180)
                deadline = time.monotonic() + 30
                while (await asyncio.to_thread(clone.exec.bash, f"kill -0 {pid} 2>/dev/null")).exit_code == 0:
                    assert time.monotonic() < deadline, "the clone kept a streamed program of the original"
                    await asyncio.sleep(0.5)
                assert (await asyncio.to_thread(computer.exec.bash, f"kill -0 {pid}")).exit_code == 0, \
                    "the original's spawn runs on"
                status, listed = http(server, "GET", f"/computers/{clone.id}/commands")
                assert status == 200, listed
                mine = [x for x in listed["data"] if x["pid"] == bg["pid"]]
                assert mine and mine[0]["status"] == "running", listed
                first = http(server, "GET", f"/computers/{clone.id}/commands/{bg['pid']}/logs")[1]["stdout"]
                await asyncio.sleep(3)
                later = http(server, "GET", f"/computers/{clone.id}/commands/{bg['pid']}/logs")[1]["stdout"]
                assert later.startswith(first) and len(later.splitlines()) > len(first.splitlines()), (first, later)
            finally:
                await asyncio.to_thread(clone.destroy)
                await proc.kill()
                http(server, "POST", f"/computers/{computer.id}/commands/{bg['pid']}/kill")

    asyncio.run(main())
