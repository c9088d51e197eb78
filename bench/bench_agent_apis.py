"""A 10-round tool loop through the Responses API's previous_response_id against the same loop
through Chat Completions, on one `qwen35 serve` (in this process, on 127.0.0.1), driven by the
official `openai` client, streaming.

  chat       each round re-sends the whole conversation: the history, the assistant's tool call
             (as the client got it) and the tool's output;
  responses  each round sends only the tool's output, with previous_response_id: the server
             continues the conversation it stored.

The calls are forced (tool_choice names a tool, round-robin; random weights call no tool by
themselves), with thinking off, temperature 0 and a seed. Each API has a server of its own (two
sessions over the same file, in this process) and both loops carry the same conversation, so that
they generate the same replies; they run in lockstep, round by round (the order alternating), and
before each request the bench waits for both servers' idle work to end. Each repetition starts
fresh conversations. Per round: the prompt tokens evaluated (usage: input/prompt tokens − cached
tokens) and the time to first token (the first event carrying text, reasoning or a call), medians
over the repetitions.

Bar (issue 26): the Responses loop evaluates no more prompt tokens than the Chat Completions loop on
every round, and its time to first token is within 10% of it or better.

    .venv/bin/python bench/bench_agent_apis.py [--model M.gguf] [--threads 2] [--reps 3] [--rounds 10]
        [--max-tokens 48]

Default model: the cached random-weight 0.8B Q8_0 of bench_runtime.py.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from openai import OpenAI

from bench_runtime import model_0_8b

TOOLS = [
    {"name": "get_weather", "description": "Current weather for a city.",
     "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                     "unit": {"type": "string", "enum": ["C", "F"]}},
                    "required": ["city"]}},
    {"name": "search_notes", "description": "Search the user's notes; returns matching lines.",
     "parameters": {"type": "object", "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}},
                    "required": ["query"]}},
]
SYSTEM = "You are a helpful assistant with tools. Call them when they help; answer briefly."
RESULT = "Result {round}: 17 °C and cloudy in Lisbon; notes: 'buy bread', 'call Ana at 5', 'book the train'."


def question(rep: int) -> str:
    return f"(run {rep}) I am planning my day: check the weather and my notes, then tell me what to do first."


def chat_loop(client: OpenAI, rep: int, rounds: int, max_tokens: int):
    """Yields (prompt tokens evaluated, seconds to the first token) per round."""
    tools = [{"type": "function", "function": t} for t in TOOLS]
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question(rep)}]
    for i in range(rounds):
        name = TOOLS[i % len(TOOLS)]["name"]
        start = time.perf_counter()
        ttft, calls, usage = None, {}, None
        for chunk in client.chat.completions.create(
                model="qwen35", messages=messages, tools=tools, tool_choice={"type": "function", "function": {"name": name}},
                parallel_tool_calls=False, reasoning_effort="none", temperature=0, seed=1, max_tokens=max_tokens,
                stream=True, stream_options={"include_usage": True}):
            usage = chunk.usage or usage
            for choice in chunk.choices:
                delta = choice.delta
                if ttft is None and (delta.content or delta.tool_calls or getattr(delta, "reasoning_content", None)):
                    ttft = time.perf_counter() - start
                for call in delta.tool_calls or ():
                    entry = calls.setdefault(call.index, {"id": call.id, "type": "function",
                                                          "function": {"name": call.function.name, "arguments": ""}})
                    entry["function"]["arguments"] += call.function.arguments or ""
        yield usage.prompt_tokens - usage.prompt_tokens_details.cached_tokens, ttft
        call = calls[0]
        messages += [{"role": "assistant", "content": "", "tool_calls": [call]},
                     {"role": "tool", "tool_call_id": call["id"], "content": RESULT.format(round=i + 1)}]


def responses_loop(client: OpenAI, rep: int, rounds: int, max_tokens: int):
    """Yields (prompt tokens evaluated, seconds to the first token) per round."""
    tools = [{"type": "function", **t} for t in TOOLS]
    new_input: list | str = question(rep)
    previous = None
    for i in range(rounds):
        name = TOOLS[i % len(TOOLS)]["name"]
        start = time.perf_counter()
        ttft, final = None, None
        for event in client.responses.create(
                model="qwen35", instructions=SYSTEM, input=new_input, previous_response_id=previous, tools=tools,
                tool_choice={"type": "function", "name": name}, parallel_tool_calls=False, reasoning={"effort": "none"},
                temperature=0, max_output_tokens=max_tokens, stream=True, extra_body={"seed": 1}):
            if ttft is None and event.type in ("response.output_text.delta", "response.reasoning_text.delta",
                                               "response.function_call_arguments.delta", "response.output_item.added"):
                ttft = time.perf_counter() - start
            if event.type in ("response.completed", "response.incomplete"):
                final = event.response
        usage = final.usage
        yield usage.input_tokens - usage.input_tokens_details.cached_tokens, ttft
        call = next(item for item in final.output if item.type == "function_call")
        previous = final.id
        new_input = [{"type": "function_call_output", "call_id": call.call_id, "output": RESULT.format(round=i + 1)}]


def wait_idle(servers, quiet_s: float = 1.0) -> None:
    """Until no request runs or waits on any server, and then `quiet_s` more: the idle work after a
    reply (the next prompt's known start, a state read: tens of ms on a quiet machine) is over."""
    while any(s._current is not None or not s._jobs.empty() for s in servers):
        time.sleep(0.05)
    time.sleep(quiet_s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="GGUF to use (default: the cached random 0.8B Q8_0)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/qwen35-bench/runtime"))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=48)
    args = ap.parse_args()

    from qwen35.runtime import ChatSession
    from qwen35.runtime.frontends.server import Server, http_port, listen

    model = args.model or model_0_8b(args.workdir)
    loops = {"chat": chat_loop, "responses": responses_loop}
    # Fixed threads: a thread count that adapts to a busy machine changes the sums' order, and with
    # random weights the replies (whose re-rendering is evaluated) would part ways between the loops.
    options = dict(n_ctx=8192, threads=args.threads, cache_ram=2048 << 20, adapt_threads=False, speculative="off")
    with ChatSession(model, **options) as chat_session, ChatSession(model, **options) as responses_session:
        servers = {api: Server(session, model_name="qwen35")
                   for api, session in (("chat", chat_session), ("responses", responses_session))}
        https = {api: listen(server, "127.0.0.1", 0) for api, server in servers.items()}
        runs = {"chat": [], "responses": []}
        try:
            for rep in range(args.reps):
                clients = {api: OpenAI(base_url=f"http://127.0.0.1:{http_port(https[api])}/v1", api_key="unused",
                                       max_retries=0, timeout=600) for api in loops}
                rounds = {api: loop(clients[api], rep, args.rounds, args.max_tokens) for api, loop in loops.items()}
                for api in loops:
                    runs[api].append([])
                for r in range(args.rounds):
                    for api in ("chat", "responses") if (rep + r) % 2 == 0 else ("responses", "chat"):
                        wait_idle(servers.values())
                        runs[api][-1].append(next(rounds[api]))
        finally:
            for api, http in https.items():
                http.should_exit = True
                http.thread.join(10)
                servers[api].close()

    def median(api: str, round_: int, field: int) -> float:
        return statistics.median(run[round_][field] for run in runs[api])

    print("\n| round | evaluated, chat | evaluated, responses | TTFT chat (ms) | TTFT responses (ms) | TTFT ratio |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    met = True
    for r in range(args.rounds):
        ec, er = median("chat", r, 0), median("responses", r, 0)
        tc, tr = median("chat", r, 1), median("responses", r, 1)
        met &= er <= ec and tr <= 1.1 * tc
        print(f"| {r + 1} | {ec:.0f} | {er:.0f} | {tc * 1000:.0f} | {tr * 1000:.0f} | {tr / tc:.2f} |")
    total_c = sum(median("chat", r, 0) for r in range(args.rounds))
    total_r = sum(median("responses", r, 0) for r in range(args.rounds))
    print(f"\nmodel {model.name}, threads {args.threads}, {args.reps} reps, max_tokens {args.max_tokens}; "
          f"evaluated over the loop: chat {total_c:.0f}, responses {total_r:.0f}; "
          f"bar (responses evaluates ≤ chat every round, TTFT ≤ 1.1×): {'met' if met else 'NOT met'}")
    sys.exit(0 if met else 1)


if __name__ == "__main__":
    main()
