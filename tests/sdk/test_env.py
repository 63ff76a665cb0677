"""The official Python SDK (miosa 2.19.2), unchanged: a computer's environment variables
(`create(env=)`, `start(env=)`, `computer.env`), `computers.update`, commands with a working
directory and stdin (`commands.run_computer`, `helpers.exec_command`), and `resize`."""
import pytest
from miosa import helpers
from miosa.errors import MiosaError, NotFoundError, ResourceStateError, ValidationError


def env_of(computer, *names):
    script = "; ".join(f'echo "{n}=${{{n}-unset}}"' for n in names)
    return dict(line.split("=", 1) for line in computer.exec.bash(script).output.splitlines())


def test_variables_reach_every_exec_persist_and_are_kept_by_a_snapshot(client):
    computer = client.computers.create(name="sdk-env", size="xs", env={"GREETING": "hello world", "PATH": "/opt/x:/usr/bin:/bin"})
    restored = None
    try:
        computer.wait_until_ready(timeout=180)
        assert env_of(computer, "GREETING", "PATH") == {"GREETING": "hello world", "PATH": "/opt/x:/usr/bin:/bin"}
        assert computer.exec.python("import os; print(os.environ['GREETING'])").output == "hello world\n"

        made = computer.env.set("TOKEN", "s3cret=with=equals")
        assert (made["name"], made["value"]) == ("TOKEN", "s3cret=with=equals")
        with pytest.raises(MiosaError) as taken:
            computer.env.set("TOKEN", "again")
        assert taken.value.status_code == 409 and "PATCH" in str(taken.value)
        assert computer.env.update("TOKEN", "v2")["value"] == "v2"
        assert sorted(v["name"] for v in computer.env.list()) == ["GREETING", "PATH", "TOKEN"]
        assert env_of(computer, "TOKEN")["TOKEN"] == "v2"

        with pytest.raises(ValidationError) as bad:
            computer.env.set("1BAD", "x")
        assert "1BAD" in str(bad.value)
        with pytest.raises(NotFoundError):
            computer.env.update("MISSING", "x")
        with pytest.raises(NotFoundError):
            computer.env.delete("MISSING")

        # A snapshot keeps the variables as they are when it is taken.
        snap = computer.checkpoints.create(comment="env")
        computer.env.update("TOKEN", "after-the-snapshot")
        computer.env.delete("GREETING")
        restored = computer.checkpoints.restore(snap.id)
        restored.wait_until_ready(timeout=180)
        assert env_of(restored, "GREETING", "TOKEN") == {"GREETING": "hello world", "TOKEN": "v2"}
        assert env_of(computer, "GREETING", "TOKEN") == {"GREETING": "unset", "TOKEN": "after-the-snapshot"}

        # Kept across stop and start; start(env=) adds and replaces.
        computer.stop()
        computer.start(env={"TOKEN": "from-start", "EXTRA": "1"})
        computer.wait_until_ready(timeout=180)
        assert env_of(computer, "TOKEN", "EXTRA", "PATH") == {
            "TOKEN": "from-start",
            "EXTRA": "1",
            "PATH": "/opt/x:/usr/bin:/bin",
        }
    finally:
        computer.destroy()
        if restored is not None:
            restored.destroy()


def test_update_commands_in_a_directory_and_resize(client):
    computer = client.computers.create(name="sdk-update", size="xs", metadata={"team": "a"})
    try:
        updated = client.computers.update(computer.id, name="sdk-renamed", metadata={"team": "b", "n": 2})
        assert (updated.name, updated.data.metadata) == ("sdk-renamed", {"team": "b", "n": 2})
        assert updated.slug == computer.slug, "the slug, and so preview URLs, stay"
        again = client.computers.get(computer.id)
        assert (again.name, again.data.metadata) == ("sdk-renamed", {"team": "b", "n": 2})
        assert client.computers.update(computer.id, metadata={}).data.metadata == {}
        assert client.computers.get(computer.id).name == "sdk-renamed"
        with pytest.raises(ValidationError):
            client.computers.update(computer.id, name="   ")

        computer.wait_until_ready(timeout=180)
        r = helpers.exec_command(client, computer.id, "pwd; ls", cwd="/etc/apt")
        assert (r.exit_code, r.output.splitlines()[0]) == (0, "/etc/apt"), r
        assert "sources.list.d" in r.output
        ran = client.commands.run_computer(computer.id, "tr a-z A-Z; exit 3", stdin="shout\n", timeout_seconds=30)
        assert (ran["exit_code"], ran["output"]) == (3, "SHOUT\n")
        nowhere = helpers.exec_command(client, computer.id, "pwd", cwd="/no/such/dir")
        assert nowhere.exit_code == 127 and "/no/such/dir is not a directory" in nowhere.stderr, nowhere
        with pytest.raises(ValidationError):
            client.commands.run_computer(computer.id, "true", cwd="relative/dir")

        # Resize: a running computer must be stopped first; a stopped one starts with its new size.
        with pytest.raises(ResourceStateError) as running:
            computer.resize("small")
        assert "stop it" in str(running.value)
        with pytest.raises(ValidationError):
            computer.resize(cpu_count=2)
        computer.stop()
        assert computer.resize(cpu_count=1, memory_mb=512).data.size.value == "small"
        assert client.computers.get(computer.id).data.size.value == "small"
        computer.start()
        computer.wait_until_ready(timeout=180)
        kib = int(computer.exec.bash("awk '/MemTotal/ {print $2}' /proc/meminfo").output)
        assert 300 * 1024 < kib <= 512 * 1024, kib
    finally:
        computer.destroy()
