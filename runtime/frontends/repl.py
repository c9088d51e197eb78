"""The interactive chat of `qwen35 run` on a terminal."""

from __future__ import annotations

import signal
import sys
from contextlib import contextmanager

from ..engine.errors import ChatError
from ..conversation.journal import Journal
from ..conversation.session import ChatSession

DIM, RESET, CLEAR_LINE = "\033[2m", "\033[0m", "\r\033[K"

HELP = """\
Type a message and press Enter. For several lines, end a line with \\ or wrap them in \"\"\".
  /think on|off    reasoning before answering (now: {think})
  /system TEXT     set the system prompt and start over (/system alone clears it)
  /reset           forget the conversation
  /save FILE       save the conversation, model state included
  /load FILE       resume a saved conversation
  /image PATH      show the model an image with your next message (repeat for several)
  /video PATH      show the model a video (a file: needs ffmpeg; or a directory of frames) with your next message
  /stats           numbers for the last reply
  /retry           send again the message the last session did not answer
  /exit            leave (or Ctrl-D); Ctrl-C stops a reply
The conversation is kept on disk as it goes: `qwen35 run MODEL --resume` takes it up again."""


class Repl:
    """`journal` keeps the conversation on disk after every message (see runtime.journal); `pending`
    is a message a previous process received but did not answer (after a crash): its text, or as
    the journal keeps one with images or a video, {"text", "images", "video"}."""

    def __init__(self, session: ChatSession, *, hide_thinking: bool, journal: Journal | None = None,
                 resumed: str | None = None, pending: str | dict | None = None, images: list[str] = (),
                 video: str | None = None, out=sys.stdout) -> None:
        self.session = session
        self.images = list(images)  # attached to the next message
        self.video = video  # likewise
        self.hide_thinking = hide_thinking
        self.journal = journal
        self.resumed = resumed
        self.pending = pending
        self.out = out

    def run(self) -> None:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        self._print(f"{DIM}Chatting with {self.session.model_file.path.name}. /help for commands, "
                    f"Ctrl-D to leave.{RESET}")
        if self.resumed:
            self._show_resumed()
        while True:
            try:
                text = self._read_message()
            except EOFError:
                self._print("")
                self._leave()
                return
            except KeyboardInterrupt:
                self._print("^C")
                continue
            if not text.strip():
                continue
            if text.startswith("/"):
                if self._command(text.strip()) == "exit":
                    self._leave()
                    return
                continue
            self._reply(text)

    def _show_resumed(self) -> None:
        messages = self.session.messages
        self._print(f"{DIM}Resumed a conversation of {len(messages)} messages ({self.resumed}).{RESET}")
        for message in messages[-2:]:
            text = message.get("content") or ""
            if isinstance(text, list):  # a message with images
                text = "".join(p["text"] if p["type"] == "text" else f"[{p['type']}] " for p in text)
            self._print(f"{DIM}{message['role']}: {text[:300]}{'…' if len(text) > 300 else ''}{RESET}")
        if self.pending:
            shown = "" if isinstance(self.pending, str) else " with its images" if not self.pending.get("video") \
                else " with its video"
            self._print(f"{DIM}Your last message was not answered (the process ended): /retry sends it again"
                        f"{shown}.{RESET}")

    def _record(self, pending: str | None = None, images=(), video: str | None = None) -> None:
        if self.journal:
            warning = self.journal.record(self.session, pending=pending, images=images, video=video)
            if warning:
                self._print(f"{DIM}[{warning}]{RESET}")

    def _leave(self) -> None:
        if self.journal:
            self.journal.save_state(self.session)

    def _new_journal(self) -> None:
        """A conversation started over gets a journal of its own: the old one stays resumable."""
        if self.journal:
            self.journal = Journal.new(self.session.model_file.path.name, self.journal.model,
                                       self.journal.path.parent)

    # --- input ----------------------------------------------------------------------------------

    def _read_message(self) -> str:
        line = input(">>> ")
        if line.lstrip().startswith('"""'):
            # A block: everything up to the next line that ends with """.
            lines = [line.lstrip()[3:]]
            while not lines[-1].rstrip().endswith('"""'):
                lines.append(input("... "))
            lines[-1] = lines[-1].rstrip()[:-3]
            return "\n".join(lines).strip("\n")
        lines = [line]
        while lines[-1].endswith("\\"):
            lines[-1] = lines[-1][:-1]
            lines.append(input("... "))
        return "\n".join(lines)

    # --- a reply --------------------------------------------------------------------------------

    def _reply(self, text: str) -> None:
        self.pending = None
        images, self.images = self.images, []
        video, self.video = self.video, None
        self._record(pending=text, images=images, video=video)  # before anything can go wrong: it is on disk
        kind = None  # what the last piece shown was
        recorded = len(self.session.messages)
        try:
            with self._ctrl_c_stops_reply():
                for piece in self.session.stream(text, images, video=video):
                    self._show(piece, kind)
                    kind = piece.kind
        except ChatError as e:
            self._print(f"{RESET}error: {e}")
            if len(self.session.messages) == recorded:
                self.images, self.video = images, video  # the message was not taken: they stay attached for the next
            self._record()
            return
        self._record()
        if kind == "reasoning":
            self._write(RESET + (CLEAR_LINE if self.hide_thinking else ""))
        reason = self.session.stats.get("finish_reason")
        if reason == "interrupted":
            self._write(f"\n{DIM}[stopped]{RESET}")
        elif reason == "length":
            self._write(f"\n{DIM}[reached --max-tokens]{RESET}")
        self._print("")

    def _show(self, piece, previous: str | None) -> None:
        """Reasoning dimmed (or a "thinking…" placeholder), the answer plain, notices bracketed."""
        if piece.kind == "reasoning":
            if previous != "reasoning":
                self._write(f"{DIM}thinking…" if self.hide_thinking else DIM)
            if not self.hide_thinking:
                self._write(piece.text)
            return
        if previous == "reasoning":
            self._write(f"{RESET}{CLEAR_LINE}" if self.hide_thinking else f"{RESET}\n\n")
        if piece.kind == "notice":
            self._write(f"\n{DIM}[{piece.text}]{RESET}\n")
        elif piece.kind == "content":  # (a tool call's pieces are for programs)
            self._write(piece.text)

    @contextmanager
    def _ctrl_c_stops_reply(self):
        """While a reply streams, Ctrl-C asks the session to stop it after the current token instead
        of raising in the middle of a llama.cpp call."""
        previous = signal.signal(signal.SIGINT, lambda *_: self.session.interrupt())
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    # --- commands -------------------------------------------------------------------------------

    def _command(self, line: str) -> str | None:
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        s = self.session
        try:
            if name in ("/exit", "/quit", "/bye"):
                return "exit"
            if name in ("/help", "/?"):
                self._print(HELP.format(think="on" if s.thinks else "off"))
            elif name == "/think":
                if arg not in ("on", "off", ""):
                    self._print("usage: /think on|off")
                elif arg:
                    s.think = arg == "on"
                    self._record()
                self._print(f"thinking is {'on' if s.thinks else 'off'}")
            elif name == "/system":
                s.set_system(arg or None)
                self._new_journal()
                self._print(f"system prompt {'set' if arg else 'cleared'}; conversation reset")
            elif name == "/reset":
                s.reset()
                self._new_journal()
                self._print("conversation reset")
            elif name == "/retry":
                if self.pending:
                    text, self.images, self.video = self.journal.pending_message(self.pending) if self.journal \
                        else (self.pending, [], None)
                    self._reply(text)
                else:
                    self._print("no unanswered message to send again")
            elif name == "/save":
                if not arg:
                    self._print("usage: /save FILE")
                else:
                    s.save(arg)
                    self._print(f"saved {len(s.messages)} messages to {arg}")
            elif name == "/load":
                if not arg:
                    self._print("usage: /load FILE")
                else:
                    s.load(arg)
                    self._record()
                    self._print(f"loaded {len(s.messages)} messages from {arg}")
            elif name == "/image":
                if not arg:
                    self._print("usage: /image PATH")
                else:
                    part = s.add_image(arg)  # checked now: a bad file is said before the message is typed
                    self.images.append(arg)
                    self._print(f"{arg} ({s.image_tokens(part)} tokens) goes with your next message")
            elif name == "/video":
                if not arg:
                    self._print("usage: /video PATH")
                else:
                    part = s.add_video(arg)  # sampled and checked now, before the message is typed
                    self.video = arg
                    self._print(f"{arg} ({len(part['seconds'])} frame pairs, {s.image_tokens(part)} tokens) goes "
                                "with your next message")
            elif name == "/stats":
                self._print(format_stats(s.stats) if s.stats else "no reply yet")
            else:
                self._print(f"unknown command {name}; /help lists them")
        except ChatError as e:
            self._print(f"error: {e}")
        return None

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def _print(self, text: str) -> None:
        self._write(text + "\n")


def format_stats(stats: dict) -> str:
    def num(key, fmt):
        value = stats.get(key)
        return format(value, fmt) if isinstance(value, (int, float)) else "-"

    return (f"prompt: {num('prompt_tokens', 'd')} tokens evaluated ({num('prefilled_tokens', 'd')} of them while "
            f"you typed), {num('cached_tokens', 'd')} reused; first token after {num('ttft_s', '.3f')} s\n"
            f"reply: {num('gen_tokens', 'd')} tokens at {num('gen_tps', '.1f')} tokens/s "
            f"({stats.get('finish_reason', '-')}); context: {num('context_tokens', 'd')} tokens"
            + (f"\nimages: {num('image_tokens', 'd')} tokens encoded and evaluated in {num('image_encode_s', '.3f')} s"
               if stats.get("image_tokens") else "")
            + (f"\nspeculative decoding: {num('accepted_tokens', 'd')} of {num('drafted_tokens', 'd')} drafted tokens "
               f"accepted" if stats.get("drafted_tokens") else ""))
