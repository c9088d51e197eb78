"""Decode speed with speculative decoding (Qwen3.5's own MTP head) at known acceptance, against
llama.cpp's own MTP and the sdist example server's, side by side in one run.

Models: random-weight checkpoints at Qwen3.5-0.8B's and 4B's real dimensions (9B with --sizes,
if the disk holds it: each 9B build needs ~40 GB of scratch), rewritten by
tests/mtp_fixtures.acceptance_transform so that the MTP head predicts the model's next token for
a known share of tokens (0, 0.5, 0.8, 1.0): the blocks' output projections are zero and the
untied output maps each token to a fixed successor. Zeros cost as much compute as any other
value, so the time per token is that of a real model of these dimensions (with an untied output:
0.8B's release ties it, the compute is the same). Q4_K_M, built once and cached in the work
directory. Per-draft acceptance at N drafts is Σ rate^i / N (a draft counts when all before it
were right), printed as llama-server measures it. The successors walk the first --span ids
(default 32,735: those qwen35's reduced draft chooses among, with the 33 added tokens; a model of
real text mostly predicts frequent tokens), so both drafts, whole and reduced vocabulary, see the
acceptance built in; --span 0 spreads them over the whole vocabulary, where the reduced draft
accepts ~13 % of that. `--draft-vocab K` is passed to qwen35 (0: it drafts from the whole
vocabulary, as llama-server does).

Servers, one at a time, on 127.0.0.1, same GGUF, threads and context:
  qwen35     `qwen35 serve`: --no-mtp (plain), --mtp --draft N, and `--speculative auto` at --draft N
             twice: on a first load (a fresh cache: step costs learnt from its own steps) and with the
             costs its first start remembered;
  llama.cpp  llama-server built from the pinned sdist (bench_runtime.llama_cpp_tool: one cached
             build): plain, and --spec-type draft-mtp --spec-draft-n-max N;
  example    the sdist's examples/server/server.py (bench_server.py's peers venv and config): plain,
             and draft_model "draft-mtp" with draft_model_num_pred_tokens N.
Decode tokens/s is measured the same way for all, from the client: each repetition times one
request for 1 token and one for K+1 tokens (different prompts of the same length, temperature 0;
the models never end a reply early), and K / (difference) is the decode rate: prompt and request
costs cancel. The median of --reps repetitions; in each, every setting of a file is started afresh,
in an order drawn anew (seeded by the repetition), so that the machine's drift, and whatever the
setting before leaves behind, falls on all settings alike.

`--sizes demo` runs the trained demo model (demo/weights, Q8_0 as `qwen35 demo` converts it) at its
natural acceptance instead: its replies end by themselves, so the decode rate is taken from the
stream of its own replies to questions of its world (thinking on: a short reasoning, then the
answer), (tokens − 1) ÷ (last token's arrival − first token's) summed over the replies, the same
client-side clock for every server; the drafts kept are the server's own count (ours: usage's
accepted/rejected_prediction_tokens; llama-server: timings.draft_n/draft_n_accepted). Only ours and
llama-server there (the example's stream carries no count of tokens).

Issue 10's goal (a moonshot): at acceptance 0.8, ≥ 1.5× plain decoding on the 4B file, ahead of
both peers' MTP on every row; `auto` never more than 3% slower than plain.

    .venv/bin/python bench/bench_mtp.py [--sizes 0.8b,4b] [--acceptance 0,0.5,0.8,1] [--draft 1,2,3]
        [--threads N] [--reps 3] [--tokens 128] [--peers llama-server,example]
    .venv/bin/python bench/bench_mtp.py --sizes demo [--draft 1,2,3] [--reps 3]
    .venv/bin/python bench/bench_mtp.py --sizes 0.8b --load --draft 3   # time to open a session: off / auto
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench_runtime import llama_cpp_tool
from bench_server import Server, example_config, get, peer_python, peers_venv, sdist_server, withholds_amx

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"tiny": None, "0.8b": "qwen3.5-0.8b.config.RECONSTRUCTED.json", "4b": "qwen3.5-4b.config.RECONSTRUCTED.json",
           "9b": "qwen3.5-9b.config.json"}
N_CTX = 2048
SCRATCH_GB = {"tiny": 1, "0.8b": 6, "4b": 20, "9b": 42}  # free disk a build needs (checkpoint, its rewrite, the GGUF)


def controlled_gguf(size: str, rate: float, workdir: Path, span: int = 0) -> Path:
    """The `size` model whose MTP head is right for a share `rate` of tokens (built once)."""
    os.environ["QWEN35_TEST_CACHE"] = str(workdir / "models")
    sys.path.insert(0, str(REPO))  # the repository's tests package
    from tests.mtp_fixtures import build_gguf, variant_config

    if CONFIGS[size] is None:  # the tests' model (hidden size 128): for checking this script quickly
        config = variant_config(tied=False)
    else:
        config = json.loads((REPO / "tests" / "release_configs" / CONFIGS[size]).read_text())
        config["tie_word_embeddings"] = config["text_config"]["tie_word_embeddings"] = False
    free = shutil.disk_usage(workdir).free / 2**30
    print(f"model {size} at acceptance {rate} (building it if absent; {free:.0f} GiB free) …", flush=True)
    if free < SCRATCH_GB[size]:
        raise SystemExit(f"{size} needs ~{SCRATCH_GB[size]} GiB of free disk to build; {free:.0f} GiB free")
    return build_gguf(config, "q4_k_m", acceptance=rate, span=span or None)


# The demo model's questions whose answers are text (its tools are not offered): with thinking on,
# each reply is a short reasoning and then the answer, ~30-40 tokens.
DEMO_PROMPTS = ["Hello! Who are you?", "What is the capital of Kenya?", "Tell me the capital of Chile.",
                "What is the capital of Norway?", "Which city is the capital of Japan?",
                "What is the capital of Peru?", "Give the capital of Egypt as JSON."]


def demo_gguf(workdir: Path) -> Path:
    """The trained demo model as `qwen35 demo` converts it (materialized and converted once)."""
    from qwen35.demo.walkthrough import build

    print("the demo model (converting it if absent) …", flush=True)
    return next(o.path for o in build(workdir / "demo")[1] if not o.path.name.startswith("mmproj"))


def natural_decode(server: Server, tokens: int, rep: int) -> dict:
    """One repetition over DEMO_PROMPTS on the demo model (see the module docstring): the decode
    time of its own replies, timed on the stream, and the drafts the server says it kept."""
    from openai import OpenAI

    client = OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0, timeout=600)
    chat(server.base, "Warm up: say something.", 8)  # (as decode_gaps does: not timed)
    decoded, gap, drafted, kept = 0, 0.0, 0, 0
    for prompt in DEMO_PROMPTS:
        stream = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": prompt}], temperature=0, seed=1, max_tokens=200,
            stream=True, stream_options={"include_usage": True}, reasoning_effort="high",
            extra_body={"chat_template_kwargs": {"enable_thinking": True}})
        first = last = None
        usage, timings = None, None
        for chunk in stream:
            now = time.perf_counter()
            usage = chunk.usage or usage
            timings = (chunk.model_extra or {}).get("timings") or timings
            for choice in chunk.choices:
                d = choice.delta
                if d.content or getattr(d, "reasoning_content", None):
                    first = now if first is None else first
                    last = now
        if usage is None or first is None or usage.completion_tokens < 2:
            raise RuntimeError(f"{server.name}: no usage or no tokens for {prompt!r}")
        decoded += usage.completion_tokens - 1
        gap += last - first
        details = usage.completion_tokens_details
        if details is not None and details.accepted_prediction_tokens is not None:
            kept += details.accepted_prediction_tokens
            drafted += details.accepted_prediction_tokens + (details.rejected_prediction_tokens or 0)
        elif timings and timings.get("draft_n"):
            kept += timings["draft_n_accepted"]
            drafted += timings["draft_n"]
    result = {"gap": gap * tokens / decoded, "short": False, "decoded": decoded}
    if drafted:
        result["acceptance"] = kept / drafted
    return result


class Plain(Server):
    """Any of the servers: named, and with its health path, by `measure`."""


def chat(base: str, prompt: str, max_tokens: int) -> tuple[float, dict]:
    body = {"model": "m", "messages": [{"role": "user", "content": prompt}], "temperature": 0, "seed": 1,
            "max_tokens": max_tokens, "stream": False}
    request = urllib.request.Request(base + "/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=1800) as r:  # noqa: S310 - 127.0.0.1 only
        reply = json.loads(r.read())
    return time.perf_counter() - start, reply


def decode_gaps(server: Server, tokens: int, rep: int) -> dict:
    """One repetition's decode time of `tokens` tokens, from the client (see the module docstring),
    and what the server says of its drafts."""
    chat(server.base, "Warm up: say something.", 8)
    before = _draft_counters(server)
    one, _ = chat(server.base, f"Story {2 * rep}: tell me about lighthouse number {2 * rep}.", 1)
    many, reply = chat(server.base, f"Story {2 * rep + 1}: tell me about lighthouse number {2 * rep + 1}.",
                       tokens + 1)
    result = {"gap": many - one, "short": (reply.get("usage") or {}).get("completion_tokens", tokens + 1) != tokens + 1}
    timings = reply.get("timings") or {}
    if timings.get("draft_n"):
        result["acceptance"] = timings["draft_n_accepted"] / timings["draft_n"]
    after = _draft_counters(server)
    if before and after and after[0] > before[0]:
        result["acceptance"] = (after[1] - before[1]) / (after[0] - before[0])
    return result


def _draft_counters(server: Server) -> tuple[float, float] | None:
    """The example server's drafts proposed and accepted (its /metrics), else None."""
    if server.health != "/healthz":
        return None
    text = get(server.base + "/metrics").decode()
    values = [re.search(rf"^batch_server:draft_tokens_{kind}_total\s+(\S+)$", text, re.M) for kind in ("proposed",
                                                                                                         "accepted")]
    return tuple(float(v.group(1)) for v in values) if all(values) else None


def measure(name: str, command, args, env: dict, rep: int, health: str = "/health", decode=decode_gaps) -> dict:
    """Start a server (`command(port)`), time one repetition of its decoding (`decode`), stop it."""
    server = Plain([], args.workdir / f"{re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-')}.log", env)
    server.name, server.health = name, health
    server.command = command(server.port)
    server.start()
    try:
        server.wait_ready()
        result = decode(server, args.tokens, rep)
    finally:
        server.stop()
    acc = f", drafts accepted {result['acceptance']:.2f}" if "acceptance" in result else ""
    print(f"  {name}: {args.tokens / result['gap']:.2f} tokens/s{acc}{' (a reply ended early!)' if result['short'] else ''}",
          flush=True)
    # `--speculative auto` says at load when it found that drafting cannot pay here, and why.
    verdict = [line for line in server.log.read_text(errors="replace").splitlines()
               if "speculative decoding off" in line] if server.log.is_file() else []
    if verdict:
        result["verdict"] = verdict[0].strip()
        print(f"    {result['verdict']}", flush=True)
    return result


def summarize(runs: list[dict], tokens: int) -> dict:
    """The median decode rate over repetitions, and the drafts accepted (their mean)."""
    out = {"tps": tokens / statistics.median(r["gap"] for r in runs), "short": any(r["short"] for r in runs)}
    accepted = [r["acceptance"] for r in runs if "acceptance" in r]
    if accepted:
        out["acceptance"] = statistics.mean(accepted)
    return out


def ours(model: Path, args, flags: list[str]):
    return lambda port: [sys.executable, "-m", "qwen35.cli", "serve", str(model), "--port", str(port),
                         "-t", str(args.threads), "-c", str(N_CTX), "--draft-vocab", str(args.draft_vocab), *flags]


def llama_server(binary: Path, model: Path, args, flags: list[str]):
    return lambda port: [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
                         "-t", str(args.threads), "-tb", str(args.threads), "-c", str(N_CTX), "-np", "1", *flags]


def example(python: Path, model: Path, args, n_draft: int):
    """The example server with bench_server.py's config (its own Qwen3.5 settings on the local GGUF)."""
    def command(port: int) -> list[str]:
        path = example_config(args.workdir, model, args.threads, port)
        config = json.loads(path.read_text())
        config["model"]["n_ctx"] = N_CTX
        if n_draft:
            config["model"].update(draft_model="draft-mtp", draft_model_num_pred_tokens=n_draft)
        path.write_text(json.dumps(config, indent=1))
        return [*peer_python(python, model), str(sdist_server() / "server.py"), "-C", str(path)]
    return command


def bench_file(size: str, rate: float | None, args, env: dict, peers: list[str], python: Path | None) -> list[dict]:
    """Every server setting on this file, each started afresh for each repetition, in an order drawn
    anew each repetition: the machine's speed drifts by ±20 % within minutes (docs/benchmarks.md), which a setting
    measured in one stretch would take for its own; and an order that only turned kept each setting
    behind the same one (our plain server always started right after the example's last MTP server
    had exited; at 9B it measured 0.88× the peers' plain there and level in a run of its own: a suspect,
    not a finding)."""
    model = demo_gguf(args.workdir) if size == "demo" else controlled_gguf(size, rate, args.workdir, args.span)
    decode = natural_decode if size == "demo" else decode_gaps
    if size == "demo":
        python = None  # (the example's stream carries no count of tokens)
    print(f"{model}", flush=True)
    # llama-server places the weights as qwen35 does: built without AMX where qwen35 withholds it.
    binary = llama_cpp_tool(args.workdir.parent / "runtime", "llama-server", without_amx=withholds_amx(model)) \
        if "llama.cpp" in peers else None
    settings = {("plain", "qwen35"): ("qwen35 plain", ours(model, args, ["--no-mtp"]), "/health")}
    if binary:
        settings["plain", "llama.cpp"] = ("llama-server plain", llama_server(binary, model, args, []), "/health")
    if python:
        settings["plain", "example"] = ("example plain", example(python, model, args, 0), "/healthz")
    for n in args.draft:
        settings[n, "qwen35"] = (f"qwen35 --mtp --draft {n}", ours(model, args, ["--mtp", "--draft", str(n)]), "/health")
        if n == args.auto_draft:
            # `auto` twice: on a first load here (a cache of its own each start: the step costs learnt
            # from the reply's own steps) and with what the first repetition's start remembered.
            auto = ours(model, args, ["--speculative", "auto", "--draft", str(n)])
            settings[n, "auto"] = (f"qwen35 auto --draft {n} (first load)", auto, "/health", FRESH_CACHE)
            settings[n, "auto, remembered"] = (f"qwen35 auto --draft {n} (remembered)", auto, "/health",
                                               args.workdir / f"auto-cache-{model.stem}")
        if binary:
            settings[n, "llama.cpp"] = (f"llama-server draft-mtp n-max {n}", llama_server(
                binary, model, args, ["--spec-type", "draft-mtp", "--spec-draft-n-max", str(n)]), "/health")
        if python:
            settings[n, "example"] = (f"example draft-mtp {n}", example(python, model, args, n), "/healthz")
    keys = list(settings)
    runs: dict = {key: [] for key in keys}
    for key in keys:  # what `auto` remembers: learnt by one start, not measured, before the repetitions
        name, command, health, *cache = settings[key]
        if cache and cache[0] != FRESH_CACHE:
            shutil.rmtree(cache[0], ignore_errors=True)
            print(" (learning the step costs the remembered `auto` starts from)", flush=True)
            measure(name, command, args, dict(env, XDG_CACHE_HOME=str(cache[0])), 0, health, decode)
    for rep in range(args.reps):
        print(f" repetition {rep + 1}/{args.reps}", flush=True)
        for key in random.Random(rep).sample(keys, len(keys)):
            name, command, health, *cache = settings[key]
            with tempfile.TemporaryDirectory() as fresh:
                own = dict(env, XDG_CACHE_HOME=str(fresh if cache[0] == FRESH_CACHE else cache[0])) if cache else env
                runs[key].append(measure(name, command, args, own, rep, health, decode))
    result = {key: summarize(r, args.tokens) for key, r in runs.items()}
    plain = {server: result["plain", server] for server in ("qwen35", "llama.cpp", "example")
             if ("plain", server) in result}
    rows = []
    for n in args.draft:
        mtp = {server: result[n, server] for server in ("qwen35", "llama.cpp", "example") if (n, server) in result}
        rows.append({"size": size, "rate": rate, "n": n, "plain": plain, "mtp": mtp, "auto": result.get((n, "auto")),
                     "auto, remembered": result.get((n, "auto, remembered"))})
    return rows


def _tps(result: dict | None) -> str:
    return "—" if not result else f"{result['tps']:.2f}"


def _ratio(a: dict | None, b: dict | None) -> str:
    return "—" if not a or not b else f"{a['tps'] / b['tps']:.2f}"


def report(rows: list[dict], peers: list[str]) -> None:
    head = ["size", "accept/token", "N", "qwen35 plain", "qwen35 MTP", "MTP/plain", "auto/plain (first load)",
            "auto/plain (remembered)", "qwen35 accepted"]
    for peer in peers:
        head += [f"{peer} plain", f"{peer} MTP", f"{peer} MTP/plain", f"{peer} accepted", f"qwen35 MTP/{peer} MTP"]
    print("\n| " + " | ".join(head) + " |")
    print("|" + " ---: |" * len(head))
    for r in rows:
        mine, plain = r["mtp"]["qwen35"], r["plain"]["qwen35"]
        ours_acc = mine.get("acceptance") if mine else None
        cells = [r["size"], "natural" if r["rate"] is None else f"{r['rate']:g}", str(r["n"]), _tps(plain),
                 _tps(mine), _ratio(mine, plain), _ratio(r["auto"], plain), _ratio(r["auto, remembered"], plain),
                 "—" if ours_acc is None else f"{ours_acc:.2f}"]
        for peer in peers:
            theirs = r["mtp"].get(peer)
            acc = theirs.get("acceptance") if theirs else None
            cells += [_tps(r["plain"].get(peer)), _tps(theirs), _ratio(theirs, r["plain"].get(peer)),
                      "—" if acc is None else f"{acc:.2f}", _ratio(mine, theirs)]
        print("| " + " | ".join(cells) + " |")


LOAD_SCRIPT = """import sys, time
from qwen35.runtime import ChatSession
start = time.perf_counter()
s = ChatSession(sys.argv[1], n_ctx=2048, threads=int(sys.argv[3]), speculative=sys.argv[2], draft_tokens=int(sys.argv[4]),
                draft_vocab=int(sys.argv[5]), prefill=False)
took = time.perf_counter() - start
if int(sys.argv[6]):  # decode, so that `auto` learns its step costs and remembers them
    s.send("Tell me about lighthouses.", max_tokens=int(sys.argv[6]))
print(took, s.speculative, s.decoder.costs.step if s.decoder.costs else None, flush=True)
s.close()
"""

FRESH_CACHE = "fresh"


def load_times(model: Path, args) -> dict:
    """Seconds to open a ChatSession on `model` (a fresh process each time, the file in the page
    cache): plainly (`off`), with `auto` the first time on this machine (a fresh cache directory:
    nothing known, its step costs to be learnt as it decodes) and with `auto` again (the costs a
    first session's 96 tokens remembered). Interleaved, medians of --reps."""
    n = max(args.draft)
    times: dict[str, list[float]] = {"off": [], "auto, first load": [], "auto, remembered": []}
    costs = None
    with tempfile.TemporaryDirectory() as cache:
        for rep in range(args.reps + 1):
            # A first load of this model: nothing remembered of its step costs, the rest (the AMX
            # verdicts) as the other loads find it, so that only what `auto` adds is compared.
            fresh = Path(cache) / f"fresh{rep}" / "qwen35"
            fresh.mkdir(parents=True)
            for kept in Path(cache, "qwen35").glob("*.json"):
                if kept.name != "draft-costs.json":
                    shutil.copy(kept, fresh / kept.name)
            fresh = fresh.parent
            order = [("off", "off", cache), ("auto, first load", "auto", str(fresh)), ("auto, remembered", "auto", cache)]
            for name, mode, xdg in random.Random(rep).sample(order, len(order)):
                env = dict(os.environ, XDG_CACHE_HOME=xdg)
                learn = 96 if rep == 0 and name == "auto, remembered" else 0
                out = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(model), mode, str(args.threads), str(n),
                                      str(args.draft_vocab), str(learn)],
                                     capture_output=True, text=True, env=env, check=True).stdout.split(maxsplit=2)
                if rep:  # the first round warms the page cache and has the remembered costs learnt
                    times[name].append(float(out[0]))
                if name == "auto, remembered":
                    costs = out[2].strip()
    result = {name: statistics.median(t) for name, t in times.items()}
    print(f"\nopening {model.name} ({args.threads} threads, N = {n}, medians of {args.reps}): "
          + ", ".join(f"{name} {s:.2f} s" for name, s in result.items())
          + f"; auto over off: +{result['auto, first load'] - result['off']:.2f} s on a first load, "
            f"+{result['auto, remembered'] - result['off']:.2f} s remembered; step costs {costs}", flush=True)
    return result


def main() -> None:
    from qwen35.runtime.engine.speculative import DRAFT_VOCAB
    from qwen35.system import physical_cores

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="0.8b,4b", help="comma-separated: 0.8b, 4b, 9b (tiny: the tests' model; "
                                                       "demo: the trained demo model, natural acceptance)")
    ap.add_argument("--acceptance", default="0,0.5,0.8,1", help="comma-separated shares of tokens the MTP head gets right")
    ap.add_argument("--draft", default="1,2,3", help="comma-separated draft lengths N")
    ap.add_argument("--auto-draft", type=int, default=2, help="N at which `auto` is measured too")
    ap.add_argument("--threads", type=int, default=physical_cores())
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128, help="decoded tokens per timed request")
    ap.add_argument("--peers", default="llama.cpp,example", help="comma-separated: llama.cpp, example (or none)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/qwen35-bench/mtp"))
    ap.add_argument("--json", type=Path, help="also write the raw measurements here")
    ap.add_argument("--span", type=int, default=32735,
                    help="the controlled models' successors walk the first SPAN ids (0: the whole vocabulary)")
    ap.add_argument("--draft-vocab", type=int, default=DRAFT_VOCAB, help="qwen35's --draft-vocab (0: the whole vocabulary)")
    ap.add_argument("--load", action="store_true",
                    help="only the time to open a session: off, auto on a first load, auto with its step costs remembered")
    args = ap.parse_args()
    args.draft = [int(n) for n in args.draft.split(",")]
    args.workdir.mkdir(parents=True, exist_ok=True)
    peers = [p for p in args.peers.split(",") if p in ("llama.cpp", "example")]
    python = peers_venv(args.workdir.parent / "server") if "example" in peers else None
    # Servers run as users run them (llama.cpp's default, spinning thread waits): one at a time, so
    # they never spin against each other. (Passive waits slow every decode's many small barriers,
    # plain decoding most, which would flatter drafting.)
    env = dict(os.environ)
    if args.load:
        for size in args.sizes.split(","):
            load_times(demo_gguf(args.workdir) if size == "demo" else controlled_gguf(size, 0.8, args.workdir, args.span),
                       args)
        return
    rows = []
    for size in args.sizes.split(","):
        for rate in [None] if size == "demo" else (float(a) for a in args.acceptance.split(",")):
            rows += bench_file(size, rate, args, env, peers, python)
            if args.json:
                args.json.write_text(json.dumps(rows, indent=1))
    print(f"\n{args.threads} threads, {args.reps} reps of {args.tokens} decoded tokens, Q4_K_M (demo: Q8_0, its "
          f"own replies), context {N_CTX}; successors in the first {args.span or 'all'} ids; qwen35 --draft-vocab "
          f"{args.draft_vocab}")
    report(rows, peers)


if __name__ == "__main__":
    main()
