"""AsyncEngine (and ProcessEngine, its child-process twin) on the tiny model: streams, abort, admission, drain,
failures, shutdown."""
import asyncio

import pytest

from server.async_engine import AsyncEngine
from server.llm import LLM
from server.engine_config import EngineConfig
from server.outputs import AdmissionError, EngineDeadError, OverloadedError
from server.sampling_params import SamplingParams

CFG = dict(dtype="float32", device="cpu", kv_cache_memory="2MiB", max_num_batched_tokens=64)


@pytest.fixture(scope="module", params=["thread", "process"])
def engine(tiny_llama_dir, request):
    """The engine loop on a thread (AsyncEngine) or in a child process (ProcessEngine, engine_process)."""
    from server.engine_process import ProcessEngine
    kind = AsyncEngine if request.param == "thread" else ProcessEngine
    e = kind(EngineConfig(model=str(tiny_llama_dir), max_waiting_requests=8, **CFG))
    e.start()
    e.start()  # idempotent
    yield e
    e.shutdown()


async def collect(stream):
    return [out async for out in stream]


def test_streaming_deltas_concatenate_to_the_offline_text(engine, tiny_llama_dir):
    prompts = [engine.tokenizer.encode(t) for t in ("To be, or not", "My lord", "What say you")]
    params = SamplingParams(temperature=0.0, max_new_tokens=20, stop=("e t",))
    want = LLM(str(tiny_llama_dir), **CFG).generate(prompts, params)

    async def main():
        streams = [engine.add_request(f"s{i}", p, params) for i, p in enumerate(prompts)]
        return await asyncio.gather(*(collect(s) for s in streams))
    for outs, w in zip(asyncio.run(main()), want):
        assert outs[-1].finished and all(not o.finished for o in outs[:-1])
        assert "".join(o.new_text for o in outs) == w.text
        assert [t for o in outs for t in o.new_token_ids] == w.token_ids
        assert outs[-1].finish_reason == w.finish_reason
    s = engine.stats()
    assert s.num_running == s.num_waiting == 0 and s.generation_tokens_total >= 3 and s.num_steps > 0
    assert engine.is_alive and engine.kv_capacity.num_blocks == s.num_total_blocks


def test_one_wakeup_of_the_event_loop_per_step_not_per_output(engine):
    """Each step's outputs cross to the event loop in one call_soon_threadsafe (a lock and a pipe write
    each), however many requests produced a token in it."""
    params = SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True)

    async def main():
        loop = asyncio.get_running_loop()
        calls = []
        original = loop.call_soon_threadsafe

        def counting(callback, *args, **kw):
            calls.append(callback)
            return original(callback, *args, **kw)
        loop.call_soon_threadsafe = counting
        steps0 = engine.stats().num_steps
        streams = [engine.add_request(f"w{i}", [1, 5 + i, 6, 7], params) for i in range(6)]
        outs = await asyncio.gather(*(collect(s) for s in streams))
        await engine.wait_idle(5.0)
        return outs, len(calls), engine.stats().num_steps - steps0
    outs, wakeups, steps = asyncio.run(main())
    assert all(len(o) == 12 and o[-1].finished for o in outs)  # 72 outputs in all
    assert 0 < wakeups <= steps


def test_sse_writes_outputs_queued_in_the_stream_together(engine):
    """outputs_ready sees a request's queued outputs, so a response that fell behind writes them at once."""
    from server.sse import EventStreamResponse
    params = SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True)

    async def main():
        stream = engine.add_request("behind", [1, 5, 6, 7], params)
        assert await engine.wait_idle(5.0)
        await asyncio.sleep(0.05)  # the engine thread's deliveries run on this loop
        assert engine.outputs_ready(["behind"]) and not engine.outputs_ready(["unknown"])

        async def events():
            async for out in stream:
                yield f"data: {out.new_token_ids}\n\n"
        sent = []

        async def send(message):
            sent.append(message)
        await EventStreamResponse(events(), lambda: engine.outputs_ready(["behind"])).stream_response(send)
        return [m["body"] for m in sent if m["type"] == "http.response.body" and m["body"]]
    writes = asyncio.run(main())
    assert len(writes) == 1 and writes[0].count(b"data: [") == 8


def test_abort_frees_blocks_and_ends_the_stream(engine):
    async def main():
        stream = engine.add_request("ab", [1, 5, 6, 7], SamplingParams(max_new_tokens=400, ignore_eos=True))
        first = await stream.__anext__()
        engine.abort("ab")
        engine.abort("ab")
        rest = await collect(stream)
        assert await engine.wait_idle(5.0)
        return first, rest
    first, rest = asyncio.run(main())
    assert not first.finished and rest[-1].finish_reason == "abort"
    s = engine.stats()
    assert s.num_free_blocks == s.num_total_blocks and s.kv_cache_usage == 0.0


def test_admission_refusals(engine):
    async def main():
        with pytest.raises(AdmissionError) as e:
            engine.add_request("big", [1] * 10, SamplingParams(max_new_tokens=10_000))
        assert e.value.field == "max_new_tokens"
        with pytest.raises(AdmissionError, match="outside the vocabulary"):
            engine.add_request("oov", [1, engine.model_config.vocab_size], SamplingParams(max_new_tokens=2))
        stream = engine.add_request("dup", [1, 5], SamplingParams(max_new_tokens=2))
        with pytest.raises(ValueError, match="duplicate"):
            engine.add_request("dup", [1, 5], SamplingParams(max_new_tokens=2))
        await collect(stream)
    asyncio.run(main())
    assert engine.stats().admission_rejections_total >= 2


def test_overload_and_drain(tiny_llama_dir):
    import threading
    e = AsyncEngine(EngineConfig(model=str(tiny_llama_dir), max_waiting_requests=2, **CFG))
    e.start()
    runner, real = e.engine.runner, e.engine.runner.launch
    entered, release = threading.Event(), threading.Event()

    def gated(sched):  # hold the engine thread inside a step so the queue fills deterministically
        entered.set()
        release.wait(10)
        return real(sched)
    runner.launch = gated

    async def main():
        streams = [e.add_request("o0", [1, 5, 6], SamplingParams(max_new_tokens=30, ignore_eos=True))]
        assert entered.wait(10)
        streams += [e.add_request(f"o{i}", [1, 5, 6], SamplingParams(max_new_tokens=30, ignore_eos=True)) for i in (1, 2)]
        with pytest.raises(OverloadedError):
            e.add_request("o3", [1, 5, 6], SamplingParams(max_new_tokens=30, ignore_eos=True))
        e.begin_drain()
        with pytest.raises(OverloadedError, match="draining"):
            e.add_request("late", [1, 5], SamplingParams())
        release.set()
        results = await asyncio.gather(*(collect(s) for s in streams))
        assert all(r[-1].finish_reason == "length" for r in results)
        assert await e.wait_idle(5.0)
    asyncio.run(main())
    assert e.stats().admission_rejections_total == 1
    e.shutdown()
    assert not e.is_alive
    with pytest.raises(EngineDeadError):
        e.add_request("x", [1], SamplingParams())


class Boom(RuntimeError):
    pass


def test_failing_step_fails_its_requests_and_engine_survives(tiny_llama_dir):
    e = AsyncEngine(EngineConfig(model=str(tiny_llama_dir), **CFG))
    e.start()
    runner = e.engine.runner
    real = runner.launch
    calls = {"n": 0}

    def flaky(sched):
        calls["n"] += 1
        if calls["n"] == 2:
            raise Boom("bad request")
        return real(sched)
    runner.launch = flaky

    async def main():
        bad = await collect(e.add_request("bad", [1, 5, 6], SamplingParams(max_new_tokens=5)))
        good = await collect(e.add_request("good", [1, 5, 6], SamplingParams(max_new_tokens=5)))
        return bad, good
    bad, good = asyncio.run(main())
    assert bad[-1].finish_reason == "error" and "bad request" in bad[-1].error
    assert good[-1].finish_reason == "length" and e.is_alive
    assert e.stats().num_free_blocks == e.stats().num_total_blocks

    runner.launch = lambda sched: (_ for _ in ()).throw(Boom("device lost"))

    async def doomed():
        return [await collect(e.add_request(f"d{i}", [1, 5], SamplingParams())) for i in range(3)]
    outs = asyncio.run(doomed())
    assert all(o[-1].finish_reason == "error" for o in outs)
    assert not e.is_alive
    with pytest.raises(EngineDeadError):
        e.add_request("after", [1], SamplingParams())
    e.shutdown()


def test_overlap_scheduling_behind_the_async_engine(tiny_llama_dir):
    """Streams, stop strings and an abort with decode steps launched ahead of the host (the graph path with
    the eager model as replay, as on CPU): the same deltas as the synchronous offline engine, no leak."""
    from model.tokenizer import Tokenizer
    from server.model_runner import ModelRunner
    config = EngineConfig(model=str(tiny_llama_dir), overlap_scheduling=True, **CFG)
    runner = ModelRunner(config, str(tiny_llama_dir))
    runner.use_graph_path_eagerly()
    e = AsyncEngine(config)
    e.start(runner=runner, tokenizer=Tokenizer.from_pretrained(str(tiny_llama_dir)))
    try:
        prompts = [e.tokenizer.encode(t) for t in ("To be, or not", "My lord", "What say you", "Now is")]
        params = SamplingParams(temperature=0.0, max_new_tokens=40, stop=("e t",))
        want = LLM(str(tiny_llama_dir), **CFG).generate(prompts, params)

        async def main():
            streams = [e.add_request(f"o{i}", p, params) for i, p in enumerate(prompts)]
            victim = e.add_request("victim", [1, 5, 6, 7], SamplingParams(max_new_tokens=400, ignore_eos=True))
            await victim.__anext__()
            await victim.__anext__()
            e.abort("victim")
            rest = await collect(victim)
            outs = await asyncio.gather(*(collect(s) for s in streams))
            assert await e.wait_idle(5.0)
            return outs, rest
        outs, rest = asyncio.run(main())
        assert rest[-1].finish_reason == "abort"
        for got, w in zip(outs, want):
            assert "".join(o.new_text for o in got) == w.text
            assert [t for o in got for t in o.new_token_ids] == w.token_ids
            assert got[-1].finish_reason == w.finish_reason
        s = e.stats()
        assert s.num_free_blocks == s.num_total_blocks
        assert e.engine.counters.overlapped_steps > 0
    finally:
        e.shutdown()


def test_a_step_that_does_not_return_shows_as_a_stall(engine):
    """The loop (thread or child process) is alive but stuck in a step: is_alive cannot see it, so /health
    reads stalled_for. Idle time before a request is not a stall; a finished step clears it."""
    import os
    import signal
    import threading
    import time

    from server.engine_process import ProcessEngine
    release = threading.Event()
    if isinstance(engine, ProcessEngine):
        pid = engine._process.pid
        hang, resume = (lambda: os.kill(pid, signal.SIGSTOP)), (lambda: os.kill(pid, signal.SIGCONT))
    else:
        step = engine.engine.step
        engine.engine.step = lambda: release.wait(60) and step()
        hang, resume = (lambda: None), release.set
    params = SamplingParams(temperature=0.0, max_new_tokens=4, ignore_eos=True)

    async def main():
        await asyncio.sleep(0.3)  # idle: no stall however long
        assert engine.stalled_for() == 0.0
        hang()
        try:
            since_add = time.monotonic()
            stream = engine.add_request("stall", [1, 5, 9], params)
            await asyncio.sleep(0.5)
            stalled, since_add = engine.stalled_for(), time.monotonic() - since_add
        finally:
            resume()
        assert 0.4 <= stalled <= since_add  # counted from the request, not from the idle time before it
        return await collect(stream)

    try:
        outs = asyncio.run(main())
    finally:
        vars(engine.engine).pop("step", None) if engine.engine is not None else None
    assert outs[-1].finished and len(outs) == 4
    assert engine.stalled_for() == 0.0
