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

import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

from . import constraints, cpu, native
from .constraints import Constraint
from .errors import ChatError, ContextFull
from .memory import check_fits, estimate, recurrent_state_bytes
from .modelfile import QWEN35_ARCHS, ModelFile, read_model_file
from .adaptive_threads import ThreadGovernor
from .native import FULL, PARTIAL_ONLY, Sampling
from .repack import AMX_IN_USE, cpu_features
from .speculative import (AUTO, MTP, OFF, DraftedState, DraftPolicy, Speculator, drafting_verdict, mtp_block_count,
                          open_speculator, split_state, staging_api, step_costs)
from .reasoning import (CONTENT, REASONING, TOOL_CALL, TOOL_CALL_ARGUMENTS, TOOL_CALL_START, Piece, RepetitionGuard,
                        ReplySplitter, StopStrings)
from .state_cache import PREFIX, PROMPT, READ_BACK, TURN, Checkpoint, StateCache, image_cells, position
from .system import performance_cores
from .template import ChatTemplate
from .tools import ToolCallReader, check_tools, nfc, prepare_messages
from .video import read_video, stamp
from .vision import DEFAULT_IMAGE_MAX_TOKENS, LLAMA_IMAGE_MAX_TOKENS, Chunks, Projector, find_mmproj, read_image

N_BATCH = 512  # prompt tokens per llama_decode; also llama.cpp's physical batch
# Checkpoints a chat keeps by default (a prefix, a turn boundary and a prompt end per turn; see
# state_cache.py), in units of one recurrent state.
N_CHECKPOINTS = 4
MAX_DRAFT_TOKENS = 8  # each draft token costs one more recurrent-state snapshot in the context
# A system prompt (with its tools) shorter than this gets no checkpoint of its own: ending a decode
# there costs about what evaluating it again in a later conversation's first batch would (measured
# on 2 cores: a 17-token system turn split off a 137-token prompt added ~50 ms, about 9 tokens' worth).
MIN_PREFIX_CHECKPOINT = 64
# A server's prefill between requests (ChatSession.idle) evaluates this many tokens per decode, so
# that a request arriving meanwhile waits for at most one such step (2 cores: 0.8B ~60 ms on the
# AMD EPYC, 110-125 ms on the Intel Xeon; 4B ~250 ms), not for the whole guess.
PREFILL_STEP = 8
MAX_PREFILLS_KEPT = 16  # prefills remembered for the accounting (prompt_tokens vs cached_tokens)
# What `auto` times its steps after, at load (any ordinary text: only the shapes matter).
_CALIBRATION_TEXT = "The lighthouse keeper climbed the stairs every evening to light the lamp for the ships. " * 3
_CALIBRATION_TOKENS = 32

# Used only when a (non-Qwen3.5) GGUF carries no template: plain ChatML, which Qwen models speak.
_CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
           "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

_SESSION_MAGIC = b"QWEN35-CHAT\n"
_SESSION_VERSION = 2  # 2: the conversation's images follow the states
_IMAGE_SLOT = "<|vision_start|><|image_pad|><|vision_end|>"  # the template's image; mtmd writes the start and end itself
_VIDEO_SLOT = "<|vision_start|><|video_pad|><|vision_end|>"  # the template's video: replaced by its stamped frame pairs
_MEDIA_SLOT = re.compile(re.escape(_IMAGE_SLOT) + "|" + re.escape(_VIDEO_SLOT))


@dataclass(frozen=True)
class _ImageCells:
    """How one image sits in the context: <|vision_start|>, its stand-ins, <|vision_end|>."""

    cells: tuple[int, ...]
    n_tokens: int  # the image's own cells
    n_pos: int  # positions it advances


@dataclass
class _Verified:
    """A speculative step: the tokens evaluated at `pos` ([last token, drafts…]) and those sampled
    from them; `index`: the sampled token being looked at, whose predecessors are kept."""

    batch: list[int]
    sampled: list[int]
    pos: int
    index: int = -1

    @property
    def kept(self) -> int:
        return self.index + 1

    def more(self) -> bool:
        return self.index + 1 < len(self.sampled)

    def next(self) -> int:
        self.index += 1
        return self.sampled[self.index]


@dataclass
class Reply:
    reasoning: str
    content: str
    tool_calls: list[dict]  # [{"id", "type": "function", "function": {"name", "arguments": {...}}}]
    finish_reason: str  # stop | length | context | loop | interrupted
    stats: dict
    notices: list[str] = field(default_factory=list)
    call_cut_off: bool = False  # the reply ended inside its last tool call (whose arguments hold what was written)


@dataclass(frozen=True)
class _Request:
    """What one reply is asked for, besides the conversation."""

    tools: list[dict]
    think: bool | None
    max_tokens: int | None
    sampling: Sampling
    constraint: Constraint | None = None
    stop: tuple[str, ...] = ()
    read_tool_calls: bool = True


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
    (speculative.py): it drafts `draft_tokens` tokens and the model checks them in one pass, so a
    step can emit several tokens; the tokens are the model's own, as without it (greedy: the same
    tokens). "auto" uses it when the GGUF has an MTP block, when timing its steps at load shows it
    can pay on this machine (speculative.drafting_verdict), and as long as it then measures faster
    than plain decoding (speculative.DraftPolicy); "mtp" always (an error for a GGUF without one).
    Either way, a llama-cpp-python without the hidden-state functions it needs gives a warning
    and plain decoding.
    """

    def __init__(self, model_path, n_ctx: int = 4096, threads: int | None = None, think: bool | None = None,
                 seed: int | None = None, *, system: str | None = None, tools: list[dict] | None = None,
                 cache_ram: int | None = None, force: bool = False, prefill: bool = True, verbose: bool = False,
                 adapt_threads: bool = True, mmproj=None, image_max_tokens: int | None = DEFAULT_IMAGE_MAX_TOKENS,
                 speculative: str = OFF, draft_tokens: int = 2, **sampling) -> None:
        native.init(verbose)
        self.model_file = mf = read_model_file(model_path)
        self.warnings: list[str] = []
        if mf.architecture not in QWEN35_ARCHS:
            self.warnings.append(f"{mf.path} is a '{mf.architecture or 'unnamed'}' model, not Qwen3.5: "
                                 "running it as is, without Qwen3.5's reasoning and template guarantees")
        self.template = ChatTemplate(mf.chat_template or _CHATML)
        self.tools = check_tools(tools)
        self.max_tokens = sampling.pop("max_tokens", None)
        self._sampling = self._sampling_from(mf, seed, sampling)

        self.threads = threads or performance_cores()
        drafting = self._drafting_possible(mf, speculative, draft_tokens)
        if drafting and staging_api()[0] is None:  # checked before loading anything for it
            self.warnings.append(f"speculative decoding off: {staging_api()[1]}")
            drafting = False
        recurrent = max(recurrent_state_bytes(mf), 1)
        cache_bytes = cache_ram if cache_ram is not None else N_CHECKPOINTS * recurrent + (1 << 20)
        # (AMX, where it runs, holds a copy of the weights it takes: the estimate must know.)
        features = cpu_features() | ({AMX_IN_USE} if cpu.amx_decision(mf.path, probe=False).use_amx else set())
        sizes = dict(n_batch=N_BATCH, n_checkpoints=-(-cache_bytes // recurrent), threads=self.threads,
                     features=features)
        # The vision tower loads at the first image, but memory for it (and for an image as large as
        # the budget) must be there then: it is counted now, when it is given or found beside the model.
        self._mmproj, self._mmproj_expected = (Path(mmproj), None) if mmproj is not None else find_mmproj(mf)
        vision = read_model_file(self._mmproj) if self._mmproj is not None else None
        sizes.update(mmproj=vision)
        budget = image_max_tokens or LLAMA_IMAGE_MAX_TOKENS
        self.memory = estimate(mf, n_ctx, **sizes, image_max_tokens=budget, draft_tokens=draft_tokens if drafting else 0)
        problem = check_fits(mf, self.memory, **sizes, draft_tokens=draft_tokens if drafting else 0)
        if problem and drafting and speculative == AUTO:
            plain = estimate(mf, n_ctx, **sizes, image_max_tokens=budget)
            if not check_fits(mf, plain, **sizes):  # it fits without the MTP head: leave it out
                self.warnings.append("speculative decoding off: the MTP head would not fit in memory")
                drafting, self.memory, problem = False, plain, None
        self._read_back = READ_BACK
        if problem and not drafting:
            lean = estimate(mf, n_ctx, **sizes, image_max_tokens=budget, read_back=0)
            if not check_fits(mf, lean, **sizes):  # it fits without the read-back snapshots: turn
                # boundaries near a prompt's end then end a decode (slower to the first token, not wrong)
                self._read_back, self.memory, problem = 0, lean, None
        if problem and not force:
            raise ChatError(problem)

        try:
            self._model = native.Model(str(mf.path), load_mtp=drafting, mapped=self.memory.mapped)
        except ChatError as e:
            if "unknown model architecture" in str(e):
                raise ChatError(f"{mf.path} is a '{mf.architecture}' model, an architecture the llama.cpp bundled "
                                f"with llama-cpp-python 0.3.36 cannot run") from None
            raise
        self._spec: Speculator | None = None
        try:
            # Verifying a draft needs logits for each of its tokens and the recurrent-state
            # snapshots to roll back the rejected ones.
            self._ctx = native.Context(self._model, n_ctx, self.threads, N_BATCH,
                                       n_outputs=draft_tokens + 1 if drafting else 1,
                                       n_rollback=draft_tokens if drafting else self._read_back)
            if drafting:
                self._spec, notice = open_speculator(self._model, self._ctx, draft_tokens, self.threads)
                if notice:
                    self.warnings.append(notice)
            if self._spec and speculative == AUTO:
                self._drop_drafting_unless_it_can_pay(n_ctx, draft_tokens)
        except ChatError:
            if getattr(self, "_ctx", None):
                self._ctx.close()
            self._model.close()
            raise
        if drafting and self._spec is None:  # decoding plainly after all: the MTP block's weights
            # stay loaded (loading the model again would cost more), its context and snapshots are gone
            plain = estimate(mf, n_ctx, **sizes, image_max_tokens=budget, read_back=self._read_back)
            self.memory = replace(plain, weights=self.memory.weights, repacked=self.memory.repacked,
                                  weights_idle=self.memory.weights_idle)
        self.n_ctx = self._ctx.n_ctx
        self.draft_tokens = draft_tokens if self._spec else 0
        self._policy = DraftPolicy(speculative if self._spec else OFF)
        # Between generated tokens, give cores back to other programs that take them (and take them
        # again when they are free): see adaptive_threads.py.
        self._governor = ThreadGovernor(self.threads, self._set_threads) if adapt_threads and self.threads > 1 \
            else None
        self._think_open = self._model.single_token("<think>")
        self._think_close = self._model.single_token("</think>")
        self._tool_call = self._model.single_token("<tool_call>")

        self.think = think  # None: the template's default
        self.system = nfc(system) if system else None
        self.messages: list[dict] = []
        self.stats: dict = {}
        self.last_reply: Reply | None = None
        # The state the cache checkpoints: the model's, and with speculation the MTP head's too.
        self._model_state = DraftedState(self._ctx, self._spec) if self._spec else self._ctx
        self.cache = StateCache(self._model_state, cache_bytes)
        self._stop = threading.Event()
        self._prefill_enabled = prefill
        self._prefill_thread: threading.Thread | None = None
        # Recent prefills, by the tokens held at their end: where their evaluation started. Kept per
        # conversation (a server's turns interleave), until a prompt uses one.
        self._prefilled: dict[tuple[int, ...], int] = {}
        self._guess: tuple[list[dict], list[dict]] | None = None  # respond()'s next prompt start, for idle()

        self._image_max_tokens = image_max_tokens
        self._projector: Projector | None = None
        self._images: dict[str, bytes] = {}  # SHA-256 → encoded file: what the conversation's image parts name
        # Keyed by an image's SHA-256, or a video's frame pair as "<SHA-256>+<SHA-256>" (one image to mtmd).
        self._image_cells: dict[str, _ImageCells] = {}
        self._image_at: dict[int, str] = {}  # first stand-in → image, for evaluating a run of cells
        self._tokenized: dict[str, Chunks] = {}  # images tokenized for the turn under way (freed after it)
        self._image_work = [0, 0.0]  # image tokens evaluated and seconds taken, this turn
        if mmproj is not None:
            self._vision()  # a file named by the user is checked now, not at the first image

    # --- public API -----------------------------------------------------------------------------

    @property
    def thinks(self) -> bool:
        """Whether the next reply will start with reasoning."""
        if self.think is not None:
            return self.think
        return self.template.thinks_by_default()

    def send(self, message, images=None, *, video=None, **overrides) -> Reply:
        for _ in self.stream(message, images, video=video, **overrides):
            pass
        return self.last_reply

    def stream(self, message, images=None, *, video=None, **overrides) -> Iterator[Piece]:
        """Yield the reply as it is generated. Ends the turn cleanly if `interrupt()` is called (from
        a signal handler, say) or if the caller stops iterating. `images` (paths or encoded bytes)
        go with a text message, and so does `video` (a video file, a directory of its frames, or a
        list of frames: see `add_video`); they are checked here, before anything is evaluated.
        Options: think, max_tokens, tools, stop and the sampling keywords."""
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
        self._stop.clear()
        return self._turn_generator(self._conversation(), new, request, record=True)

    def respond(self, messages: list[dict], *, images=(), tools: list[dict] | None = None,
                constraint: Constraint | None = None, read_tool_calls: bool = True, **overrides) -> Iterator[Piece]:
        """Yield the reply to a whole conversation (OpenAI-style messages, system prompt included),
        without recording it in `messages`. `images`: the encoded files that the messages' image
        parts ({"type": "image", "image": <SHA-256>}) name. `constraint` limits what the answer may
        be (see constraints.py); `read_tool_calls=False` leaves call-like text in the content."""
        conversation = prepare_messages(messages)
        self._hold_images(conversation, images)
        request = self._request(overrides, tools=check_tools(tools), constraint=constraint,
                                read_tool_calls=read_tool_calls)
        self._stop.clear()
        return self._turn_generator(conversation[:-1], conversation[-1:], request, record=False)

    def add_image(self, source) -> dict:
        """Check an image (a path or encoded bytes: it must decode, and fit the context) and keep it
        for the conversation; returns the content part that shows it in a message,
        {"type": "image", "image": <SHA-256 of the bytes>, "path": …}. `stream(images=…)` calls it."""
        self._settle()  # (the prefill may be using the projector)
        data, name = read_image(source)
        image_id = hashlib.sha256(data).hexdigest()
        part = {"type": "image", "image": image_id}
        if not isinstance(source, (bytes, bytearray)):
            part["path"] = str(Path(source).resolve())
        new = image_id not in self._images
        self._images[image_id] = data
        try:
            self._cells_of_image(part, name)
        except ChatError:
            if new:
                del self._images[image_id]
            raise
        return part

    def add_video(self, source) -> dict:
        """Check a video and keep its frames for the conversation: a video file (sampled as Qwen3.5
        samples it, with ffmpeg), a directory of frame images or a list of frames (paths or bytes),
        taken as sampled at 2 a second (video.py). Every pair of frames must decode, be of one size
        and fit the context. Returns the content part that shows it in a message, {"type": "video",
        "video": <SHA-256 of its frames' ids>, "frames": [SHA-256, …], "seconds": [per pair]}."""
        self._settle()
        sampled = read_video(source)
        frames = [read_image(frame)[0] for frame in sampled.frames]
        ids = [hashlib.sha256(data).hexdigest() for data in frames]
        part = {"type": "video", "video": hashlib.sha256("+".join(ids).encode()).hexdigest(), "frames": ids,
                "seconds": sampled.seconds}
        if all(isinstance(f, (str, Path)) for f in sampled.frames):
            part["paths"] = [str(Path(f).resolve()) for f in sampled.frames]
        new = [i for i in dict.fromkeys(ids) if i not in self._images]
        self._images.update(zip(ids, frames))
        try:
            self._cells_of_video(part, sampled.name)
        except ChatError:
            for image_id in new:
                del self._images[image_id]
            raise
        return part

    def image_bytes(self, image_id: str) -> bytes | None:
        """The encoded file of an image (or video frame) the conversation shows, by its SHA-256."""
        return self._images.get(image_id)

    def image_tokens(self, part: dict) -> int:
        """The context cells an image or video part (from `add_image`, `add_video`) takes, start and
        end marks (and a video's timestamps) included."""
        if part.get("type") == "video":
            return len(self._cells_of_video(part))
        return len(self._cells_of_image(part).cells)

    def interrupt(self) -> None:
        """Stop the reply being generated (safe to call from a signal handler or another thread)."""
        self._stop.set()

    def reset(self) -> None:
        """Forget the conversation (the system prompt and settings stay)."""
        self._settle()
        self.messages = []
        self.cache.forget()
        self._prefilled = {}
        self._guess = None
        self.stats = {}
        self._images = {}
        self._free_tokenized()

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
        if self._prefill_enabled and self.messages:
            self._start_prefill(self._conversation(), self.tools)

    @property
    def model_fingerprint(self) -> dict:
        """What tells this model file from another (saved conversations are kept per model)."""
        return _fingerprint(self.model_file)

    def describe_placement(self) -> str:
        """The CPU features llama.cpp uses, where the weights landed (AMX / CPU_REPACK / CPU), and why."""
        return self._model.describe_placement()

    def context_tokens(self) -> list[int]:
        """The tokens the model state holds (for tests: it must equal the template's rendering)."""
        self._settle()
        return list(self.cache.tokens)

    def render(self, *, add_generation_prompt: bool = True, think: bool | None = None) -> str:
        """The template's rendering of the conversation so far (+ the generation prompt)."""
        return self.template.render(self._conversation(), add_generation_prompt=add_generation_prompt,
                                    think=self.think if think is None else think, tools=self.tools)

    def tokenize(self, text: str) -> list[int]:
        return self._model.tokenize(nfc(text))

    def set_threads(self, threads: int, *, adapt: bool = False) -> None:
        """Run the next decodes on `threads` CPU threads (the model and its state stay loaded); with
        `adapt`, at most that many, fewer while other programs take cores."""
        self._settle()
        self._set_threads(threads)
        self.threads = threads
        self._governor = ThreadGovernor(threads, self._set_threads) if adapt and threads > 1 else None

    @property
    def speculative(self) -> str:
        """How the session decodes: "auto", "mtp" or "off" (always "off" without an MTP head)."""
        return self._policy.mode

    def set_speculative(self, mode: str) -> None:
        """Switch between "auto", "mtp" and "off" (e.g. to measure both ways on one loaded model);
        "auto" and "mtp" need the session to have been opened with its MTP head."""
        if mode != OFF and self._spec is None:
            raise ChatError("this session decodes without an MTP head: open it with speculative='mtp'")
        self._settle()
        self._policy = DraftPolicy(mode)

    def _set_threads(self, threads: int) -> None:
        self._ctx.set_threads(threads)
        if self._spec:
            self._spec.set_threads(threads)

    def idle(self, busy: Callable[[], bool] = lambda: False) -> None:
        """Nothing waits (a server between requests): evaluate the known start of the next prompt
        of the conversation `respond` last answered (see _prefill), in small steps, stopping as soon
        as `busy()` says a request waits; then read out the checkpoint that a prompt of another
        conversation would otherwise have to read first (StateCache.secure_live), so that switching
        conversations costs that prompt nothing. Done at idle, not at once after the reply: a client
        that sends its next, unrelated, request at once never waits for a guess about it."""
        self._settle()
        self._stop.clear()  # (an interrupt that came after its reply had ended is for no one now)
        guess, self._guess = self._guess, None
        if guess is not None and not busy():
            self._prefill(*guess, guess=True, busy=busy)
        if not busy():
            self.cache.secure_live()

    def save(self, path) -> None:
        """Write the conversation and the model state, so `load` resumes without re-reading it."""
        self._settle()
        tokens = self.cache.tokens
        ck = self.cache.deepest_held(TURN)
        state = self._model_state.get_state(FULL) if tokens else b""
        checkpoint = ck.state if ck else b""
        header = {
            "version": _SESSION_VERSION,
            "model": _fingerprint(self.model_file),
            "system": self.system, "think": self.think, "messages": self.messages, "tools": self.tools,
            "tokens": tokens, "prefilled": next(([first, len(key)] for key, first in self._prefilled.items()
                                                 if list(key) == tokens[:len(key)]), [0, 0]),
            "checkpoint_tokens": len(ck.tokens) if ck else 0,
            "state_bytes": len(state), "checkpoint_bytes": len(checkpoint),
            "images": [[image_id, len(data)] for image_id, data in self._images.items()],
        }
        data = json.dumps(header, ensure_ascii=False).encode()
        path = Path(path)
        tmp = path.with_name(path.name + ".part")
        try:
            with open(tmp, "wb") as f:
                for part in (_SESSION_MAGIC, len(data).to_bytes(8, "little"), data, state, checkpoint,
                             *self._images.values()):
                    f.write(part)
            tmp.replace(path)
        except OSError as e:
            raise ChatError(f"cannot save the conversation to {path}: {e.strerror}") from None

    def load(self, path) -> None:
        """Resume a conversation written by `save` (with the same model file), model state included."""
        header, state, checkpoint, images = _read_session(Path(path))
        if header["model"] != _fingerprint(self.model_file):
            raise ChatError(f"{path} was saved with a different model ({header['model'].get('name')}); "
                            f"load it with that model")
        tokens = header["tokens"]
        if len(tokens) >= self.n_ctx:
            raise ChatError(f"{path} holds {len(tokens)} tokens, more than this context ({self.n_ctx}): "
                            f"raise --ctx-size")
        self.reset()
        if self._spec is None:  # saved with speculation on, loaded without: the model's part only
            state, checkpoint = split_state(state)[0], split_state(checkpoint)[0]
        if state:
            self._model_state.set_state(state, FULL)
        self.cache.tokens = list(tokens)
        n = header["checkpoint_tokens"]
        if checkpoint:
            self.cache.put(Checkpoint(tuple(tokens[:n]), bytearray(checkpoint), full=False, kind=TURN))
        first, end = header["prefilled"]
        self._prefilled = {tuple(tokens[:end]): first} if end else {}
        self.system, self.think, self.messages = header["system"], header["think"], header["messages"]
        self.tools = header.get("tools") or []
        self._images = images

    def close(self) -> None:
        if getattr(self, "_prefill_thread", None):
            self._settle()
        if getattr(self, "_tokenized", None):
            self._free_tokenized()
        if getattr(self, "_projector", None):
            self._projector.close()
            self._projector = None
        if getattr(self, "_spec", None):
            self._spec.close()
            self._spec = None
        if getattr(self, "_ctx", None):
            self._ctx.close()
            self._ctx = None
        if getattr(self, "_model", None):
            self._model.close()
            self._model = None

    def __enter__(self) -> "ChatSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- one turn -------------------------------------------------------------------------------

    def _turn_generator(self, history: list[dict], new: list[dict], request: _Request,
                        record: bool) -> Iterator[Piece]:
        start = time.perf_counter()
        self._settle()  # waiting for the prefill counts in the time to first token
        self._guess = None  # (about the reply before: this turn replaces it)
        conversation = history + new
        tools = request.tools
        prompt_text = self.template.render(conversation, add_generation_prompt=True, think=request.think,
                                           tools=tools)
        prompt = self._cells(prompt_text, conversation)
        if len(prompt) >= self.n_ctx:
            raise ContextFull(f"the conversation ({len(prompt)} tokens) no longer fits the {self.n_ctx}-token "
                              f"context: /reset to start over, or raise --ctx-size")
        in_reasoning = _opens_reasoning(prompt_text)
        constraint_samplers = constraints.samplers(self._model, request.constraint, in_reasoning=in_reasoning)
        # Where to keep the state (see state_cache.py); a turn boundary may be the prompt's end.
        # A boundary inside the prompt ends a decode (costing about one token's decode more), unless
        # it is among the last few (READ_BACK); the prompt's end costs nothing: its snapshot is
        # taken after the last decode.
        boundaries = {len(prompt): PROMPT, **{n: TURN for n in self._stable_boundaries(conversation, tools, prompt)}}
        prefix = self._prefix_boundary(conversation, tools)
        if prefix >= MIN_PREFIX_CHECKPOINT:
            boundaries[prefix] = PREFIX

        reused = self._reuse(prompt)
        # Tokens the prefill evaluated for this prompt are work for it, not reuse (when they are
        # this prompt's: a server's guess may have been another).
        ahead = 0
        for key, first in list(self._prefilled.items()):
            if reused >= len(key) > first and tuple(prompt[:len(key)]) == key:
                ahead = len(key) - first
                del self._prefilled[key]
                break
        if record:
            self.messages.extend(new)
        stats = {"prompt_tokens": 0, "prefilled_tokens": ahead, "cached_tokens": reused - ahead, "ttft_s": None,
                 "gen_tokens": 0, "gen_tps": None, "image_tokens": 0, "image_encode_s": None}
        self._image_work = [0, 0.0]
        # Under a grammar the answer starts where the grammar does: a `<tool_call>` token in the
        # reasoning ends it only when it also starts the grammar (constraints.py).
        grammar = request.constraint is not None and request.constraint.grammar is not None
        ends_reasoning = self._tool_call if not grammar or request.constraint.tool_call else None
        splitter = ReplySplitter(in_reasoning, self._think_open, self._think_close, ends_reasoning)
        answer = ToolCallReader(tools, enabled=request.read_tool_calls)
        stop = StopStrings(list(request.stop))
        notices: list[str] = []
        finish = "interrupted"
        sampler = native.Sampler(request.sampling, self._model.n_vocab, constraint_samplers)
        inner = sorted(b for b in boundaries if len(self.cache.tokens) < b < len(prompt))
        # A boundary among the prompt's last READ_BACK tokens ends no decode: it is read back from
        # the context's snapshots once the reply's first token is out. Only one can be (llama.cpp
        # rolls back once per decode), so where several are that near the end (thinking on: the
        # next message's before `<think>`, a tool result's after it) the shallowest is kept: every
        # next prompt that goes on from a deeper one goes on from it too, evaluating those few
        # tokens again, which costs less than the decode that keeping them would end.
        late = next((b for b in inner if self._can_read_back(prompt, b)), None)
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

        if self._governor:
            self._governor.prompt_starting()
        try:
            for n in inner:
                if not self._evaluate(prompt[len(self.cache.tokens):n], logits=False):
                    return
                self.cache.snapshot(boundaries[n])
            if not self._evaluate(prompt[len(self.cache.tokens):], logits=True,
                                  last_batch=1 if late is None else len(prompt) - late + 1):
                return
            stats["prompt_tokens"] = len(prompt) - reused + ahead
            if self._image_work[0]:
                stats["image_tokens"], stats["image_encode_s"] = self._image_work
            stats["prompt_s"] = time.perf_counter() - start
            stats["prompt_tps"] = (len(prompt) - reused) / stats["prompt_s"]
            pieces = self._generate(sampler, request, splitter, stats, notices, start, keep_prompt_state)
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
                    if stopped:
                        finish = "stop"
                        break
            finally:
                pieces.close()
            yield from _answer_pieces(answer.feed(stop.flush()) + answer.finish())
        finally:
            sampler.close()
            self._free_tokenized()
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
            if self._governor:
                self._governor.reply_ended()
            stats.update(finish_reason=finish, context_tokens=len(self.cache.tokens),
                         total_s=time.perf_counter() - start)
            self.stats = stats
            self.last_reply = Reply(reasoning, content, tool_calls, finish, stats, notices, answer.cut_off)
            if self._prefill_enabled and stats["ttft_s"] is not None and finish != "context":
                if record:
                    self._start_prefill(self._conversation(), tools)
                elif finish != "interrupted":
                    # The caller will send the whole conversation again, with this reply as OpenAI
                    # clients send one back: its content and tool calls, usually not its reasoning.
                    # Evaluated by idle(), when no request waits.
                    reply = {"role": "assistant", "content": content, "tool_calls": tool_calls}
                    self._guess = (conversation + prepare_messages([reply]), tools)

    def _generate(self, sampler: native.Sampler, request: _Request, splitter: ReplySplitter,
                  stats: dict, notices: list[str], start: float, keep_prompt_state: Callable[[], list[int]]):
        """The reply's pieces as they are sampled; returns why it ended. `keep_prompt_state` is
        called once the first token is out, before anything else is evaluated; what it returns is
        evaluated again first.

        With speculation, one step evaluates the last token and the MTP head's drafts and samples
        every row while the samples match the drafts (Speculator.step); those tokens then go
        through the same checks, one at a time, as plainly decoded ones. The model keeps what a
        plain decoding would hold at the token being looked at (`_keep`): the reply may end
        at any of them (end of generation, max_tokens, a stop string, an interrupt, a loop)."""
        max_tokens = request.max_tokens
        guard = RepetitionGuard()
        token = sampler.sample(self._ctx)
        first = time.perf_counter()
        stats["ttft_s"] = first - start
        n = 0
        again: list[int] | None = None  # prompt tokens to evaluate again, once keep_prompt_state ran
        verified: _Verified | None = None  # the last speculative step, while its tokens are looked at
        drafted, accepted = (self._spec.drafted, self._spec.accepted) if self._spec else (0, 0)
        try:
            while True:
                if self._model.is_eog(token):
                    return "stop"
                n += 1
                stats["gen_tokens"] = n
                piece = splitter.feed(token, self._model.piece(token))
                if piece:
                    yield piece
                pending = [token]
                if guard.looping(token):
                    # Close the reasoning as the model would have, and let it answer; but not under a
                    # grammar, which must see every token of the answer sampled.
                    if splitter.kind != REASONING or request.constraint is not None:
                        notices.append("the reply kept repeating itself: stopped it")
                        yield Piece("notice", notices[-1])
                        return "loop"
                    notices.append("the reasoning kept repeating itself: closed it to answer")
                    yield Piece("notice", notices[-1])
                    splitter.close_reasoning()
                    guard.reset()
                    pending += self._model.tokenize("\n</think>\n\n")
                if self._stop.is_set():
                    return "interrupted"
                if max_tokens is not None and n >= max_tokens:
                    return "length"
                held = len(self.cache.tokens) + (verified.kept if verified else 0)
                if held + len(pending) >= self.n_ctx:
                    notices.append(f"context full ({self.n_ctx} tokens): /reset to start over, or raise --ctx-size")
                    yield Piece("notice", notices[-1])
                    return "context"
                if verified and len(pending) == 1 and verified.more():
                    token = verified.next()  # sampled after the tokens before it, all evaluated
                    continue
                verified = self._keep(verified)
                if again is None:
                    again = keep_prompt_state()
                step = time.perf_counter()
                n_draft = min(self.draft_tokens, self.n_ctx - held - 1,
                              (max_tokens - n - 1) if max_tokens is not None else self.draft_tokens)
                if len(pending) == 1 and not again and n_draft > 0 and self._policy.drafts():
                    tokens = self.cache.tokens
                    batch, sampled = self._spec.step(token, position(tokens), sampler, n_draft, self._model.is_eog,
                                                     cells=len(tokens))
                    verified = _Verified(batch, sampled, position(tokens))
                    token = verified.next()
                    self._policy.record(True, time.perf_counter() - step, len(sampled))
                else:
                    self._evaluate(again + pending, logits=True)
                    token = sampler.sample(self._ctx)
                    if len(pending) == 1 and not again:
                        if self._governor:
                            self._governor.token_done(time.perf_counter() - step)
                        if self._spec:
                            self._policy.record(False, time.perf_counter() - step, 1)
                again = []
                elapsed = time.perf_counter() - first
                stats["gen_tps"] = n / elapsed if elapsed > 0 else None
        finally:
            self._keep(verified)
            if again is None:  # the reply ended at its first token: the state still ends the prompt
                again = keep_prompt_state()
                if again:
                    self._evaluate(again, logits=False)
            if self._spec:
                stats["drafted_tokens"] = self._spec.drafted - drafted
                stats["accepted_tokens"] = self._spec.accepted - accepted

    def _keep(self, verified: "_Verified | None") -> None:
        """The model keeps, of a speculative step, the tokens before the one being looked at (as
        plain decoding would hold them); the MTP head follows. Returns None (no step pending)."""
        if verified is not None:
            self._spec.keep(verified.pos + verified.kept)
            self.cache.tokens.extend(verified.batch[:verified.kept])
        return None

    # --- the model state ------------------------------------------------------------------------

    def _start_prefill(self, conversation: list[dict], tools: list[dict]) -> None:
        """The prefill (below) of a recorded conversation, in a background thread while the user
        reads and types (or the tools run)."""
        self._stop.clear()
        self._prefill_thread = threading.Thread(target=self._prefill, args=(conversation, tools),
                                                name="qwen35-prefill")
        self._prefill_thread.start()

    def _prefill(self, conversation: list[dict], tools: list[dict], *, guess: bool = False,
                 busy: Callable[[], bool] | None = None) -> None:
        """Evaluate the start of the next prompt that is already known: the tokens every next
        message's rendering shares (found by rendering two different ones) — a user message's, or
        the tool results' after a reply that called tools. That is the last reply as the template
        renders it again (before a user message Qwen3.5's template drops the turn's think block, so
        the turn is evaluated again from its boundary before it) and the next turn's opening.

        `guess`: the conversation's last turn is only what the client will probably send back (a
        server's). Before tool results the template keeps the turn as written, and a client that
        sends the reasoning back goes on from the state as the model left it: then the guess is
        evaluated only where it goes on from that state too, never in its place. (Before a user
        message the state as left serves no next prompt; the checkpoints that do stay reachable.)
        `busy`: stop between steps of PREFILL_STEP tokens when it says a request waits."""
        following = "tool" if conversation[-1].get("tool_calls") else "user"
        try:
            a, b = (self._render_cells(conversation + [{"role": following, "content": text}],
                                       add_generation_prompt=False, think=None, tools=tools)
                    for text in ("A.", "B?"))
            known = a[:_common_prefix(a, b)]
            held = self.cache.tokens
            if not known or len(known) >= self.n_ctx - 1 \
                    or guess and following == "tool" and known[:len(held)] != held:
                return
            start = self._reuse(known, need_logits=False)
            # (stops early if interrupted, or when a request waits)
            self._evaluate(known[start:], logits=False, stop=busy, step=PREFILL_STEP if busy else None)
            if len(self.cache.tokens) > start:
                self._prefilled[tuple(self.cache.tokens)] = start
                while len(self._prefilled) > MAX_PREFILLS_KEPT:
                    del self._prefilled[next(iter(self._prefilled))]
        except ChatError:
            pass  # (an image it cannot show: the next turn says so; the state stays consistent)

    def _settle(self) -> None:
        """Wait for the prefill: the llama.cpp context is used by one thread at a time."""
        if self._prefill_thread is not None:
            self._prefill_thread.join()
            self._prefill_thread = None

    def _conversation(self) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.messages

    def _prefix_boundary(self, conversation: list[dict], tools: list[dict]) -> int:
        """How many tokens the system turn (with the tools) takes: what every conversation with the
        same system prompt and tools starts with, found by rendering two different first messages."""
        system = [m for m in conversation[:1] if m["role"] == "system"]
        if not system and not tools:
            return 0
        a, b = (self._model.tokenize(self.template.render(system + [{"role": "user", "content": text}],
                                                          add_generation_prompt=False, think=None, tools=tools))
                for text in ("A.", "B?"))
        return _common_prefix(a, b)

    def _stable_boundaries(self, conversation: list[dict], tools: list[dict], prompt: list[int]) -> set[int]:
        """How many of this prompt's tokens the next turn's prompt will start with, whether it
        brings a new message or the results of the tools called: render the next turn with a
        stand-in answer and a stand-in message (or tool result), and compare. For Qwen3.5 they agree
        up to an `<|im_start|>assistant\n` (the next rendering drops or rewrites the `<think>`
        block): after the last user message's for a new message, this whole prompt for a tool
        result. A guess only: if the real answer renders differently, the next turn notices (the
        checkpoint is not a prefix of its prompt) and evaluates more, never something wrong."""
        answer = {"role": "assistant", "content": "Answer."}
        points = set()
        for following in ({"role": "user", "content": "Next."}, {"role": "tool", "content": "Result."}):
            upcoming = self._render_cells(conversation + [answer, following], add_generation_prompt=False, think=None,
                                          tools=tools)
            points.add(_common_prefix(prompt, upcoming))
        return points

    def _reuse(self, prompt: list[int], *, need_logits: bool = True) -> int:
        """Bring the model state to the longest prefix of `prompt` it can reach without evaluating
        anything; returns that prefix's length. With `need_logits`, at least one prompt token is
        left to evaluate (its logits start the reply)."""
        return self.cache.restore(prompt, len(prompt) - 1 if need_logits else len(prompt))

    def _can_read_back(self, prompt: list[int], boundary: int) -> bool:
        """Whether the state at `boundary` can be read back from the snapshots of the decode that
        ends `prompt` (StateCache.snapshot_back): near enough the end, text from the token before
        it on, and a context that keeps them (a drafting one keeps its own for the drafts)."""
        return (self._spec is None and len(prompt) - boundary <= self._ctx.n_rollback
                and min(prompt[boundary - 1:]) >= 0)

    def _evaluate(self, tokens: list[int], *, logits: bool, last_batch: int = 1,
                  stop: Callable[[], bool] | None = None, step: int | None = None) -> bool:
        """Feed cells (`_cells`: tokens, and images' stand-ins) in batches, the last one holding at
        least `last_batch` cells when they are text. Returns False if
        interrupted between batches; the state stays consistent either way (`cache.tokens` lists
        exactly what has been evaluated)."""
        step = min(step or self._ctx.n_batch, self._ctx.n_batch)
        held = self.cache.tokens
        i = 0
        while i < len(tokens):
            if i and (self._stop.is_set() or stop is not None and stop()):
                return False
            if tokens[i] < 0:  # an image starts here
                image = self._image_cells[self._image_at[tokens[i]]]
                self._evaluate_image(self._image_at[tokens[i]], image)
                held.extend(tokens[i:i + image.n_tokens])
                if self._spec:
                    self._spec.skip(position(held))
                i += image.n_tokens
                continue
            end = min(i + step, len(tokens))
            if 0 < len(tokens) - end < last_batch:
                end = max(i + 1, len(tokens) - last_batch)
            end = next((j for j in range(i, end) if tokens[j] < 0), end)
            chunk = tokens[i:end]
            pos = position(held)
            self._ctx.decode(chunk, pos, cells=len(held), logits_last=logits and end == len(tokens))
            if self._spec:
                self._track(chunk, pos)
            held.extend(chunk)
            i = end
        return True

    def _track(self, tokens: list[int], pos: int) -> None:
        """Keep the MTP head in step with what the model just evaluated: all of it while drafting,
        only the last hidden state while decoding plainly (see Speculator.note)."""
        if self._policy.drafts():
            self._spec.feed(tokens, pos)
        else:
            self._spec.note(len(tokens), pos)

    def _drop_drafting_unless_it_can_pay(self, n_ctx: int, draft_tokens: int) -> None:
        """`auto`: time a plain step, a verify and a draft on this machine; when drafting would
        lose even with the best acceptance real weights reach, decode plainly from the start, on a
        context without the rollback snapshots and hidden-state rows that cost every plain step
        time too (the MTP block stays loaded: loading the model again would cost more)."""
        filler = self._model.tokenize(_CALIBRATION_TEXT)[:_CALIBRATION_TOKENS]
        # Timed on a thread of its own that then ends: llama.cpp's OpenMP keeps a pool of threads
        # for each thread that decodes, and while a long-lived thread (a server's main thread)
        # keeps an idle pool, libgomp counts more threads than cores and stops spin-waiting, which
        # slowed every later token by a quarter (4B, 2 cores: 9.3 against 12.7 tokens/s).
        outcome: list = []

        def time_steps() -> None:
            try:
                outcome.append(step_costs(self._spec, filler))
            except Exception as e:  # noqa: BLE001 - raised again on the caller's thread
                outcome.append(e)

        timing = threading.Thread(target=time_steps, name="qwen35-draft-check")
        timing.start()
        timing.join()
        if isinstance(outcome[0], Exception):
            raise outcome[0]
        notice = drafting_verdict(outcome[0], draft_tokens)
        if notice is None:
            return
        self.warnings.append(notice)
        self._spec.close()
        self._spec = None
        self._ctx.close()
        self._ctx = native.Context(self._model, n_ctx, self.threads, N_BATCH, n_rollback=self._read_back)

    @staticmethod
    def _drafting_possible(mf: ModelFile, mode: str, draft_tokens: int) -> bool:
        """Whether to load the MTP head; a missing one is an error only when asked for ("mtp")."""
        DraftPolicy(mode)  # checks the mode
        if mode == OFF:
            return False
        if not isinstance(draft_tokens, int) or not 1 <= draft_tokens <= MAX_DRAFT_TOKENS:
            raise ChatError(f"draft_tokens must be 1 to {MAX_DRAFT_TOKENS}, not {draft_tokens!r}")
        if mtp_block_count(mf) == 0 or mf.architecture not in QWEN35_ARCHS:
            if mode == MTP:
                raise ChatError(f"{mf.path.name} has no multi-token-prediction head (converted with --no-mtp?): "
                                f"leave out --mtp")
            return False
        return True

    # --- images ---------------------------------------------------------------------------------

    def _vision(self) -> Projector:
        """The model's mmproj, loaded on first use: a text-only chat never pays for it."""
        if self._projector is None:
            if self._mmproj is None:
                raise ChatError(f"{self.model_file.path.name} has no vision tower beside it: images need "
                                f"{self._mmproj_expected} (written by `qwen35 convert`), or give its mmproj with "
                                "--mmproj FILE")
            self._projector = Projector(self._mmproj, self._model, native.L.llama_model_n_embd(self._model.ptr),
                                        threads=self.threads, image_max_tokens=self._image_max_tokens)
        return self._projector

    def _cells(self, text: str, conversation: list[dict]) -> list[int]:
        """The context cells of `text`, a rendering of `conversation`: its tokens, and where the
        template put an image, the cells mtmd gives it (the image's parts, in order)."""
        slots = [m.group() for m in _MEDIA_SLOT.finditer(text)]
        if not slots:
            return self._model.tokenize(text)
        pieces = _MEDIA_SLOT.split(text)
        media = [part for m in conversation if isinstance(m.get("content"), list)
                 for part in m["content"] if part.get("type") in ("image", "video")]
        if [p["type"] for p in media] != ["image" if slot == _IMAGE_SLOT else "video" for slot in slots]:
            raise ChatError(f"the conversation holds {len(media)} images and videos but its text {len(slots)} "
                            f"slots for them ({_IMAGE_SLOT} typed in a message?)")
        cells = self._model.tokenize(pieces[0])
        for part, after in zip(media, pieces[1:]):
            cells += self._cells_of_video(part) if part["type"] == "video" else self._cells_of_image(part).cells
            cells += self._model.tokenize(after)
        return cells

    def _render_cells(self, conversation: list[dict], **how) -> list[int]:
        return self._cells(self.template.render(conversation, **how), conversation)

    def _hold_frame(self, image_id: str, path: str | None) -> None:
        if image_id not in self._images:  # a conversation taken up from the journal: the file may still be there
            data = read_image(path)[0] if path else b""
            if hashlib.sha256(data).hexdigest() != image_id:
                raise ChatError(f"the conversation shows an image this session does not hold"
                                f"{' (' + path + ' changed or is gone)' if path else ''}")
            self._images[image_id] = data

    def _cells_of_video(self, part: dict, name: str | None = None) -> list[int]:
        """A video's cells: per pair of frames, its timestamp and its cells as one image."""
        frames, paths = part["frames"], part.get("paths") or [None] * len(part["frames"])
        if len(frames) != 2 * len(part["seconds"]):
            raise ChatError("a video part must hold two frames for each of its timestamps")
        cells: list[int] = []
        for k, seconds in enumerate(part["seconds"]):
            pair = frames[2 * k:2 * k + 2]
            if pair[0] + "+" + pair[1] not in self._image_cells:
                for image_id, path in zip(pair, paths[2 * k:2 * k + 2]):
                    self._hold_frame(image_id, path)
            where = f"{name or 'the video'} (frames {2 * k + 1}-{2 * k + 2})"
            cells += self._model.tokenize(stamp(seconds)) + list(self._media_cells("+".join(pair), where).cells)
        if len(cells) >= self.n_ctx:
            raise ChatError(f"{name or 'the video'} takes {len(cells)} tokens, more than the {self.n_ctx}-token "
                            f"context holds: lower --image-max-tokens, give fewer frames or raise --ctx-size")
        return cells

    def _cells_of_image(self, part: dict, name: str | None = None) -> _ImageCells:
        image_id = part["image"]
        if image_id not in self._image_cells:
            self._hold_frame(image_id, part.get("path"))
        return self._media_cells(image_id, name or part.get("path"))

    def _media_cells(self, key: str, name: str | None) -> _ImageCells:
        """The cells of an image (key: its SHA-256) or a video's frame pair (two, joined by "+"),
        from the bytes this session holds."""
        found = self._image_cells.get(key)
        if found is not None:
            return found
        chunks = self._tokenize_image(key, name)
        (image,) = [c for c in chunks.items if c.is_image]
        marks = [c.tokens for c in chunks.items if not c.is_image]
        if image.n_tokens + 2 >= self.n_ctx:
            chunks.close()
            raise ChatError(f"{name or 'the image'} takes {image.n_tokens} tokens, more than the {self.n_ctx}-token "
                            f"context holds: lower --image-max-tokens or raise --ctx-size")
        stand_ins = image_cells(hashlib.sha256(key.encode()).digest() if "+" in key else bytes.fromhex(key),
                                image.n_tokens, image.n_pos)
        cells = _ImageCells(tuple(marks[0]) + stand_ins + tuple(marks[1]), image.n_tokens, image.n_pos)
        self._image_cells[key] = cells
        self._image_at[stand_ins[0]] = key
        self._tokenized[key] = chunks  # evaluated by this turn, most likely
        return cells

    def _tokenize_image(self, key: str, name: str | None = None) -> Chunks:
        """mtmd's chunks for an image, or for a video's frame pair: two frames of one size marked
        mergeable, which mtmd makes one image of two temporal halves (video.py)."""
        projector = self._vision()
        frames = key.split("+")
        images = []
        try:
            for image_id in frames:
                images.append(projector.image(self._images[image_id], name=name, mergeable=len(frames) > 1))
            if len({(i.width, i.height) for i in images}) > 1:
                raise ChatError(f"{name}: the frames of a video must all be of one size, not "
                                f"{' and '.join(f'{i.width}x{i.height}' for i in images)}")
            chunks = projector.tokenize(projector.marker * len(images), images)
        finally:
            for image in images:
                image.close()
        kinds = [c.is_image for c in chunks.items]
        if kinds != [False, True, False]:  # <|vision_start|>, the image (or merged pair), <|vision_end|>
            chunks.close()
            raise ChatError(f"llama.cpp laid the image out as {kinds}, not start, image, end")
        return chunks

    def _evaluate_image(self, image_id: str, image: _ImageCells) -> None:
        chunks = self._tokenized.pop(image_id, None) or self._tokenize_image(image_id)
        held = self.cache.tokens
        pos = position(held)
        start = time.perf_counter()
        try:
            chunk = chunks.items[1]
            if (chunk.n_tokens, chunk.n_pos) != (image.n_tokens, image.n_pos):
                raise ChatError("the image tokenized differently from before")
            try:
                end = self._projector.eval(self._ctx, chunk, pos, logits_last=False, cells=len(held))
            except ChatError:
                self.cache.clear()  # part of the image may be in the context: start from a known state
                raise
            # A wrong position raises nothing in llama.cpp (M-RoPE only needs positions to grow): check it.
            if end != pos + image.n_pos:
                self.cache.clear()
                raise ChatError(f"llama.cpp moved the position from {pos} to {end} over an image of "
                                f"{image.n_pos} positions")
        finally:
            chunks.close()
        self._image_work[0] += image.n_tokens
        self._image_work[1] += time.perf_counter() - start

    def _hold_images(self, conversation: list[dict], images) -> None:
        """Keep `images` and forget those neither `conversation` nor the recorded one shows: a
        server sees a stream of images and must not keep them all (each request re-sends its own)."""
        self._settle()
        given = {hashlib.sha256(data).hexdigest(): bytes(data) for data in images}
        shown = set()
        for m in conversation + self.messages:
            for part in m["content"] if isinstance(m.get("content"), list) else ():
                if part.get("type") == "image":
                    shown.add(part["image"])
                elif part.get("type") == "video":
                    shown.update(part["frames"])
                    shown.update(f"{a}+{b}" for a, b in zip(part["frames"][::2], part["frames"][1::2]))
        self._images = {i: d for i, d in {**self._images, **given}.items() if i in shown}
        self._image_cells = {i: c for i, c in self._image_cells.items() if i in shown}
        self._image_at = {k: i for k, i in self._image_at.items() if i in shown}

    def _free_tokenized(self) -> None:
        for chunks in self._tokenized.values():
            chunks.close()
        self._tokenized = {}

    def _request(self, overrides: dict, **fields) -> _Request:
        think = overrides.pop("think", self.think)
        max_tokens = overrides.pop("max_tokens", self.max_tokens)
        stop = overrides.pop("stop", None) or ()
        return _Request(think=think, max_tokens=max_tokens, sampling=self._with_overrides(overrides),
                        stop=tuple([stop] if isinstance(stop, str) else stop), **fields)

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


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _opens_reasoning(prompt_text: str) -> bool:
    """Whether the generation prompt leaves a `<think>` block open (the reply starts reasoning)."""
    return prompt_text.rfind("<think>") > prompt_text.rfind("</think>")


def _fingerprint(mf: ModelFile) -> dict:
    """Enough to tell model files apart without hashing gigabytes: name, size, and a hash of the
    header and of the last MiB of tensor data."""
    h = hashlib.sha256()
    with open(mf.path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, mf.size - (1 << 20)))
        h.update(f.read())
    return {"name": mf.path.name, "size": mf.size, "sha256": h.hexdigest()}


def _read_session(path: Path) -> tuple[dict, bytes, bytes, dict[str, bytes]]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ChatError(f"{path} does not exist") from None
    except OSError as e:
        raise ChatError(f"cannot read {path}: {e.strerror}") from None
    if not data.startswith(_SESSION_MAGIC):
        raise ChatError(f"{path} is not a conversation saved by qwen35 (/save FILE writes one)")
    try:
        start = len(_SESSION_MAGIC) + 8
        n = int.from_bytes(data[len(_SESSION_MAGIC):start], "little")
        header = json.loads(data[start:start + n])
        start += n
        state = data[start:start + header["state_bytes"]]
        start += header["state_bytes"]
        checkpoint = data[start:start + header["checkpoint_bytes"]]
        start += header["checkpoint_bytes"]
        images = {}
        for image_id, n in header.get("images", []):  # (version 1 had none)
            images[image_id] = data[start:start + n]
            start += n
        if header.get("version") not in (1, _SESSION_VERSION) or len(state) != header["state_bytes"] \
                or len(checkpoint) != header["checkpoint_bytes"] or start != len(data) \
                or any(hashlib.sha256(d).hexdigest() != i for i, d in images.items()):
            raise ValueError
    except (ValueError, KeyError, TypeError):
        raise ChatError(f"{path} is damaged or was written by another version of qwen35") from None
    return header, state, checkpoint, images


__all__ = ["ChatSession", "Reply", "nfc"]
