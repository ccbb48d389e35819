"""A stand-in for server.async_engine.AsyncEngine with the same interface and no model.

Byte-level tokenizer (id = byte + 3; 0/1/2 = <unk>/<s>/</s>, 259 = [TOOL_CALLS], special tokens that decode
skips unless told not to), deterministic tokens (printable ASCII, a function of the prompt, the position and
the seed), a simulated block pool. Prompt markers drive the unusual paths: "EOS" ends with </s> after 3
tokens, "FAIL" ends with an engine error after 2 tokens, "SAY<<text>>" writes text (each "[TOOL_CALLS]" in it
as that one special token, as Mistral models write it), then </s>. As in the real engine, the token that
ends a request (</s>) is never decoded into its text.
"""
from __future__ import annotations

import asyncio
import math
import random
import threading
import time
from dataclasses import dataclass

from model.config import ModelConfig
from server.engine_config import EngineConfig
from server.async_engine import EngineStats
from server.outputs import AdmissionError, EngineDeadError, OverloadedError, RequestOutput, TokenLogprob
from server.sampling_params import SamplingParams

SPECIALS = {0: "<unk>", 1: "<s>", 2: "</s>", 259: "[TOOL_CALLS]"}


class FakeTokenizer:
    vocab_size = 260
    eos_token_ids = (2,)
    bos_token_id = 1
    all_special_ids = tuple(SPECIALS)
    has_chat_template = True

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [b + 3 for b in text.encode("utf-8")]
        return ([1] + ids) if add_special_tokens else ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        out, buf = [], bytearray()
        for i in ids:
            if i in SPECIALS:
                out.append(buf.decode("utf-8", "replace"))
                buf = bytearray()
                if not skip_special_tokens:
                    out.append(SPECIALS[i])
            else:
                buf.append(i - 3)
        out.append(buf.decode("utf-8", "replace"))
        return "".join(out)

    def id_to_piece(self, token_id: int) -> str:
        return SPECIALS[token_id] if token_id in SPECIALS else bytes([token_id - 3]).decode("latin-1")

    def token_bytes(self, token_id: int) -> bytes:
        return SPECIALS[token_id].encode() if token_id in SPECIALS else bytes([token_id - 3])

    def encode_script(self, text: str) -> list[int]:
        """A SAY<<text>> script's ids: its bytes, each "[TOOL_CALLS]" as that special token."""
        ids = []
        for k, part in enumerate(text.split(SPECIALS[259])):
            ids += ([259] if k else []) + self.encode(part, add_special_tokens=False)
        return ids

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, **extra) -> str:
        text = "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages)
        return text + ("<|assistant|>" if add_generation_prompt else "")


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of text that could still grow into a stop string."""
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


@dataclass(frozen=True)
class FakeKVCapacity:
    num_blocks: int
    block_size: int
    bytes_per_token: int
    tokens: int
    max_concurrency: float


class FakeAsyncEngine:
    def __init__(self, config: EngineConfig | None = None, *, step_delay: float = 0.002,
                 load_delay: float = 0.0, num_blocks: int = 256, max_model_len: int = 1024):
        self.config = config or EngineConfig(model="fake-model", max_model_len=max_model_len, max_num_seqs=8,
                                             max_waiting_requests=16, device="cpu", dtype="float32")
        self.max_model_len = self.config.max_model_len or max_model_len
        self.step_delay = step_delay
        self.load_delay = load_delay
        self.tokenizer = FakeTokenizer()
        self.model_config = ModelConfig(architecture="LlamaForCausalLM", vocab_size=260, hidden_size=64,
                                        intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                                        num_kv_heads=self.config.num_kv_heads or 0)
        bs = self.config.block_size
        bpt = self.model_config.kv_bytes_per_token(4)
        self.kv_capacity = FakeKVCapacity(num_blocks, bs, bpt, num_blocks * bs,
                                          num_blocks * bs / self.max_model_len)
        self._num_blocks = num_blocks
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: dict[str, asyncio.Task] = {}
        self._running: dict[str, int] = {}   # request id -> blocks held
        self._waiting = 0
        self._slots: asyncio.Semaphore | None = None
        self._alive = False
        self.stalled_seconds = 0.0
        self._draining = False
        self._counters = dict(prompt=0, generation=0, rejections=0, steps=0)
        self.started = threading.Event()
        self.aborted: list[str] = []

    # lifecycle -----------------------------------------------------------------------------------------
    def start(self) -> None:
        time.sleep(self.load_delay)
        self._alive = True
        self.started.set()

    @property
    def is_alive(self) -> bool:
        return self._alive

    def kill(self) -> None:
        self._alive = False

    def stalled_for(self) -> float:
        return self.stalled_seconds  # a test sets it to play a hung engine

    def begin_drain(self) -> None:
        self._draining = True

    async def wait_idle(self, timeout: float | None = None) -> bool:
        deadline = time.monotonic() + (timeout if timeout is not None else 1e9)
        while self._tasks and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return not self._tasks

    def shutdown(self) -> None:
        self._alive = False
        if self._loop is not None:
            for task in list(self._tasks.values()):
                self._loop.call_soon_threadsafe(task.cancel)

    # requests ------------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams):
        if not self._alive:
            raise EngineDeadError("engine loop is not running")
        if self._draining:
            raise OverloadedError("server is draining")
        if len(prompt_token_ids) + params.max_new_tokens > self.max_model_len:
            self._counters["rejections"] += 1
            raise AdmissionError(f"prompt ({len(prompt_token_ids)} tokens) + max_new_tokens "
                                 f"({params.max_new_tokens}) exceeds max_model_len ({self.max_model_len})",
                                 field="max_new_tokens")
        if self._waiting >= self.config.max_waiting_requests:
            self._counters["rejections"] += 1
            raise OverloadedError(f"waiting queue is full ({self.config.max_waiting_requests} requests)")
        self._loop = asyncio.get_running_loop()
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.config.max_num_seqs)
        queue: asyncio.Queue = asyncio.Queue()
        self._waiting += 1
        self._tasks[request_id] = asyncio.ensure_future(self._run(request_id, prompt_token_ids, params, queue))
        return self._stream(queue)

    def outputs_ready(self, request_ids: list[str]) -> bool:
        return False  # every event goes out on its own (the real engine's coalescing is tested on it)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self.aborted.append(request_id)
        task = self._tasks.get(request_id)
        if task is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(task.cancel)

    @staticmethod
    async def _stream(queue: asyncio.Queue):
        while True:
            out = await queue.get()
            yield out
            if out.finished:
                return

    async def _run(self, rid: str, prompt: list[int], params: SamplingParams, queue: asyncio.Queue) -> None:
        text = self.tokenizer.decode(prompt)
        rng = random.Random(params.seed if params.seed is not None else random.getrandbits(32))
        base = sum(prompt)
        script = self.tokenizer.encode_script(text[text.index("SAY<<") + 5:text.rindex(">>")]) \
            if "SAY<<" in text else None
        acquired = False
        try:
            await self._slots.acquire()
            acquired = True
            self._waiting -= 1
            self._running[rid] = math.ceil(len(prompt) / self.config.block_size)
            self._counters["prompt"] += len(prompt)
            out_ids: list[int] = []
            emitted = ""
            while True:
                await asyncio.sleep(self.step_delay)
                self._counters["steps"] += 1
                i = len(out_ids)
                if script is not None:  # its bytes, then </s>
                    token = script[i] if i < len(script) else 2
                elif "EOS" in text and i == 3 and not params.ignore_eos:
                    token = 2
                elif params.greedy:
                    token = 3 + 32 + (base * 31 + i * 7) % 95
                else:
                    token = 3 + 32 + rng.randrange(95)
                out_ids.append(token)
                self._counters["generation"] += 1
                blocks = math.ceil((len(prompt) + len(out_ids)) / self.config.block_size)
                self._running[rid] = blocks
                finish, stop_reason, error = None, None, None
                if token == 2:
                    finish, stop_reason = "eos_token", 2
                elif "FAIL" in text and i == 1:
                    finish, error = "error", "simulated engine failure"
                # the token that ends the request is not decoded (the real engine stops on its id)
                full = self.tokenizer.decode(out_ids[:-1] if token == 2 else out_ids, params.skip_special_tokens)
                for s in params.stop:
                    if s in full:
                        end = full.index(s) + (len(s) if params.include_stop_str_in_output else 0)
                        full, finish, stop_reason = full[:end], "stop", s
                        break
                if finish is None and len(out_ids) >= params.max_new_tokens:
                    finish = "length"
                logprobs = None
                if params.logprobs is not None:
                    top = tuple((3 + 32 + (token + k) % 95, -0.5 - k) for k in range(params.logprobs))
                    logprobs = [TokenLogprob(token, -0.5, top)]
                visible = full if finish is not None else full[:len(full) - _held_back(full, params.stop)]
                delta, emitted = visible[len(emitted):], max(visible, emitted, key=len)
                await queue.put(RequestOutput(rid, [token], delta, finish is not None, finish, stop_reason,
                                              logprobs, len(prompt), len(out_ids), error))
                if finish is not None:
                    return
        except asyncio.CancelledError:
            queue.put_nowait(RequestOutput(rid, [], "", True, "abort", num_prompt_tokens=len(prompt)))
        finally:
            if acquired:
                self._slots.release()
            else:
                self._waiting -= 1
            self._running.pop(rid, None)
            self._tasks.pop(rid, None)

    def stats(self) -> EngineStats:
        used = sum(self._running.values())
        return EngineStats(len(self._running), self._waiting, used / self._num_blocks, self._num_blocks - used,
                         self._num_blocks, 0, self._counters["prompt"], self._counters["generation"],
                         self._counters["rejections"], self._counters["steps"])
