"""`qwen35 demo`: the trained demo model, from its compact weights to a conversation, on this machine.

What a user does with a release, end to end, on a model small enough to ship inside the package
(14.0 MB of weights, trained here: training/README.md): the weights become a Hugging Face checkpoint
(materialize.py, the full 248,320-token vocabulary), the checkpoint becomes a GGUF and its mmproj
(`qwen35 convert`), and the GGUF answers through ChatSession: a greeting, a fact, a tool loop whose
tools this script runs, and a picture. The model knows only its small synthetic world (the capitals
of 50 countries, three tools, coloured shapes) and says so; inside it, its answers are right.

Every step is the real one: the same converter, runtime and template as for Qwen3.5-0.8B.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..convert.errors import ConvertError
from ..convert.pipeline import Output, convert
from .materialize import WEIGHTS_DIR, load_manifest, materialize
from .training import corpus

QTYPE = "q8_0"


def heldout_accuracy() -> str:
    """What the shipped weights do on questions they were not trained on, from their evaluation
    (weights/eval-f32.json, written by training/evaluate.py), for the demo's last words."""
    scores = json.loads((WEIGHTS_DIR / "eval-f32.json").read_text())["scores"]
    calls, pictures = scores["tool call"], scores["image colour+shape"]
    return (f"it calls the right tool rightly {calls['correct']} times in {calls['total']} and names a picture's "
            f"colour and shape {pictures['correct']} times in {pictures['total']}")


def run_tool(name: str, arguments: dict) -> dict:
    """The demo's three tools, as the training world defines them (a toy weather service, fixed
    exchange rates, a shopping list)."""
    if name == "get_weather":
        return corpus._weather_result(random.Random(str(arguments.get("city"))), str(arguments.get("city")),
                                      arguments.get("unit", "celsius"))
    if name == "convert_currency":  # (the amount as the call gave it: 120 stays 120, not 120.0)
        return corpus._convert_result(arguments["amount"], str(arguments["from"]), str(arguments["to"]))
    if name == "add_to_shopping_list":
        items = list(arguments["items"])
        return {"added": items, "total_items": len(items) + 3}
    return {"error": f"no tool named {name}"}


@dataclass
class Step:
    """One scripted exchange: what the user says (and shows), with the tools offered or not."""
    say: str
    tools: bool = False
    image: tuple[list[tuple[str, str]], str] | None = None  # ([(colour, shape)], background)


# Within the world it was trained on (training/README.md): a city and an amount from its training
# pools. On names it never saw with a tool it does not generalize yet (the held-out figures there).
SCRIPT = [
    Step("Hello! Who are you?"),
    Step("What is the capital of Japan?"),
    Step("What's the weather in Helsinki?", tools=True),
    Step("How much is 120 USD in EUR?", tools=True),
    Step("What is in this image?", image=([("red", "circle")], "white")),
]

def build(workdir: Path, progress=None) -> tuple[Path, list[Output]]:
    """The checkpoint (materialized once per weights file) and its GGUF + mmproj."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConvertError(f"cannot use {workdir} for the demo: {e.strerror}") from None
    ckpt = workdir / "checkpoint"
    sha = load_manifest()["files"]["weights.safetensors"]
    stamp = ckpt / ".weights-sha256"
    if not stamp.is_file() or stamp.read_text() != sha:
        materialize(ckpt)
        stamp.write_text(sha)
    outputs = convert(ckpt, (QTYPE,), workdir / f"qwen35-demo-{QTYPE.upper()}.gguf", force=True, progress=progress,
                      mmproj="f16")
    return ckpt, outputs


def converse(gguf: Path, say: Callable[[str], None], threads: int | None = None) -> list[dict]:
    """Run SCRIPT through ChatSession (greedy, thinking off), executing the model's tool calls.
    Returns the transcript: [{"user", "calls", "results", "reply"}]."""
    from ..runtime import ChatSession

    transcript = []
    with ChatSession(str(gguf), n_ctx=2048, threads=threads, think=False, temp=0.0, prefill=False,
                     max_tokens=120) as chat:
        for step in SCRIPT:
            chat.reset()
            images = []
            if step.image:
                shapes, background = step.image
                images = [corpus.draw_scene(random.Random(0), shapes, background)]
                described = " and ".join(f"a {colour} {shape}" for colour, shape in shapes)
                say(f"\n> [an image: {described} on {background}] {step.say}")
            else:
                say(f"\n> {step.say}")
            tools = corpus.TOOLS if step.tools else None
            reply = chat.send(step.say, images=images or None, tools=tools)
            calls, results = [], []
            if reply.tool_calls:
                for call in reply.tool_calls:
                    fn = call["function"]
                    arguments = fn["arguments"] if isinstance(fn["arguments"], dict) else json.loads(fn["arguments"])
                    calls.append({"name": fn["name"], "arguments": arguments})
                    results.append(run_tool(fn["name"], arguments))
                    say(f"  [calls {fn['name']}({json.dumps(arguments)}) -> {json.dumps(results[-1])}]")
                reply = chat.send([{"role": "tool", "content": json.dumps(r)} for r in results], tools=tools)
            say(reply.content)
            transcript.append({"user": step.say, "calls": calls, "results": results, "reply": reply.content})
    return transcript
