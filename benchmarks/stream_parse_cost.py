"""What a streamed chat reply's parsing costs per delta, on the event loop: the reasoning split
(server/reasoning_parsers.py) and the tool-call parser (server/tool_parsers.py) through ChoiceReply
(server/tool_calls.py), as /v1/chat/completions runs them for each output delta.

    python benchmarks/stream_parse_cost.py                       # 2k, 8k and 32k deltas of 4 characters
    python benchmarks/stream_parse_cost.py --deltas 1000 100000 --json /tmp/stream_parse.json

Each reply is the reasoning (half the deltas), `</think>`, then content (the other half), fed one delta at a
time with a hermes parser and tools, as a reasoning model answering without a call. A cost that grows with
the delta count means each delta rescans the text so far: a stream of n deltas then costs O(n^2) in all,
and with many long streams the event loop falls behind the engine. Printed: microseconds per delta (mean
over the whole reply, and over its last 1,000 deltas), next to a plain reply (no parser: the floor).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.results import write_json  # noqa: E402
from server.reasoning_parsers import DeepSeekR1Parser, ReasoningStream  # noqa: E402
from server.schemas_openai import ChatCompletionRequest  # noqa: E402
from server.tool_calls import ChoiceReply  # noqa: E402
from server.tool_parsers import HermesParser  # noqa: E402

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
WORDS = ("the ", "cat ", "sat ", "on\n", "mat ", "and ", "we ", "<to", "ol ", "ask ")  # "<to": held back a while


def deltas(n: int) -> list[str]:
    half = [WORDS[i % len(WORDS)] for i in range(n // 2)]
    return half + ["</think>\n"] + half


def per_delta_us(n: int, parsed: bool) -> tuple[float, float]:
    req = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], tools=TOOLS)
    reply = (ChoiceReply(req, False, HermesParser(), ReasoningStream(DeepSeekR1Parser(), "<think>\n")) if parsed
             else ChoiceReply(req, False))
    pieces, times = deltas(n), []
    for k, piece in enumerate(pieces):
        start = time.perf_counter()
        reply.delta(piece, "eos_token" if k == len(pieces) - 1 else None)
        times.append(time.perf_counter() - start)
    return 1e6 * sum(times) / len(times), 1e6 * sum(times[-1000:]) / len(times[-1000:])


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--deltas", type=int, nargs="+", default=[2000, 8000, 32000])
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    rows = []
    print(f"{'deltas':>8} {'parsed us/delta':>16} {'last 1k':>9} {'plain us/delta':>15} {'last 1k':>9}")
    for n in args.deltas:
        parsed, plain = per_delta_us(n, True), per_delta_us(n, False)
        rows.append({"deltas": n, "parsed_us": parsed[0], "parsed_last_1k_us": parsed[1],
                     "plain_us": plain[0], "plain_last_1k_us": plain[1]})
        print(f"{n:>8} {parsed[0]:>16.1f} {parsed[1]:>9.1f} {plain[0]:>15.1f} {plain[1]:>9.1f}")
    write_json({"rows": rows}, args.json, "stream_parse_cost.json")
    return rows


if __name__ == "__main__":
    main()
