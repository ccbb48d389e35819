"""`gqa-serve serve`: flags from the config models, uvicorn, and a SIGTERM drain.

server/cli.py wires the subcommand: `add_serve_arguments(subparser)` then `run_serve(args)` (an exit code).
On SIGTERM the server stops admitting (new requests get 503, /health turns 503), lets running requests
finish for up to drain_timeout_s, then aborts the rest (a 503, or an error event on a stream: never a cut
connection) and exits 0. A second SIGTERM aborts them at once.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import ssl
import sys
from types import FrameType
from typing import Any

import uvicorn

from server.config import ConfigError, ServerConfig, field_specs, load_config
from server.state import Phase, ServerState

logger = logging.getLogger("gqa_serve.server")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, metavar="TOML",
                        help="TOML file with [server] and [engine] tables, or a preset name in configs/ "
                             "(env GQA_CONFIG)")
    groups = {"server": parser.add_argument_group("server (env GQA_<FIELD>)"),
              "engine": parser.add_argument_group("engine (env GQA_<FIELD>)")}
    for spec in field_specs():
        group = groups[spec.section]
        if spec.is_bool:
            group.add_argument(spec.flag, dest=spec.name, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=spec.help)
        else:
            group.add_argument(spec.flag, dest=spec.name, default=argparse.SUPPRESS,
                               metavar=spec.name.upper(), help=spec.help)


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("gqa_serve").setLevel(level.upper())


def run_serve(args: argparse.Namespace) -> int:
    names = {spec.name for spec in field_specs()}
    flags = {k: v for k, v in vars(args).items() if k in names}
    try:
        config = load_config(flags, getattr(args, "config", None))
    except ConfigError as exc:
        print(f"gqa-serve serve: invalid configuration: {exc}", file=sys.stderr)
        return 2
    unusable = listen_address_error(config.server.host, config.server.port) or tls_error(config.server)
    if unusable:  # before the model loads (uvicorn binds after the lifespan has started the load)
        print(f"gqa-serve serve: {unusable}", file=sys.stderr)
        return 2
    configure_logging(config.server.log_level)
    from server.app import create_app
    from server.async_engine import AsyncEngine
    from server.engine_process import ProcessEngine
    try:
        engine = ProcessEngine(config.engine, config.server.log_level, config.server.gc_freeze) \
            if uses_engine_process(config) else AsyncEngine(config.engine)
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback
        print(f"gqa-serve serve: cannot create the engine: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return serve_app(create_app(engine, config.server), config.server)


def uses_engine_process(config) -> bool:
    """server.engine_process, or when unset, whether the engine will run on CUDA: there a saturated server's
    HTTP side and step loop contend for one GIL (1.7x the streamed tokens/s in a child process on an H100,
    2026-11-24), while on a CPU the child's steps compete with the HTTP side for the same few cores."""
    if config.server.engine_process is not None:
        return config.server.engine_process
    import torch
    return config.engine.device == "cuda" or (config.engine.device == "auto" and torch.cuda.is_available())


def listen_address_error(host: str, port: int) -> str | None:
    """Why uvicorn could not listen on host:port, or None: tried with a bind of each address it would use."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        return f"server.host: cannot resolve {host!r}: {exc}"
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
            try:
                sock.bind(address)
            except OSError as exc:
                return f"server.port: cannot listen on {host}:{port}: {exc.strerror or exc}"
    return None


def tls_error(config: ServerConfig) -> str | None:
    """Why the HTTPS files cannot serve, or None: loaded here as uvicorn will, so a wrong path or a key that
    does not match its certificate is one line naming the setting before the model loads, not a traceback
    after it."""
    if config.ssl_certfile is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    password = config.ssl_keyfile_password
    try:  # (a callable, so an encrypted key without its password fails here instead of prompting on the tty)
        context.load_cert_chain(config.ssl_certfile, config.ssl_keyfile,
                                password=lambda: password.get_secret_value() if password is not None else b"")
    except (OSError, ssl.SSLError) as exc:
        missing = next((f"{name}: no such file {path!r}" for name, path in
                        (("ssl_certfile", config.ssl_certfile), ("ssl_keyfile", config.ssl_keyfile))
                        if not os.path.isfile(path)), None)
        if missing:
            return f"server.{missing}"
        try:
            with open(config.ssl_keyfile, "rb") as key:
                encrypted = b"ENCRYPTED" in key.read(4096)  # PKCS#8's and OpenSSL's headers say so
        except OSError as why:
            return f"server.ssl_keyfile: cannot read {config.ssl_keyfile!r}: {why.strerror or why}"
        if encrypted:
            if password is None:
                return "server.ssl_keyfile_password: ssl_keyfile is encrypted; give its password"
            if "MISMATCH" not in str(exc).upper():  # (a wrong password is only "PEM lib" to OpenSSL)
                return f"server.ssl_keyfile_password: cannot decrypt ssl_keyfile with it: {exc}"
        return f"server.ssl_certfile: cannot load the certificate and ssl_keyfile's key: {exc}"
    if config.ssl_ca_certs is not None:
        try:
            context.load_verify_locations(cafile=config.ssl_ca_certs)
        except (OSError, ssl.SSLError) as exc:
            return f"server.ssl_ca_certs: cannot load {config.ssl_ca_certs!r}: {exc}"
    return None


def serve_app(app: Any, config: ServerConfig) -> int:
    """Run `app` (from create_app) until SIGTERM has drained it or SIGINT stops it; returns the exit code."""
    tls = {} if config.ssl_certfile is None else dict(
        ssl_certfile=config.ssl_certfile, ssl_keyfile=config.ssl_keyfile, ssl_ca_certs=config.ssl_ca_certs,
        ssl_keyfile_password=config.ssl_keyfile_password and config.ssl_keyfile_password.get_secret_value(),
        ssl_cert_reqs=ssl.CERT_NONE if config.ssl_ca_certs is None else ssl.CERT_REQUIRED)
    uv_config = uvicorn.Config(app, host=config.host, port=config.port, lifespan="on", access_log=False,
                               log_level=config.log_level, timeout_graceful_shutdown=5, http=config.http_parser,
                               **tls)
    server = DrainingServer(uv_config, app.state.server, config.drain_timeout_s)
    try:
        server.run()
    except KeyboardInterrupt:
        return 130
    return server.exit_code


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState, drain_timeout_s: float):
        super().__init__(config)
        self.state = state
        self.drain_timeout_s = drain_timeout_s
        self.exit_code = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_requested = False
        self._drain_task: asyncio.Task | None = None

    async def startup(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)
        for server in self.servers:
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                logger.info("listening on %s://%s:%d (model loading in the background)",
                            "https" if self.config.is_ssl else "http", host, port)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and self._loop is not None and not self.should_exit:
            # not recorded as captured: a drained server exits 0
            self._loop.call_soon_threadsafe(self._end_drain if self._drain_requested else self._start_drain)
            self._drain_requested = True
            return
        super().handle_exit(sig, frame)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain())

    def _end_drain(self) -> None:
        """A second SIGTERM: stop waiting for the requests in flight."""
        if self._drain_task is not None and not self._drain_task.done():
            self._drain_task.cancel()
            asyncio.ensure_future(self._abort_in_flight("a second SIGTERM"))

    async def _drain(self) -> None:
        stats = self.state.stats()
        running = (stats.num_running + stats.num_waiting) if stats is not None else 0
        logger.info("SIGTERM: draining: refusing new requests, waiting up to %.0fs for %d in flight",
                    self.drain_timeout_s, running)
        self.state.begin_drain()
        if self.state.loaded.is_set() and self.state.load_error is None:
            if await self.state.engine.wait_idle(self.drain_timeout_s):
                logger.info("drain complete")
            else:
                await self._abort_in_flight("the drain timed out")
                return
        self.should_exit = True

    async def _abort_in_flight(self, why: str) -> None:
        """Abort what is left through the engine, so each request is answered (503, or an error event that
        ends its stream) before uvicorn closes the connections; then exit."""
        engine = self.state.engine
        if self.state.loaded.is_set() and self.state.load_error is None:
            logger.warning("%s: aborting the %d requests in flight", why, engine.abort_all())
            await engine.wait_idle(5.0)
            await asyncio.sleep(0.2)  # the aborted outputs reach their handlers, which send the last bytes
        self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self.state.phase is Phase.FAILED and not self.should_exit:
            logger.error("exiting: the model failed to load (%s)", self.state.load_error)
            self.exit_code = 1
            self.should_exit = True
        return await super().on_tick(counter)
