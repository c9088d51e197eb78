"""The model's own chat template (from the GGUF), rendered the way Hugging Face transformers does.

The prompt must be byte-for-byte what the checkpoint's tokenizer would build: the same Jinja
settings (trim_blocks, lstrip_blocks, loop controls, a sandbox), the same `tojson` (no HTML
escaping) and the same variables (`messages`, `tools`, `add_generation_prompt`, `enable_thinking`).
"""

from __future__ import annotations

import json
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..engine.errors import ChatError


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTemplate:
    def __init__(self, source: str) -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as e:
            raise ChatError(f"the model's chat template does not parse: {e}") from None
        self.source = source
        # The last rendering, by its variables: a server renders each request twice, once to check
        # it as it arrives (fields.check_conversation) and once as its turn's prompt, ~0.3 ms each
        # for an agent's conversation. Not for a template that reads the clock.
        self._last: tuple[str, str] | None = None
        self._remembers = "strftime_now" not in source

    def render(self, messages: list[dict], *, add_generation_prompt: bool, think: bool | None,
               tools: list[dict] | None = None) -> str:
        """`think=None` leaves `enable_thinking` undefined: the template's own default applies."""
        variables = {"messages": messages, "add_generation_prompt": add_generation_prompt}
        if tools:
            variables["tools"] = tools
        if think is not None:
            variables["enable_thinking"] = think
        key = None
        if self._remembers:
            try:
                key = json.dumps(variables, ensure_ascii=False)
            except (TypeError, ValueError):  # (not JSON: rendered every time)
                pass
            last = self._last
            if key is not None and last is not None and last[0] == key:
                return last[1]
        try:
            text = self._template.render(**variables)
        except jinja2.TemplateError as e:
            raise ChatError(f"the model's chat template refused the conversation: {e}") from None
        if key is not None:
            self._last = (key, text)  # (one assignment: the server's two threads read it whole)
        return text

    def thinks_by_default(self) -> bool:
        """Whether the generation prompt opens a reasoning block when nothing is said."""
        return self.render([{"role": "user", "content": "x"}], add_generation_prompt=True,
                           think=None).rstrip().endswith("<think>")

    def supports_thinking_switch(self) -> bool:
        return "enable_thinking" in self.source
