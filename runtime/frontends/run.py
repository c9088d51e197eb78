"""`qwen35 run`: an interactive chat on a terminal, or one answer for a prompt (`-p`, or stdin)."""

from __future__ import annotations

import json
import sys

from ..conversation import journal as journals
from ..conversation.session import ChatSession
from ..engine.errors import ChatError, ContextFull
from .repl import DIM, RESET, Repl


def run(model: str, *, prompt: str | None, as_json: bool, hide_thinking: bool, session_options: dict,
        resume: bool = False, images: list[str] = (), video: str | None = None) -> int:
    """Returns the exit status: 0, or ContextFull.exit_code when a one-shot reply ran out of context.
    `images` and `video` go with the prompt (interactive: with the first message)."""
    if prompt is None and not sys.stdin.isatty():
        prompt = sys.stdin.read()
        if not prompt.strip():
            raise ChatError("no prompt: stdin was empty (give one with -p PROMPT)")
    if prompt is None and as_json:
        raise ChatError("--json answers one prompt: give it with -p PROMPT or on stdin")
    if prompt is not None and resume:
        raise ChatError("--resume takes up the interactive chat: leave out -p and stdin")
    if (images or video) and resume:
        raise ChatError("--image and --video start a conversation; --resume takes one up: use /image PATH or "
                        "/video PATH in it instead")

    interactive = prompt is None
    if interactive:
        print(f"{DIM}loading {model}…{RESET}", file=sys.stderr, flush=True)
    # Prefilling the next prompt only pays when there is a next turn.
    with ChatSession(model, prefill=interactive, **session_options) as session:
        for warning in session.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        if session_options.get("verbose"):
            for note in session.notes:
                print(f"note: {note}", file=sys.stderr)
            print(session.describe_placement(), file=sys.stderr)
        if interactive:
            for image in images:  # checked before the chat starts (a one-shot prompt checks them as it is sent)
                session.add_image(image)
            if video is not None:
                session.add_video(video)
            _chat(session, hide_thinking, resume, images, video)
            return 0
        if as_json:
            return _answer_json(session, prompt, images, video)
        return _answer(session, prompt, hide_thinking, images, video)


def _chat(session: ChatSession, hide_thinking: bool, resume: bool, images: list[str], video: str | None) -> None:
    fingerprint = session.model_fingerprint
    found = journals.latest(fingerprint) if resume else None
    if resume and found is None:
        print(f"{DIM}no earlier conversation with this model to resume: starting a new one{RESET}", file=sys.stderr)
    if found:
        journal, entry = found
        how = journals.resume(session, journal, entry)
        Repl(session, hide_thinking=hide_thinking, journal=journal, resumed=how, pending=entry.get("pending")).run()
    else:
        Repl(session, hide_thinking=hide_thinking, images=images, video=video,
             journal=journals.Journal.new(session.model_file.path.name, fingerprint)).run()


def _answer(session: ChatSession, prompt: str, hide_thinking: bool, images: list[str], video: str | None) -> int:
    """The answer on stdout as it is generated; reasoning (dimmed on a terminal) and notices on
    stderr, so `qwen35 run -p … > answer.txt` holds only the answer."""
    dim, reset = (DIM, RESET) if sys.stderr.isatty() else ("", "")
    reasoning_shown = False
    for piece in session.stream(prompt, images, video=video):
        if piece.kind == "content":
            sys.stdout.write(piece.text)
            sys.stdout.flush()
        elif piece.kind == "reasoning" and not hide_thinking:
            sys.stderr.write(f"{dim}{piece.text}{reset}")
            sys.stderr.flush()
            reasoning_shown = True
        elif piece.kind == "notice":
            sys.stderr.write(f"\n[{piece.text}]\n")
    if reasoning_shown:
        sys.stderr.write("\n")
    sys.stdout.write("\n")
    return ContextFull.exit_code if session.stats["finish_reason"] == "context" else 0


def _answer_json(session: ChatSession, prompt: str, images: list[str], video: str | None) -> int:
    reply = session.send(prompt, images, video=video)
    out = {"reasoning": reply.reasoning, "content": reply.content}
    if reply.tool_calls:
        out["tool_calls"] = reply.tool_calls
    out["finish_reason"] = reply.finish_reason
    if reply.notices:
        out["notices"] = reply.notices
    out["stats"] = {k: round(v, 4) if isinstance(v, float) else v for k, v in reply.stats.items()}
    print(json.dumps(out, ensure_ascii=False, indent=2))
    return ContextFull.exit_code if reply.finish_reason == "context" else 0


def one_shot(model_path, prompt: str, *, max_tokens: int | None = 64, think: bool = False, **options) -> str:
    """The answer to one prompt, e.g. for a demo; reasoning is off unless `think=True` (a short
    budget would otherwise go to reasoning)."""
    with ChatSession(model_path, think=think, prefill=False, **options) as chat:
        return chat.send(prompt, max_tokens=max_tokens).content
