"""ChatSession: a multi-turn chat with a Qwen3.5 GGUF that never re-reads its history.

Why this is not simply "keep the KV cache": Qwen3.5's chat template drops the reasoning of earlier
turns, so the text the model generated (`<think>…</think>` + answer) is not the text the next turn's
prompt contains; and three layers in four are Gated DeltaNet, whose recurrent state cannot be rolled
back to an earlier token the way an attention KV cache can be trimmed. So at each turn we snapshot
the recurrent state at the last point that every later rendering shares — the assistant header after
the user's message, before `<think>` — and the next turn restores it, trims the attention cache to
the same point, and evaluates only what follows: the answer as the template re-renders it, and the
new message. The model's context is always exactly the template's rendering of the conversation.

Images (`send(text, images=[...])`, with the model's mmproj) are encoded once: the checkpoint after
the user message that holds one already contains it, so later turns restore it and evaluate only
their new text. In the state cache an image is a run of stand-in cells (state_cache.py); positions
and cells part ways after it (M-RoPE), and the context-full checks count cells.
"""

from __future__ import annotations

import contextlib
import functools
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from ..engine import native
from ..engine.decoder import Decoder
from ..engine.errors import ChatError, ContextFull
from ..engine.modelfile import QWEN35_ARCHS, ModelFile, read_model_file
from ..engine.native import FULL, Sampling
from ..engine.speculative import AUTO, DRAFT_VOCAB, split_state
from ..engine.state_cache import PREFIX, PROMPT, TURN, Checkpoint
from ..engine.vision import DEFAULT_IMAGE_MAX_TOKENS, find_mmproj
from . import constraints
from .boundaries import TurnBoundaries
from .constraints import Constraint
from .generation import Request, generate
from .media import Media
from .prefill import Prefill, common_prefix
from .reasoning import CONTENT, TOOL_CALL, TOOL_CALL_ARGUMENTS, TOOL_CALL_START, Piece, ReplySplitter, StopStrings
from .saved import fingerprint, read_session, write_session
from .template import ChatTemplate
from .tools import ToolCallReader, check_tools, nfc, prepare_messages

# A system prompt (with its tools) shorter than this gets no checkpoint of its own: ending a decode
# there costs about what evaluating it again in a later conversation's first batch would (measured
# on 2 cores: a 17-token system turn split off a 137-token prompt added ~50 ms, about 9 tokens' worth).
MIN_PREFIX_CHECKPOINT = 64
PREFIXES_KEPT = 8  # system prompts (with tools) whose turn's length is remembered (_prefix_boundary)

# Used only when a (non-Qwen3.5) GGUF carries no template: plain ChatML, which Qwen models speak.
_CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
           "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

@dataclass
class Reply:
    reasoning: str
    content: str
    tool_calls: list[dict]  # [{"id", "type": "function", "function": {"name", "arguments": {...}}}]
    finish_reason: str  # stop | length | context | loop | interrupted
    stats: dict
    notices: list[str] = field(default_factory=list)
    call_cut_off: bool = False  # the reply ended inside its last tool call (whose arguments hold what was written)
    stop_sequence: str | None = None  # the caller's stop string that ended the reply, if one did


def _exclusive(method):
    """A ChatSession method that uses the llama.cpp context: one thread at a time (ChatSession._in_use)."""
    @functools.wraps(method)
    def wrapped(self, *args, **kwargs):
        with self._in_use():
            return method(self, *args, **kwargs)
    return wrapped


class ChatSession:
    """A conversation with one GGUF model.

    `send(message)` returns a Reply; `stream(message)` yields Pieces as they are generated
    (reasoning, content and tool calls kept apart). A message is the user's text, or a message dict
    — e.g. a tool's result, {"role": "tool", "tool_call_id": …, "content": …} — or a list of them.
    `tools` (OpenAI function schemas), given here or per call, are offered to the model; its calls
    come back in `Reply.tool_calls`, with ids. `stats` describes the last turn; `save(path)`/
    `load(path)` persist the conversation with the model state; `reset()` starts over. Sampling
    keywords (temp, top_k, top_p, min_p, repeat_penalty, presence_penalty, max_tokens) default to
    the GGUF's recommended values.

    `send(text, images=[path or bytes, …])` shows the model images with the message (placed before
    the text, as Qwen's examples place them); they need the model's mmproj, found beside it as
    `qwen35 convert` names it or given as `mmproj`; `image_max_tokens` bounds each image's tokens.

    `respond(messages)` answers a whole conversation given by the caller (the server's way: each
    request re-sends the history) without recording it; the state cache (state_cache.py) makes it
    evaluate only what no earlier prompt evaluated, for several interleaved conversations.

    With `prefill` (the default), after each reply the part of the next prompt that is already known
    (the answer as the template re-renders it, up to the next user message, or into the tool
    results after a reply that called tools) is evaluated in a background thread while the user
    reads and types, or the tools run; it is counted in the next turn's prompt_tokens. `respond`
    does the same with the reply as OpenAI clients send it back (content and tool calls). Turn it
    off for one-shot use, where there is no next turn.

    With `adapt_threads` (the default), the session runs on fewer threads while other programs keep
    cores busy and returns to `threads` when they are free (adaptive_threads.py; measured by
    bench/bench_busy.py: busy, 0.95× the best fixed count; quiet, 0.98× the fixed default).

    `speculative` ("auto", "mtp" or "off") decodes with the model's own multi-token-prediction head
    (speculative.py): it drafts up to `draft_tokens` tokens and the model checks them in one pass,
    so a step can emit several tokens; the tokens are the model's own, as without it (greedy: the
    same tokens). "auto" uses it when the GGUF has an MTP block, unless this machine's step costs
    (learnt from decoding, remembered) say it cannot pay (speculative.drafting_verdict), drafting as many a
    step as pay at the acceptance it sees (speculative.DraftPolicy); "mtp" always drafts
    `draft_tokens` (an error for a GGUF without one). Drafts choose among the `draft_vocab` most
    frequent tokens (draft_head.py: a draft then costs a fraction of its whole-vocabulary cost; 0: the
    whole vocabulary); the model's check uses the whole vocabulary, so the tokens are unchanged.
    Either way, a llama-cpp-python without the hidden-state functions it needs gives a warning
    and plain decoding.
    """

    def __init__(self, model_path, n_ctx: int = 4096, threads: int | None = None, think: bool | None = None,
                 seed: int | None = None, *, system: str | None = None, tools: list[dict] | None = None,
                 cache_ram: int | None = None, force: bool = False, prefill: bool = True, verbose: bool = False,
                 adapt_threads: bool = True, mmproj=None, image_max_tokens: int | None = DEFAULT_IMAGE_MAX_TOKENS,
                 speculative: str = AUTO, draft_tokens: int = 3, draft_vocab: int = DRAFT_VOCAB,
                 **sampling) -> None:
        self._user = threading.RLock()  # held by the thread using the context (_in_use)
        self._vocabulary: constraints.VocabularyBuild | None = None  # to build while idle
        native.init(verbose)
        self.model_file = mf = read_model_file(model_path)
        self.warnings: list[str] = []
        if mf.architecture not in QWEN35_ARCHS:
            self.warnings.append(f"{mf.path} is a '{mf.architecture or 'unnamed'}' model, not Qwen3.5: "
                                 "running it as is, without Qwen3.5's reasoning and template guarantees")
        self.template = ChatTemplate(mf.chat_template or _CHATML)
        self._prefix_lengths: dict[str, int] = {}  # (_prefix_boundary) by system prompt and tools
        self.tools = check_tools(tools)
        self.max_tokens = sampling.pop("max_tokens", None)
        self._sampling = self._sampling_from(mf, seed, sampling)
        vision, expected = (Path(mmproj), None) if mmproj is not None else find_mmproj(mf)
        # The engine under the conversation: the model, its context, checkpoints and drafts.
        self.decoder = Decoder(mf, n_ctx, threads, cache_ram=cache_ram, force=force, adapt_threads=adapt_threads,
                               mmproj=vision, image_max_tokens=image_max_tokens, speculative=speculative,
                               draft_tokens=draft_tokens, draft_vocab=draft_vocab)
        self.warnings += self.decoder.warnings
        self.notes = list(self.decoder.notes)  # (no fault: --verbose says them)
        if not constraints.FAST:
            self.warnings.append(constraints.FALLBACK_NOTICE)
        self.memory, self.n_ctx, self.cache = self.decoder.memory, self.decoder.n_ctx, self.decoder.cache
        model = self.decoder.model
        self._think_open = model.single_token("<think>")
        self._think_close = model.single_token("</think>")
        self._tool_call = model.single_token("<tool_call>")

        self.think = think  # None: the template's default
        self.system = nfc(system) if system else None
        self.messages: list[dict] = []
        self.stats: dict = {}
        self.last_reply: Reply | None = None
        self.media = Media(model, mf.path.name, self.n_ctx, self.decoder.threads, vision, expected, image_max_tokens)
        self.decoder.images = self.media.evaluate
        self.prefill = Prefill(self.decoder, self._render_cells, prefill)
        self.boundaries = TurnBoundaries(self.template.render, self.media.cells)
        self._foresight: tuple[list[dict], list[dict], bool | None] | None = None  # for idle(): boundaries.foresee
        if mmproj is not None:
            self.media.vision()  # a file named by the user is checked now, not at the first image

    @property
    def threads(self) -> int:
        return self.decoder.threads

    @property
    def draft_tokens(self) -> int:
        return self.decoder.draft_tokens

    # --- public API -----------------------------------------------------------------------------

    @property
    def thinks(self) -> bool:
        """Whether the next reply will start with reasoning."""
        if self.think is not None:
            return self.think
        return self.template.thinks_by_default()

    @property
    def sees_images(self) -> bool:
        """Whether the model has its vision tower (mmproj): images can be shown to it."""
        return self.media.has_vision

    def send(self, message, images=None, *, video=None, **overrides) -> Reply:
        for _ in self.stream(message, images, video=video, **overrides):
            pass
        return self.last_reply

    def stream(self, message, images=None, *, video=None, **overrides) -> Iterator[Piece]:
        """Yield the reply as it is generated. Ends the turn cleanly if `interrupt()` is called (from
        a signal handler, say) or if the caller stops iterating. `images` (paths or encoded bytes)
        go with a text message, and so does `video` (a video file, a directory of its frames, or a
        list of frames: see `add_video`); they are checked here, before anything is evaluated.
        Options: think, max_tokens, tools, stop, parallel_tool_calls (False: the reply ends with
        its first tool call) and the sampling keywords."""
        if images or video is not None:
            if not isinstance(message, str):
                raise ChatError("images and videos go with a text message")
            parts = [self.add_image(image) for image in images or ()]
            if video is not None:
                parts.append(self.add_video(video))
            message = {"role": "user", "content": parts + ([{"type": "text", "text": message}] if message else [])}
        new = prepare_messages([{"role": "user", "content": message}] if isinstance(message, str)
                               else [message] if isinstance(message, dict) else message)
        tools = overrides.pop("tools", None)
        request = self._request(overrides, tools=self.tools if tools is None else check_tools(tools))
        with self._in_use():  # (another thread's turn keeps its interrupt)
            self.decoder.stop.clear()
        return self._turn_generator(self._conversation(), new, request, record=True)

    def respond(self, messages: list[dict], *, images=(), tools: list[dict] | None = None,
                constraint: Constraint | None = None, read_tool_calls: bool = True,
                reasoning_comes_back: bool = False, **overrides) -> Iterator[Piece]:
        """Yield the reply to a whole conversation (OpenAI-style messages, system prompt included),
        without recording it in `messages`. `images`: the encoded files that the messages' image
        parts ({"type": "image", "image": <SHA-256>}) name. `constraint` limits what the answer may
        be (see constraints.py); `read_tool_calls=False` leaves call-like text in the content;
        `parallel_tool_calls=False` ends the reply with its first complete tool call, whatever the
        constraint (the server's `parallel_tool_calls: false`, `disable_parallel_tool_use`).
        `reasoning_comes_back`: the next request will hold this reply with its reasoning (a server
        that keeps the conversation itself), which the prefill between requests then assumes."""
        conversation = prepare_messages(messages)
        self._hold_images(conversation, images)
        request = self._request(overrides, tools=check_tools(tools), constraint=constraint,
                                read_tool_calls=read_tool_calls)
        with self._in_use():  # (another thread's turn keeps its interrupt)
            self.decoder.stop.clear()
        return self._turn_generator(conversation[:-1], conversation[-1:], request, record=False,
                                    reasoning_comes_back=reasoning_comes_back)

    def expect(self, messages: list[dict], *, images=(), tools: list[dict] | None = None) -> None:
        """A conversation whose next request is likely (a server's client has just opened it):
        `idle()` evaluates its known start as it does a reply's, in small steps that a waiting request
        stops, so the reply to its next message does not wait for the conversation to be read."""
        conversation = prepare_messages(messages)
        self._hold_images(conversation, images)
        self.prefill.guess = (conversation, check_tools(tools))

    @_exclusive
    def add_image(self, source) -> dict:
        """Check an image (a path or encoded bytes: it must decode, and fit the context) and keep it
        for the conversation; returns the content part that shows it in a message,
        {"type": "image", "image": <SHA-256 of the bytes>, "path": …}. `stream(images=…)` calls it."""
        self._settle()  # (the prefill may be using the projector)
        return self.media.add_image(source)

    @_exclusive
    def add_video(self, source) -> dict:
        """Check a video and keep its frames for the conversation: a video file (sampled as Qwen3.5
        samples it, with ffmpeg), a directory of frame images or a list of frames (paths or bytes),
        taken as sampled at 2 a second (video.py). Every pair of frames must decode, be of one size
        and fit the context. Returns the content part that shows it in a message, {"type": "video",
        "video": <SHA-256 of its frames' ids>, "frames": [SHA-256, …], "seconds": [per pair]}."""
        self._settle()
        return self.media.add_video(source)

    def image_bytes(self, image_id: str) -> bytes | None:
        """The encoded file of an image (or video frame) the conversation shows, by its SHA-256."""
        return self.media.images.get(image_id)

    def image_tokens(self, part: dict) -> int:
        """The context cells an image or video part (from `add_image`, `add_video`) takes, start and
        end marks (and a video's timestamps) included."""
        return self.media.tokens_of(part)

    def interrupt(self) -> None:
        """Stop the reply being generated (safe to call from a signal handler or another thread)."""
        self.decoder.stop.set()

    @_exclusive
    def reset(self) -> None:
        """Forget the conversation (the system prompt and settings stay)."""
        self._settle()
        self.messages = []
        self.cache.forget()
        self.prefill.forget()
        self.boundaries.forget()
        self._foresight = None
        self.stats = {}
        self.media.forget()

    def set_system(self, text: str | None) -> None:
        """A new system prompt changes the start of the prompt: the conversation starts over."""
        self.system = nfc(text) if text else None
        self.reset()

    def restore(self, messages: list[dict], *, system: str | None = None, think: bool | None = None,
                images=()) -> None:
        """Take up a conversation whose model state was not saved (the REPL's journal after a
        crash), with the encoded `images` it shows (others are read again from their paths). It is
        evaluated once: by the background prefill while the user types, or else by the next turn."""
        self.reset()
        self.system = nfc(system) if system else None
        self.think = think
        self.messages = [dict(m) for m in messages]
        self._hold_images([], images)
        if self.prefill.enabled and self.messages:
            self.prefill.start(self._conversation(), self.tools)

    @property
    def model_fingerprint(self) -> dict:
        """What tells this model file from another (saved conversations are kept per model)."""
        return fingerprint(self.model_file)

    def describe_placement(self) -> str:
        """The CPU features llama.cpp uses, where the weights landed (AMX / CPU_REPACK / CPU), and why."""
        return self.decoder.model.describe_placement()

    def context_tokens(self) -> list[int]:
        """The tokens the model state holds (for tests: it must equal the template's rendering)."""
        self._settle()
        return list(self.cache.tokens)

    def render(self, *, add_generation_prompt: bool = True, think: bool | None = None) -> str:
        """The template's rendering of the conversation so far (+ the generation prompt)."""
        return self.template.render(self._conversation(), add_generation_prompt=add_generation_prompt,
                                    think=self.think if think is None else think, tools=self.tools)

    def tokenize(self, text: str) -> list[int]:
        return self.decoder.model.tokenize(nfc(text))

    @_exclusive
    def set_threads(self, threads: int, *, adapt: bool = False) -> None:
        """Run the next decodes on `threads` CPU threads (the model and its state stay loaded); with
        `adapt`, at most that many, fewer while other programs take cores."""
        self._settle()
        self.decoder.set_threads(threads, adapt=adapt)
        self.media.threads = threads

    @property
    def speculative(self) -> str:
        """How the session decodes: "auto", "mtp" or "off" (always "off" without an MTP head)."""
        return self.decoder.policy.mode

    @_exclusive
    def set_speculative(self, mode: str) -> None:
        """Switch between "auto", "mtp" and "off" (e.g. to measure both ways on one loaded model);
        "auto" and "mtp" need the session to have been opened with its MTP head."""
        self._settle()
        self.decoder.set_speculative(mode)

    @_exclusive
    def idle(self, busy: Callable[[], bool] = lambda: False) -> None:
        """Nothing waits (a server between requests): evaluate the known start of the next prompt
        of the conversation `respond` last answered (see _prefill), in small steps, stopping as soon
        as `busy()` says a request waits; then read out the checkpoint that a prompt of another
        conversation would otherwise have to read first (StateCache.secure_live), so that switching
        conversations costs that prompt nothing. Done at idle, not at once after the reply: a client
        that sends its next, unrelated, request at once never waits for a guess about it. Last, the
        vocabulary view for constrained replies, if prepare_constraints(when_idle=True) asked for it."""
        self._settle()
        self.decoder.stop.clear()  # (an interrupt that came after its reply had ended is for no one now)
        guess, self.prefill.guess = self.prefill.guess, None
        if guess is not None and not busy():
            self.prefill.run(*guess, guess=True, busy=busy)
        if not busy():
            self.cache.secure_live()
        foresight, self._foresight = self._foresight, None
        if foresight is not None and not busy():
            self.boundaries.foresee(*foresight)
        if self._vocabulary is not None and self._vocabulary.step(busy) is not None:
            self._vocabulary = None  # (built: prepare_constraints)

    @_exclusive
    def save(self, path) -> None:
        """Write the conversation and the model state, so `load` resumes without re-reading it."""
        self._settle()
        tokens = self.cache.tokens
        ck = self.cache.deepest_held(TURN)
        state = self.decoder.state.get_state(FULL) if tokens else b""
        header = {
            "model": fingerprint(self.model_file),
            "system": self.system, "think": self.think, "messages": self.messages, "tools": self.tools,
            "tokens": tokens, "prefilled": next(([first, len(key)] for key, first in self.prefill.done.items()
                                                 if list(key) == tokens[:len(key)]), [0, 0]),
            "checkpoint_tokens": len(ck.tokens) if ck else 0,
        }
        write_session(path, header, state, ck.state if ck else b"", self.media.images)

    @_exclusive
    def load(self, path) -> None:
        """Resume a conversation written by `save` (with the same model file), model state included."""
        header, state, checkpoint, images = read_session(Path(path))
        if header["model"] != fingerprint(self.model_file):
            raise ChatError(f"{path} was saved with a different model ({header['model'].get('name')}); "
                            f"load it with that model")
        tokens = header["tokens"]
        if len(tokens) >= self.n_ctx:
            raise ChatError(f"{path} holds {len(tokens)} tokens, more than this context ({self.n_ctx}): "
                            f"raise --ctx-size")
        self.reset()
        if self.decoder.spec is None:  # saved with speculation on, loaded without: the model's part only
            state, checkpoint = split_state(state)[0], split_state(checkpoint)[0]
        if state:
            self.decoder.state.set_state(state, FULL)
        self.cache.tokens = list(tokens)
        n = header["checkpoint_tokens"]
        if checkpoint:
            self.cache.put(Checkpoint(tuple(tokens[:n]), bytearray(checkpoint), full=False, kind=TURN))
        first, end = header["prefilled"]
        self.prefill.done = {tuple(tokens[:end]): first} if end else {}
        self.system, self.think, self.messages = header["system"], header["think"], header["messages"]
        self.tools = header.get("tools") or []
        self.media.images = images

    def prepare_constraints(self, when_idle: bool = False) -> None:
        """Build what constrained replies need of the model (llguidance's view of its vocabulary,
        ~1.5 s once per model on two cores) ahead of the first one: now, or (`when_idle`, as a server
        does at start) in `idle()`, in steps that a waiting request stops (constraints.VocabularyBuild)."""
        if not constraints.FAST:
            return
        if when_idle:
            self._vocabulary = constraints.building(self.decoder.model)
        else:
            constraints.tokenizer(self.decoder.model)

    @property
    def prepared(self) -> bool:
        """Whether what prepare_constraints(when_idle=True) asked for is built (idle() builds it)."""
        return self._vocabulary is None

    def close(self) -> None:
        if getattr(self, "prefill", None):
            self._settle()
        if getattr(self, "media", None):
            self.media.close()
        if getattr(self, "decoder", None):
            self.decoder.close()

    def __enter__(self) -> "ChatSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- one turn -------------------------------------------------------------------------------

    def _turn_generator(self, history: list[dict], new: list[dict], request: Request,
                        record: bool, reasoning_comes_back: bool = False) -> Iterator[Piece]:
        with self._in_use():
            yield from self._turn(history, new, request, record, reasoning_comes_back)

    def _turn(self, history: list[dict], new: list[dict], request: Request,
              record: bool, reasoning_comes_back: bool = False) -> Iterator[Piece]:
        start = time.perf_counter()
        self._settle()  # waiting for the prefill counts in the time to first token
        self.prefill.guess = self._foresight = None  # (about the reply before: this turn replaces it)
        conversation = history + new
        tools = request.tools
        prompt_text = self.template.render(conversation, add_generation_prompt=True, think=request.think,
                                           tools=tools)
        prompt = self.media.cells(prompt_text, conversation)
        if len(prompt) >= self.n_ctx:
            raise ContextFull(f"the conversation ({len(prompt)} tokens) no longer fits the {self.n_ctx}-token "
                              f"context: /reset to start over, or raise --ctx-size")
        in_reasoning = _opens_reasoning(prompt_text)
        constraint_samplers, grammar = constraints.prepare(self.decoder.model, request.constraint,
                                                           in_reasoning=in_reasoning)
        # Where to keep the state (see state_cache.py); a turn boundary may be the prompt's end.
        # A boundary inside the prompt ends a decode (costing about one token's decode more), unless
        # it is among the last few (READ_BACK); the prompt's end costs nothing: its snapshot is
        # taken after the last decode.
        turns = self.boundaries.of(conversation, tools, prompt, prompt_text)
        boundaries = {len(prompt): PROMPT, **{n: TURN for n in turns}}
        prefix = self._prefix_boundary(conversation, tools)
        if prefix >= MIN_PREFIX_CHECKPOINT:
            boundaries[prefix] = PREFIX

        reused = self.decoder.reuse(prompt)
        ahead = self.prefill.ahead(prompt, reused)  # work for this prompt, not reuse
        if record:
            self.messages.extend(new)
        stats = {"prompt_tokens": 0, "prefilled_tokens": ahead, "cached_tokens": reused - ahead, "ttft_s": None,
                 "gen_tokens": 0, "reasoning_tokens": 0, "gen_tps": None, "image_tokens": 0, "image_encode_s": None}
        self.media.work = [0, 0.0]
        # Under a grammar the answer starts where the grammar does: a `<tool_call>` token in the
        # reasoning ends it only when it also starts the grammar (constraints.py).
        constrained = request.constraint is not None and request.constraint.grammar is not None
        ends_reasoning = self._tool_call if not constrained or request.constraint.tool_call else None
        splitter = ReplySplitter(in_reasoning, self._think_open, self._think_close, ends_reasoning)
        # Calls are read only where tools were offered (llama.cpp's chat parser does the same): a call to a
        # tool nobody offered stays text the client can show, not a call it cannot run beside no answer.
        answer = ToolCallReader(tools, enabled=request.read_tool_calls and bool(tools),
                                parallel=request.parallel_tool_calls)
        stop = StopStrings(list(request.stop))
        notices: list[str] = []
        finish = "interrupted"
        sampler = native.Sampler(request.sampling, self.decoder.model.n_vocab, constraint_samplers, grammar)
        inner = sorted(b for b in boundaries if len(self.cache.tokens) < b < len(prompt))
        # A boundary among the prompt's last READ_BACK tokens ends no decode: it is read back from
        # the context's snapshots once the reply's first token is out. Only one can be (llama.cpp
        # rolls back once per decode), so where several are that near the end (thinking on: the
        # next message's before `<think>`, a tool result's after it) the shallowest is kept: every
        # next prompt that goes on from a deeper one goes on from it too, evaluating those few
        # tokens again, which costs less than the decode that keeping them would end.
        late = next((b for b in inner if self.decoder.can_read_back(prompt, b)), None)
        if late is not None:
            inner = [b for b in inner if b < late]

        def keep_prompt_state() -> list[int]:
            """The checkpoints at the prompt's end and at the late boundary, taken before the reply's
            first token is evaluated; returns what must be evaluated again before it."""
            # (An identical prompt restores a shallower checkpoint than the end's: its last token
            # must be evaluated again for the logits that start the reply.)
            if late is None:
                self.cache.snapshot(boundaries[len(prompt)])
                return []
            again = self.cache.snapshot_end_and_back(late, boundaries[len(prompt)], boundaries[late])
            return prompt[len(prompt) - again:] if again else []

        if self.decoder.governor:
            self.decoder.governor.prompt_starting()
        try:
            for n in inner:
                if not self.decoder.evaluate(prompt[len(self.cache.tokens):n], logits=False):
                    return
                self.cache.snapshot(boundaries[n])
            if not self.decoder.evaluate(prompt[len(self.cache.tokens):], logits=True, prompt=True,
                                  last_batch=1 if late is None else len(prompt) - late + 1):
                return
            stats["prompt_tokens"] = len(prompt) - reused + ahead
            if self.media.work[0]:
                stats["image_tokens"], stats["image_encode_s"] = self.media.work
            stats["prompt_s"] = time.perf_counter() - start
            stats["prompt_tps"] = (len(prompt) - reused) / stats["prompt_s"]
            pieces = generate(self.decoder, sampler, request, splitter, stats, notices, start, keep_prompt_state)
            try:
                while True:
                    try:
                        piece = next(pieces)
                    except StopIteration as end_of_reply:
                        finish = end_of_reply.value
                        break
                    if piece.kind != CONTENT:
                        yield piece
                        continue
                    text, stopped = stop.feed(piece.text)
                    yield from _answer_pieces(answer.feed(text))
                    if stopped or answer.done:  # (done: the one tool call allowed is complete)
                        finish = "stop"
                        break
            finally:
                pieces.close()
            yield from _answer_pieces(answer.feed(stop.flush()) + answer.finish())
        finally:
            if sampler.grammar is not None:  # what the grammar cost: draws checked, refused, mask time
                stats.update(grammar_checked=sampler.grammar.checked, grammar_refused=sampler.grammar.refused,
                             grammar_mask_s=sampler.grammar.mask_s, grammar_s=sampler.grammar.seconds)
            sampler.close()
            self.media.free_tokenized()
            reasoning, _ = splitter.result()
            answer.finish()
            content, tool_calls = "".join(answer.content), answer.calls
            if stats["ttft_s"] is None:
                if record:
                    del self.messages[len(self.messages) - len(new):]  # the turn did not happen
            elif record:
                message = {"role": "assistant", "content": content}
                if reasoning:  # kept for the record; the template leaves it out of past turns
                    message["reasoning_content"] = reasoning
                if tool_calls:
                    message["tool_calls"] = tool_calls
                self.messages.append(message)
            if self.decoder.governor:
                self.decoder.governor.reply_ended()
            stats.update(finish_reason=finish, context_tokens=len(self.cache.tokens),
                         total_s=time.perf_counter() - start)
            self.stats = stats
            self.last_reply = Reply(reasoning, content, tool_calls, finish, stats, notices, answer.cut_off,
                                    stop.reached)
            if self.prefill.enabled and stats["ttft_s"] is not None and finish != "context":
                if record:
                    self.prefill.start(self._conversation(), tools)
                elif finish != "interrupted":
                    # The caller will send the whole conversation again, with this reply as OpenAI
                    # clients send one back: its content and tool calls, usually not its reasoning.
                    # Evaluated by idle(), when no request waits.
                    reply = {"role": "assistant", "content": content, "tool_calls": tool_calls}
                    if reasoning_comes_back and reasoning:
                        reply["reasoning_content"] = reasoning
                    self.prefill.guess = (conversation + prepare_messages([reply]), tools)
                    self._foresight = (self.prefill.guess[0], tools, request.think)

    # --- the conversation's cells ---------------------------------------------------------------

    @contextlib.contextmanager
    def _in_use(self):
        """One thread at a time: a second thread's turn (or idle prefill, save, load, ...) while one
        runs would decode into the same llama.cpp context — a native crash, or a reply mixed with
        another's (two servers' workers over one session did so in a test). It is refused with one
        clear error instead; the same thread may nest (send -> stream)."""
        if not self._user.acquire(blocking=False):
            raise ChatError("this ChatSession is in use by another thread: one turn at a time (a server "
                            "runs every request on one worker)")
        try:
            yield
        finally:
            self._user.release()

    def _settle(self) -> None:
        """Wait for the prefill: the llama.cpp context is used by one thread at a time."""
        self.prefill.settle()

    def _conversation(self) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.messages

    def _prefix_boundary(self, conversation: list[dict], tools: list[dict]) -> int:
        """How many tokens the system turn (with the tools) takes: what every conversation with the
        same system prompt and tools starts with, found by rendering two different first messages —
        once per system prompt and tools (an agent's every request has the same: the two renderings
        were ~0.4 ms of a tool round's ~10 on the demo model)."""
        system = [m for m in conversation[:1] if m["role"] == "system"]
        if not system and not tools:
            return 0
        key = json.dumps([system, tools], sort_keys=True, default=str)
        if key not in self._prefix_lengths:
            a, b = (self.decoder.model.tokenize(self.template.render(system + [{"role": "user", "content": text}],
                                                              add_generation_prompt=False, think=None, tools=tools))
                    for text in ("A.", "B?"))
            while len(self._prefix_lengths) >= PREFIXES_KEPT:
                del self._prefix_lengths[next(iter(self._prefix_lengths))]
            self._prefix_lengths[key] = common_prefix(a, b)
        return self._prefix_lengths[key]

    def _render_cells(self, conversation: list[dict], **how) -> list[int]:
        return self.media.cells(self.template.render(conversation, **how), conversation)

    def _hold_images(self, conversation: list[dict], images) -> None:
        """Keep `images` and forget those neither `conversation` nor the recorded one shows."""
        self._settle()
        self.media.hold(conversation + self.messages, images)

    def _request(self, overrides: dict, **fields) -> Request:
        think = overrides.pop("think", self.think)
        max_tokens = overrides.pop("max_tokens", self.max_tokens)
        stop = overrides.pop("stop", None) or ()
        exact_length = overrides.pop("exact_length", False)
        parallel = overrides.pop("parallel_tool_calls", True)
        return Request(think=think, max_tokens=max_tokens, sampling=self._with_overrides(overrides),
                        stop=tuple([stop] if isinstance(stop, str) else stop), exact_length=exact_length,
                        parallel_tool_calls=parallel, **fields)

    # --- settings -------------------------------------------------------------------------------

    @staticmethod
    def _sampling_from(mf: ModelFile, seed: int | None, given: dict) -> Sampling:
        unknown = set(given) - set(Sampling.__dataclass_fields__)
        if unknown:
            raise TypeError(f"unknown sampling option(s): {', '.join(sorted(unknown))}")
        values = {**mf.sampling_defaults(), **{k: v for k, v in given.items() if v is not None}}
        if seed is not None:
            values["seed"] = seed
        return Sampling(**values)

    def _with_overrides(self, overrides: dict) -> Sampling:
        if not overrides:
            return self._sampling
        unknown = set(overrides) - set(Sampling.__dataclass_fields__)
        if unknown:
            raise TypeError(f"unknown option(s): {', '.join(sorted(unknown))}")
        return Sampling(**{**self._sampling.__dict__, **{k: v for k, v in overrides.items() if v is not None}})


_PIECE_OF_EVENT = {"content": CONTENT, "call_start": TOOL_CALL_START, "arguments": TOOL_CALL_ARGUMENTS,
                   "call": TOOL_CALL}


def _answer_pieces(events) -> Iterator[Piece]:
    """ToolCallReader's events as Pieces: text in `text`, calls in `call`."""
    for kind, value in events:
        if isinstance(value, str):
            yield Piece(_PIECE_OF_EVENT[kind], value)
        else:
            yield Piece(_PIECE_OF_EVENT[kind], "", value)


def _opens_reasoning(prompt_text: str) -> bool:
    """Whether the generation prompt leaves a `<think>` block open (the reply starts reasoning)."""
    return prompt_text.rfind("<think>") > prompt_text.rfind("</think>")


__all__ = ["ChatSession", "Reply", "nfc"]
