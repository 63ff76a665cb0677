"""The official Python SDK (miosa 2.19.2), unchanged: ports and preview URLs of a guest's own
HTTP server, and a computer's egress policy. Every request goes to the server the suite
started, on loopback (a preview host `*.localhost` is sent there with its Host header)."""
import http.client
import os
import urllib.parse

import pytest
from miosa.errors import MiosaError


def fetch(url, headers=None):
    """GET `url` from the platform's loopback listener, as a browser resolving *.localhost
    to loopback would: (status, body)."""
    u = urllib.parse.urlsplit(url)
    port = u.port or 80
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    target = (u.path or "/") + (f"?{u.query}" if u.query else "")
    conn.request("GET", target, headers={"Host": u.netloc, **(headers or {})})
    r = conn.getresponse()
    return r.status, r.read().decode()


def test_ports_and_preview_urls_with_the_official_sdk(client):
    computer = client.computers.create(name="sdk-web", size="xs")
    try:
        computer.wait_until_ready(timeout=180)
        r = computer.exec.bash(
            f"mkdir -p /srv && echo {computer.id} > /srv/who.txt && cd /srv && "
            "(setsid nohup python3 -m http.server 8000 >/dev/null 2>&1 &) && "
            "for i in $(seq 100); do (echo > /dev/tcp/127.0.0.1/8000) 2>/dev/null && echo up && break; sleep 0.1; done"
        )
        assert r.output.strip() == "up", r.output

        made = computer.ports.create(8000, name="web")
        assert (made["port"], made["visibility"], made["name"]) == (8000, "private", "web")
        assert made["url"].startswith("http://8000-") and ".sandbox.localhost:" in made["url"]
        assert [p["port"] for p in computer.ports.list()] == [8000]
        assert computer.ports.get(8000)["url"] == made["url"]

        # Private: refused without credentials, served with the signed link.
        status, _ = fetch(made["url"] + "who.txt")
        assert status == 401
        signed = urllib.parse.urlsplit(made["signed_url"])
        status, body = fetch(made["url"] + "who.txt?" + signed.query)
        assert (status, body.strip()) == (200, computer.id)

        # Public: anyone with the URL; listed among the computer's URLs.
        public = computer.ports.update(8000, visibility="public")
        assert public["public"] is True
        status, body = fetch(public["url"] + "who.txt")
        assert (status, body.strip()) == (200, computer.id)
        assert [u["port"] for u in computer.urls()] == [8000]

        computer.ports.delete(8000)
        assert computer.ports.list() == []
        status, _ = fetch(public["url"] + "who.txt")
        assert status in (401, 404)
    finally:
        computer.destroy()


@pytest.mark.skipif(os.geteuid() != 0, reason="egress policies need the platform's own networks (root)")
def test_a_computers_egress_policy_with_the_official_sdk(client):
    computer = client.computers.create(name="sdk-policy", size="xs")
    try:
        policy = computer.network_policy.get()
        assert (policy.default_effect.value, policy.rules) == ("allow", [])

        stored = computer.network_policy.set(
            default_effect="deny",
            rules=[{"effect": "allow", "destination": "192.0.2.0/24", "ports": "443", "protocol": "tcp"}],
        )
        assert stored.default_effect.value == "deny"
        assert stored.rules[0].destination == "192.0.2.0/24" and stored.rules[0].ports == "443"
        assert stored.computer_id == computer.id and stored.updated_at is not None
        assert computer.network_policy.get().rules == stored.rules

        with pytest.raises(MiosaError) as err:
            computer.network_policy.set(rules=[{"effect": "deny", "destination": "metadata.google.internal"}])
        assert err.value.status_code == 422
        assert "not an IPv4 address" in err.value.message

        computer.network_policy.reset()
        computer.network_policy.reset()
        assert computer.network_policy.get().rules == []
    finally:
        computer.destroy()
