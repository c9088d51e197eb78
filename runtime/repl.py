"""The interactive chat of `qwen35 run` on a terminal."""

from __future__ import annotations

import signal
import sys
from contextlib import contextmanager

from .errors import ChatError
from .session import ChatSession

DIM, RESET, CLEAR_LINE = "\033[2m", "\033[0m", "\r\033[K"

HELP = """\
Type a message and press Enter. For several lines, end a line with \\ or wrap them in \"\"\".
  /think on|off    reasoning before answering (now: {think})
  /system TEXT     set the system prompt and start over (/system alone clears it)
  /reset           forget the conversation
  /save FILE       save the conversation, model state included
  /load FILE       resume a saved conversation
  /stats           numbers for the last reply
  /exit            leave (or Ctrl-D); Ctrl-C stops a reply"""


class Repl:
    def __init__(self, session: ChatSession, *, hide_thinking: bool, out=sys.stdout) -> None:
        self.session = session
        self.hide_thinking = hide_thinking
        self.out = out

    def run(self) -> None:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        self._print(f"{DIM}Chatting with {self.session.model_file.path.name}. /help for commands, "
                    f"Ctrl-D to leave.{RESET}")
        while True:
            try:
                text = self._read_message()
            except EOFError:
                self._print("")
                return
            except KeyboardInterrupt:
                self._print("^C")
                continue
            if not text.strip():
                continue
            if text.startswith("/"):
                if self._command(text.strip()) == "exit":
                    return
                continue
            self._reply(text)

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
        kind = None  # what the last piece shown was
        try:
            with self._ctrl_c_stops_reply():
                for piece in self.session.stream(text):
                    self._show(piece, kind)
                    kind = piece.kind
        except ChatError as e:
            self._print(f"{RESET}error: {e}")
            return
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
        else:
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
                self._print(f"thinking is {'on' if s.thinks else 'off'}")
            elif name == "/system":
                s.set_system(arg or None)
                self._print(f"system prompt {'set' if arg else 'cleared'}; conversation reset")
            elif name == "/reset":
                s.reset()
                self._print("conversation reset")
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
                    self._print(f"loaded {len(s.messages)} messages from {arg}")
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
            f"({stats.get('finish_reason', '-')}); context: {num('context_tokens', 'd')} tokens")
