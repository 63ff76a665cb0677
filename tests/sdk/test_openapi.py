"""The OpenAPI document at /api/v1/openapi.json, checked against the live server by schemathesis:
no 5xx, and every status code, content type and body (SSE events included) as the document says.
The port proxy is left out: what it answers is whatever a program in the guest answers (any
status, type and body), and a port nothing listens on is a 502 by design; its own answers are
checked by the network tests."""
import json
import os
import subprocess
import sys
import urllib.request

from conftest import Server

ST = os.path.join(os.path.dirname(sys.executable), "st")


def test_the_document_describes_every_route():
    # A server of its own, lending 1 GiB at most: the fuzzer creates real computers.
    server = Server("--capacity-mib", "1024", "--rate-limit", "0")
    try:
        with urllib.request.urlopen(server.base_url + "/openapi.json") as r:
            assert r.headers["content-type"].startswith("application/json")
            spec = json.load(r)
        assert spec["openapi"].startswith("3.")
        ops = {(m.upper(), p) for p, item in spec["paths"].items() for m in item}
        # The seed's endpoints and the SDK's are all there.
        for op in [
            ("POST", "/api/v1/computers/{id}/snapshots"),
            ("GET", "/api/v1/computers/{id}/snapshots"),
            ("GET", "/api/v1/computers/{id}/snapshots/{snap_id}"),
            ("DELETE", "/api/v1/computers/{id}/snapshots/{snap_id}"),
            ("POST", "/api/v1/computers/{id}/restore/{snap_id}"),
            ("GET", "/api/v1/computers/{id}/snapshots/{snap_id}/events"),
            ("POST", "/api/v1/computers"),
            ("POST", "/api/v1/computers/{id}/exec"),
            ("POST", "/api/v1/computers/{id}/clone"),
            ("POST", "/api/v1/sse/ticket"),
        ]:
            assert op in ops, op
        ids = [op["operationId"] for item in spec["paths"].values() for op in item.values()]
        assert len(ids) == len(set(ids)), "operation ids are unique"

        run = subprocess.run(
            [
                ST, "run", server.base_url + "/openapi.json",
                "-H", f"Authorization: Bearer {server.key}",
                "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
                "response_schema_conformance",
                "--phases", "examples,fuzzing",
                "--max-examples", "30",
                "--workers", "2",
                "--request-timeout", "60",
                "--seed", "1",
                "--exclude-path-regex", r"/ports/\{port\}/proxy",
            ],
            capture_output=True, text=True, timeout=900,
        )
        print(run.stdout[-6000:])
        assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
        assert " passed" in run.stdout
    finally:
        server.stop()
