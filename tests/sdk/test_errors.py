"""The official SDK (miosa 2.19.2) raises its specific exception classes for our errors: the
platform answers with the SDK's own upper-case codes, which `miosa/errors.py` maps to classes
(a 409 alone would only be a bare `MiosaError`)."""
import time

import pytest
from miosa.errors import (
    NotFoundError,
    SnapshotInUseError,
    SnapshotNotReadyError,
    ValidationError,
)

from conftest import Server


def test_errors_carry_the_sdks_codes_and_raise_its_classes():
    from miosa import Miosa

    # A bytes-stored quota no snapshot fits: snapshots are admitted, then fail for good.
    server = Server("--max-stored-gib", "0.00001")
    try:
        client = Miosa(api_key=server.key, base_url=server.base_url)
        with pytest.raises(NotFoundError) as e:
            client.computers.get("00000000-0000-0000-0000-000000000000")
        assert e.value.code == "COMPUTER_NOT_FOUND"

        computer = client.computers.create(name="errors", size="xs")
        computer.wait_until_ready(timeout=180)
        checkpoints = client.computers.get(computer.id).checkpoints

        with pytest.raises(ValidationError) as e:
            checkpoints.create(comment="x" * 501)
        assert e.value.code == "VALIDATION_FAILED"

        # Deleting a snapshot still being taken: SNAPSHOT_IN_USE.
        snap = checkpoints.create(comment="in use")
        with pytest.raises(SnapshotInUseError) as e:
            checkpoints.delete(snap.id)
        assert e.value.status_code == 409

        # It fails on the quota; restoring a failed snapshot: SNAPSHOT_NOT_READY.
        deadline = time.monotonic() + 180
        while checkpoints.get(snap.id).status not in ("ready", "failed"):
            assert time.monotonic() < deadline, "the snapshot never settled"
            time.sleep(0.2)
        failed = checkpoints.get(snap.id)
        assert failed.status == "failed" and "quota" in (failed.error or ""), failed
        with pytest.raises(SnapshotNotReadyError) as e:
            checkpoints.restore(snap.id)
        assert e.value.code == "SNAPSHOT_NOT_READY" and "not ready" in e.value.message
        computer.destroy()
    finally:
        server.stop()
