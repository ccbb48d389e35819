"""Run an ASGI app under a real uvicorn on a loopback port, in a background thread (for tests)."""
from __future__ import annotations

import threading
import time

import httpx
import uvicorn


class LiveServer:
    def __init__(self, app, *, ready: bool = True):
        self.app = app
        self.wait_ready = ready
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on",
                                timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = ""

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        if self.wait_ready:
            self.wait_healthy()
        return self

    def wait_healthy(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if httpx.get(self.url + "/health").status_code == 200:
                return
            time.sleep(0.02)
        raise RuntimeError("server never became healthy")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


def fake_server(config=None, *, engine_config=None, **engine_kwargs) -> LiveServer:
    """A LiveServer around a FakeAsyncEngine (tests/fake_engine.py)."""
    from server.app import create_app
    from server.config import ServerConfig
    from tests.fake_engine import FakeAsyncEngine

    engine = FakeAsyncEngine(engine_config, **engine_kwargs)
    server = LiveServer(create_app(engine, config or ServerConfig(stats_log_interval_s=0)))
    server.engine = engine
    return server


def metric(url: str, name: str) -> float:
    """One unlabelled sample from /metrics."""
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def engine_server(model_dir, kv_cache_memory: str = "2MiB", server_config=None, **engine_config) -> LiveServer:
    """The real engine (CPU, float32) on `model_dir` behind the app, as a LiveServer context manager;
    `.engine` is the AsyncEngine."""
    from server.app import create_app
    from server.async_engine import AsyncEngine
    from server.config import ServerConfig
    from server.engine_config import EngineConfig
    engine = AsyncEngine(EngineConfig(model=str(model_dir), device="cpu", dtype="float32",
                                      kv_cache_memory=kv_cache_memory, **engine_config))
    server = LiveServer(create_app(engine, server_config or ServerConfig(stats_log_interval_s=0)))
    server.engine = engine
    return server
