"""ProcessEngine (`engine_process`): what only a child process can get wrong. The shared behaviour (streams,
abort, admission, one wake-up per step) runs against both engines in test_async_engine.py."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys

import httpx
import pytest

from server.engine_config import EngineConfig
from server.engine_process import ProcessEngine
from server.llm import LLM
from server.outputs import EngineDeadError, OverloadedError
from server.sampling_params import SamplingParams

CFG = dict(dtype="float32", device="cpu", kv_cache_memory="2MiB", max_num_batched_tokens=64)


async def collect(stream):
    return [out async for out in stream]


def test_a_killed_child_fails_every_stream_and_refuses_new_requests(tiny_llama_dir):
    """Also: the reason carries the child's real exit status, and the stats stop claiming the dead child's
    sequences and KV blocks (/metrics would show them running forever) while keeping its counters."""
    engine = ProcessEngine(EngineConfig(model=str(tiny_llama_dir), **CFG), gc_freeze=False)
    engine.start()
    assert engine.child_gc_frozen == 0
    params = SamplingParams(temperature=0.0, max_new_tokens=400, ignore_eos=True)

    async def main():
        streams = [engine.add_request(f"k{i}", [1, 5 + i, 6], params) for i in range(3)]
        first = await streams[0].__anext__()
        busy = engine.stats()  # the child's stats of the step that made `first`
        os.kill(engine._process.pid, signal.SIGKILL)
        rest = await asyncio.wait_for(asyncio.gather(*(collect(s) for s in streams)), 10)
        return first, busy, rest
    try:
        first, busy, rest = asyncio.run(main())
        assert not first.finished
        assert busy.num_running >= 1 and busy.kv_cache_usage > 0 and busy.num_steps > 0
        for outs in rest:
            assert outs[-1].finished and outs[-1].finish_reason == "error"
            assert "engine process exited (code -9" in outs[-1].error
        s = engine.stats()
        assert (s.num_running, s.num_waiting, s.kv_cache_usage) == (0, 0, 0.0)
        assert s.num_free_blocks == s.num_total_blocks == busy.num_total_blocks
        assert s.num_steps >= busy.num_steps
        assert not engine.is_alive
        with pytest.raises(EngineDeadError, match="engine process exited"):
            engine.add_request("late", [1, 5], params)
        engine.abort("k1")  # a client leaving after the child died: the broken pipe is not the caller's error
    finally:
        engine.shutdown()


# run as a script: only a process of its own can show that it exits without shutdown() (multiprocessing's atexit
# would terminate() the child, which ignores SIGTERM now, then join it forever)
SIGTERM_TO_THE_CHILD = """
import asyncio, json, os, signal, sys
from server.engine_config import EngineConfig
from server.engine_process import ProcessEngine
from server.sampling_params import SamplingParams

async def generate(engine):
    params = SamplingParams(temperature=0.0, max_new_tokens=5, ignore_eos=True)
    return [out async for out in engine.add_request("t", [1, 5, 6], params)]

engine = ProcessEngine(EngineConfig(model=sys.argv[1], **json.loads(sys.argv[2])), gc_freeze=False)
engine.start()
os.kill(engine._process.pid, signal.SIGTERM)
outs = asyncio.run(generate(engine))
print(engine._process.pid, len(outs), outs[-1].finish_reason, outs[-1].error, flush=True)
"""


def test_the_child_ignores_sigterm_and_the_parent_still_stops_it_at_exit(tiny_llama_dir):
    """A supervisor's SIGTERM to the whole process group (systemd's KillMode=control-group) must leave the
    child serving, so the parent's drain can finish the requests in flight; the parent decides when it stops."""
    done = subprocess.run([sys.executable, "-c", SIGTERM_TO_THE_CHILD, str(tiny_llama_dir), json.dumps(CFG)],
                          capture_output=True, text=True, timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert done.returncode == 0, done.stderr[-3000:]
    pid, count, reason, error = done.stdout.strip().split(maxsplit=3)
    assert (count, reason, error) == ("5", "length", "None")
    assert not os.path.exists(f"/proc/{pid}")  # stopped and reaped before the parent exited


def test_shutdown_kills_a_child_that_does_not_stop(tiny_llama_dir):
    """A stopped (SIGSTOP) or stuck child never reads "stop", and SIGTERM does not end it: shutdown kills it
    (else the parent hangs at exit, multiprocessing's atexit joining its daemonic child without a timeout)."""
    engine = ProcessEngine(EngineConfig(model=str(tiny_llama_dir), **CFG), gc_freeze=False)
    engine.start()
    child = engine._process
    os.kill(child.pid, signal.SIGSTOP)
    try:
        engine.shutdown()
        assert not child.is_alive() and child.exitcode == -signal.SIGKILL
        assert not engine._thread.is_alive()
    finally:
        if child.is_alive():  # left behind (the old shutdown): not to hang pytest at exit
            child.kill()
            child.join()


def test_a_model_that_does_not_load_is_reported_by_start(tmp_path):
    engine = ProcessEngine(EngineConfig(model=str(tmp_path / "missing"), **CFG))
    with pytest.raises(RuntimeError, match="FileNotFoundError: model: .*missing is not a directory"):
        engine.start()
    assert not engine.is_alive


def test_the_waiting_bound_counts_adds_still_in_the_pipe(tiny_llama_dir):
    """One running sequence at a time and room for 2 waiting: whatever the child has seen yet, the 4th add
    finds 2 ahead of it (waiting, or sent and not yet applied) and is refused."""
    engine = ProcessEngine(EngineConfig(model=str(tiny_llama_dir), max_num_seqs=1, max_waiting_requests=2, **CFG))
    engine.start()
    assert engine.child_gc_frozen > 1000  # the child froze its start-up objects (imports, model)
    params = SamplingParams(temperature=0.0, max_new_tokens=30, ignore_eos=True)

    async def main():
        streams, refused = [], []
        for i in range(4):
            try:
                streams.append(engine.add_request(f"w{i}", [1, 5 + i, 6], params))
            except OverloadedError:
                refused.append(i)
        s = engine.stats()  # the adds still in the pipe show as waiting (the gauge missed them)
        assert s.num_running + s.num_waiting == len(streams)
        outs = await asyncio.wait_for(asyncio.gather(*(collect(s) for s in streams)), 30)
        return refused, outs
    try:
        refused, outs = asyncio.run(main())
        assert 3 in refused and 0 not in refused and 1 not in refused
        assert all(len(o) == 30 and o[-1].finish_reason == "length" for o in outs)
        assert engine.stats().admission_rejections_total == len(refused)
    finally:
        engine.shutdown()
    assert not engine._process.is_alive()


def test_server_with_engine_process_answers_like_the_offline_engine(tiny_llama_dir):
    from server.app import create_app
    from server.config import ServerConfig
    from tests.live_server import LiveServer

    prompt = "To be, or not to be"
    want = LLM(str(tiny_llama_dir), **CFG).generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=12))
    engine = ProcessEngine(EngineConfig(model=str(tiny_llama_dir), **CFG))
    config = ServerConfig(stats_log_interval_s=0, engine_process=True)
    with LiveServer(create_app(engine, config)) as srv:
        r = httpx.post(srv.url + "/generate", json={"inputs": prompt, "parameters": {"max_new_tokens": 12}})
        assert r.status_code == 200 and r.json()["generated_text"] == want[0].text
        r = httpx.post(srv.url + "/generate", json={"inputs": prompt, "parameters": {"max_new_tokens": 10**6}})
        assert r.status_code in (400, 422) and "max_new_tokens" in r.text
        metrics = httpx.get(srv.url + "/metrics").text
        assert "gqaserve_generation_tokens_total 12.0" in metrics
        assert 'gqaserve_engine_steps_total{path="eager"} 12.0' in metrics  # CPU: no graphs; 1 prefill + 11
        # a grammar is checked by the parent and matched in the child (its params cross the pipe)
        grammar = {"type": "regex", "value": "(yes|no)!"}
        r = httpx.post(srv.url + "/generate", json={"inputs": prompt, "parameters": {"grammar": grammar}})
        assert r.status_code == 200 and r.json()["generated_text"] in ("yes!", "no!")
        grammar["value"] = "(yes"
        r = httpx.post(srv.url + "/generate", json={"inputs": prompt, "parameters": {"grammar": grammar}})
        assert r.status_code == 422 and r.json()["error"].startswith("parameters.grammar: not a valid regex")
        child = engine._process
    assert not child.is_alive()


class Boom(RuntimeError):
    pass


def _engine_in_a_thread(config, break_child):
    """A ProcessEngine wired by pipes to `serve_engine` on a thread: the child's code, a fault injected into
    its LLMEngine (a spawned child would load its own and could not be broken from here)."""
    import multiprocessing
    import threading

    from server.engine import LLMEngine
    from server.engine_process import serve_engine
    child = LLMEngine(config)
    break_child(child)
    commands, commands_out = multiprocessing.Pipe(duplex=False)
    results, results_in = multiprocessing.Pipe(duplex=False)
    engine = ProcessEngine(config)
    engine._process = threading.Thread(target=serve_engine, args=(child, commands, results_in), daemon=True)
    engine._commands_out, engine._results = commands_out, results
    engine._process.start()
    engine._connect(tokenizer=None)
    return engine, child


def _fail_launches(child):
    child.runner.launch = lambda sched: (_ for _ in ()).throw(Boom("device lost"))


def _fail_the_loop(child):
    child.step = lambda: (_ for _ in ()).throw(Boom("scheduler state broken"))


@pytest.mark.parametrize("break_child, reason, requests_before_death", [
    (_fail_launches, "3 engine steps failed in a row", 3),
    (_fail_the_loop, "Boom: scheduler state broken", 1)])
def test_a_child_that_stops_stepping_says_why_and_the_parent_refuses_new_requests(
        tiny_llama_dir, break_child, reason, requests_before_death):
    """Step failures: each fails its own request (the engine goes on), the 3rd in a row ends the child's loop
    with a "dead" message. A loop that raises ends with its exception. Either way every open stream ends
    with the reason, and new requests get EngineDeadError naming it."""
    engine, child = _engine_in_a_thread(EngineConfig(model=str(tiny_llama_dir), **CFG), break_child)
    params = SamplingParams(temperature=0.0, max_new_tokens=5)

    async def main():
        # one at a time: each failing step is a step of its own (3 added together would fail in one step)
        return [await asyncio.wait_for(collect(engine.add_request(f"d{i}", [1, 5 + i], params)), 10)
                for i in range(requests_before_death)]
    try:
        outs = asyncio.run(main())
        assert [o[-1].finish_reason for o in outs] == ["error"] * requests_before_death
        assert all(len(o) == 1 for o in outs)  # no token went out before the error
        engine._process.join(timeout=10)
        assert not engine._process.is_alive()  # the child's loop returned
        assert engine._thread.join(timeout=10) is None and not engine._thread.is_alive()
        assert not engine.is_alive and engine._dead == reason
        if requests_before_death == 3:  # the first two failures are the requests' own, reported as such
            assert all("device lost" in o[-1].error for o in outs)
            assert child.counters.failed_steps_in_a_row == 3
        else:
            assert outs[0][-1].error == reason
        with pytest.raises(EngineDeadError, match=reason):
            engine.add_request("late", [1, 5], params)
    finally:
        engine.shutdown()
