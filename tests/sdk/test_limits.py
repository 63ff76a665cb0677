"""The official SDK against the request rate: it gets 429 with Retry-After, backs off, and
every call then succeeds."""
import time
import urllib.error
import urllib.request

from conftest import Server


def test_the_sdk_backs_off_on_429_and_then_succeeds():
    from miosa import Miosa

    server = Server("--rate-limit", "2")  # 2 requests a second, bursts of 4
    try:
        # Raw: a burst beyond the limit is answered 429 with Retry-After.
        statuses, retry_after = [], None
        for _ in range(8):
            req = urllib.request.Request(
                server.base_url + "/computers", headers={"Authorization": f"Bearer {server.key}"}
            )
            try:
                with urllib.request.urlopen(req) as r:
                    statuses.append(r.status)
            except urllib.error.HTTPError as e:
                statuses.append(e.code)
                retry_after = e.headers.get("Retry-After")
        assert 429 in statuses, statuses
        assert retry_after is not None and int(retry_after) >= 1
        time.sleep(3)

        client = Miosa(api_key=server.key, base_url=server.base_url)
        started = time.monotonic()
        for _ in range(12):
            assert client.computers.list() == []
        elapsed = time.monotonic() - started
        # 12 calls at 2/s after a burst of 4 cannot all pass at once: the SDK waited.
        assert elapsed >= 2.5, elapsed
    finally:
        server.stop()
