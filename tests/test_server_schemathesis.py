"""Property-based fuzzing of every operation in the app's own OpenAPI schema: no input yields a 5xx.

Bounded (a few valid and a few invalid examples per operation) so it stays a smoke test; runs against the
fake engine with no per-token delay.
"""
from __future__ import annotations

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

from tests.live_server import fake_server  # noqa: E402

EXAMPLES = 6


@pytest.fixture(scope="module")
def server():
    with fake_server(step_delay=0.0) as s:
        yield s


def test_schema_fuzz_finds_no_server_error(server):
    raw = httpx.get(server.url + "/openapi.json").json()
    operations = [result.ok() for result in schemathesis.openapi.from_dict(raw).get_all_operations()]
    assert {op.path for op in operations} >= {"/generate", "/generate_stream", "/v1/completions",
                                              "/v1/chat/completions", "/tokenize", "/health"}
    failures: list[str] = []
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case) -> None:
                response = case.call(base_url=server.url, timeout=30)
                if response.status_code >= 500:
                    failures.append(f"{op.method.upper()} {op.path} -> {response.status_code}: "
                                    f"{response.text[:200]} for {case.body!r:.300}")

            try:
                run()
            except Unsatisfiable:  # no invalid variant exists (e.g. GET /health takes no input)
                assert mode is GenerationMode.NEGATIVE
    assert not failures, "\n".join(failures)
    assert httpx.post(server.url + "/generate", json={"inputs": "still serving"}).status_code == 200
