"""A cheaper MTP draft: the output layer over a frequency-ranked subset of the vocabulary (FR-Spec).

Why: each draft of speculative.Speculator runs the MTP context's whole graph, and that graph ends
in the model's output layer, 248,320 rows of n_embd weights. The MTP block itself is one
transformer layer, so at small model sizes the output layer is most of a draft's cost (a draft is
~0.3x a target token at 0.8B dimensions). The draft only needs the most likely token, and the most
likely token is nearly always a common one: FR-Spec (arXiv 2502.14856) drafts from the few tens of
thousands most frequent tokens and keeps nearly all the acceptance. Verification still runs the
target's full vocabulary, so the tokens emitted are the target's, greedy or sampled: a draft from
the subset is at worst rejected.

How, with the pinned llama.cpp (vendor/llama.cpp in the llama-cpp-python 0.3.36 sdist):
- src/models/qwen35.cpp, graph_mtp: after the MTP block the graph applies the head norm
  (nextn.shared_head_norm, else output_norm), names that row "h_nextn" (res->t_h_nextn), and only
  then takes the output rows (ggml_get_rows(cur, inp_out_ids)) and multiplies them by the output
  weight (nextn.shared_head_head if the file has one, else `output`, which load_arch_tensors makes
  token_embd when the model is tied). So h_nextn is exactly what the output layer multiplies;
- src/llama-context.cpp, decode: with llama_set_embeddings_nextn(ctx, true, masked=false) the
  h_nextn row of every token of the batch is copied out (n_rows = ubatch.n_tokens), whether or not
  the token has an output; a token added with output=false makes inp_out_ids empty, so the output
  layer multiplies 0 rows (the Speculator's `feed` decodes that way already).
So a draft adds its token without an output, reads h (llama_get_embeddings_nextn, row 0) and
computes W_S·h here, W_S being the rows of the output weight for the subset S, in the file's own
quantization (the same bytes llama.cpp multiplies, so a logit here equals llama.cpp's up to float
summation order: ggml rounds h to the weight type's dot-product type in both). Checked on the test
fixtures (tests/test_draft_head.py): W·h over the whole vocabulary, with h rounded as ggml rounds
it, reproduces the MTP context's logits to ~1e-7.

The product is one ggml graph (mul_mat of W_S [K x n_embd] by h), built once and recomputed per
draft through llama-cpp-python's own ggml libraries (ctypes: ggml_init, ggml_new_tensor_2d,
ggml_mul_mat, ggml_new_graph, ggml_build_forward_expand, ggml_graph_plan, ggml_graph_compute),
with the work buffer planned once per thread count.

The ranking (`frequency_ranked`): Qwen's byte-level BPE numbers its tokens in merge order, and a
merge is learnt earlier the more often its pair occurs in the tokenizer's training text, so the
ids are a frequency ranking that ships with every GGUF (no download, no table): S is the first K
regular ids plus every added token in use (<|im_end|>, <think>, </think>, <tool_call>, …: 33 in
Qwen3.5's vocabulary, ids 248044..248076; the 243 unused padding ids after them are left out).
Any other ranking can be given as an explicit list of ids.

Measured (bench/bench_draft_cost.py, 2 threads, Intel Xeon, quiet): a draft costs 0.35x a token
with the whole vocabulary at 0.8B dimensions and 0.04x with K = 32,768 (4B: 0.21x and 0.05x); on
the trained demo model, drafting 3 went from 0.74x plain decoding's speed to 1.27x at K = 32,768,
its acceptance from 0.88 to 0.73 (its world's country and capital names rank at ids 35k-93k).
"""

from __future__ import annotations

import ctypes
import mmap

import numpy as np

import llama_cpp as L

from ...gguf_header import GGUFFormatError, read_header
from .errors import ChatError
from .modelfile import mtp_output_tensor

# --- the ranking --------------------------------------------------------------------------------


def added_tokens(model) -> np.ndarray:
    """The ids of the added tokens a model can emit (control and user-defined ones: <|im_end|>,
    <think>, <tool_call>, …): the run of non-normal tokens at the top of the vocabulary, without
    the unused padding ids."""
    found = []
    t = model.n_vocab - 1
    while t >= 0:
        attr = L.llama_vocab_get_attr(model.vocab, t)
        if attr & L.LLAMA_TOKEN_ATTR_NORMAL or attr & L.LLAMA_TOKEN_ATTR_BYTE:
            break
        if not attr & L.LLAMA_TOKEN_ATTR_UNUSED:
            found.append(t)
        t -= 1
    return np.array(sorted(found), np.int64)


def frequency_ranked(model, k: int) -> np.ndarray:
    """The draft subset of `k` ids: the added tokens and the first k - len(added) regular ids (in
    BPE merge order, see the module docstring), sorted."""
    added = added_tokens(model)
    first = min(int(added[0]) if len(added) else model.n_vocab, max(0, k - len(added)))
    return np.concatenate([np.arange(first, dtype=np.int64), added])


# --- ggml through ctypes -------------------------------------------------------------------------


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


class _CPlan(ctypes.Structure):  # ggml-cpu.h, struct ggml_cplan
    _fields_ = [("work_size", ctypes.c_size_t), ("work_data", ctypes.c_void_p), ("n_threads", ctypes.c_int),
                ("threadpool", ctypes.c_void_p), ("abort_callback", ctypes.c_void_p),
                ("abort_callback_data", ctypes.c_void_p), ("use_ref", ctypes.c_bool)]


_ggml = None


def _libs():
    """(libggml-base, libggml-cpu) with the signatures used here (the libraries llama.cpp loaded)."""
    global _ggml
    if _ggml is None:
        from .cpu import _library

        base, cpu = _library("ggml-base"), _library("ggml-cpu")
        p, i64, sz = ctypes.c_void_p, ctypes.c_int64, ctypes.c_size_t
        for name, res, args in [("ggml_init", p, [_InitParams]), ("ggml_free", None, [p]),
                                ("ggml_new_tensor_1d", p, [p, ctypes.c_int, i64]),
                                ("ggml_new_tensor_2d", p, [p, ctypes.c_int, i64, i64]),
                                ("ggml_mul_mat", p, [p, p, p]), ("ggml_new_graph", p, [p]),
                                ("ggml_build_forward_expand", None, [p, p]), ("ggml_get_data", p, [p]),
                                ("ggml_row_size", sz, [ctypes.c_int, i64]), ("ggml_tensor_overhead", sz, []),
                                ("ggml_graph_overhead", sz, []), ("ggml_nbytes", sz, [p])]:
            f = getattr(base, name)
            f.restype, f.argtypes = res, args
        cpu.ggml_cpu_init.restype, cpu.ggml_cpu_init.argtypes = None, []
        cpu.ggml_graph_plan.restype, cpu.ggml_graph_plan.argtypes = _CPlan, [p, ctypes.c_int, p]
        cpu.ggml_graph_compute.restype, cpu.ggml_graph_compute.argtypes = ctypes.c_int, [p, ctypes.POINTER(_CPlan)]
        cpu.ggml_cpu_init()  # (done by llama.cpp's CPU backend already; idempotent)
        _ggml = (base, cpu)
    return _ggml


class SubsetHead:
    """logits = W[ids] · h for one hidden row h, W the output weight of the GGUF at `path`, its
    rows kept in the file's type; `argmax(h)` is the draft token. `header`: the file's header if
    it was read already (reading it takes ~0.14 s at a real vocabulary; gathering K rows and
    building the graph ~0.1 s more at 32k rows of a 4B model)."""

    MANY = 8  # rows argmax_rows takes at once (Speculator.feed's look at a prompt's last tokens)

    def __init__(self, path, ids, threads: int, header=None) -> None:
        if header is None:
            try:
                header = read_header(path)
            except GGUFFormatError as e:
                raise ChatError(str(e)) from None
        tensor = mtp_output_tensor(header)
        n_rows, n_embd = tensor.shape
        self.ids = np.asarray(ids, np.int64)
        if self.ids.ndim != 1 or not len(self.ids) or self.ids.min() < 0 or self.ids.max() >= n_rows:
            raise ChatError(f"draft vocabulary ids must be a non-empty list within 0..{n_rows - 1}")
        self.n_embd = n_embd
        self.ggml_type = int(tensor.ggml_type)
        self.tensor_name = tensor.name
        base, cpu = self._base, self._cpu = _libs()
        k = len(self.ids)
        row_bytes = base.ggml_row_size(self.ggml_type, n_embd)
        many = self.MANY
        mem = (base.ggml_tensor_overhead() * 6 + base.ggml_graph_overhead() * 2 + row_bytes * k
               + 4 * (n_embd + k) * (1 + many) + 8192)
        self._ctx = base.ggml_init(_InitParams(mem, None, False))
        if not self._ctx:
            raise ChatError(f"ggml could not allocate {mem / 2**20:.1f} MiB for the draft head")
        self._w = base.ggml_new_tensor_2d(self._ctx, self.ggml_type, n_embd, k)
        self._h = base.ggml_new_tensor_1d(self._ctx, 0, n_embd)  # GGML_TYPE_F32
        self._out = base.ggml_mul_mat(self._ctx, self._w, self._h)  # [k] F32
        self._graph = base.ggml_new_graph(self._ctx)
        base.ggml_build_forward_expand(self._graph, self._out)
        # MANY rows at once (argmax_rows): the weights are read once for all of them.
        self._hs = base.ggml_new_tensor_2d(self._ctx, 0, n_embd, many)
        self._outs = base.ggml_mul_mat(self._ctx, self._w, self._hs)  # [k, many] F32
        self._graph_many = base.ggml_new_graph(self._ctx)
        base.ggml_build_forward_expand(self._graph_many, self._outs)
        # W_S straight into the tensor's memory, gathered from the mapped file.
        w = np.ctypeslib.as_array((ctypes.c_uint8 * (row_bytes * k)).from_address(base.ggml_get_data(self._w)))
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            rows = np.frombuffer(mm, np.uint8, count=row_bytes * n_rows, offset=tensor.offset).reshape(n_rows, row_bytes)
            w.reshape(k, row_bytes)[:] = rows[self.ids]
            del rows
        self.weight_bytes = row_bytes * k
        self.h = np.ctypeslib.as_array((ctypes.c_float * n_embd).from_address(base.ggml_get_data(self._h)))
        self.logits = np.ctypeslib.as_array((ctypes.c_float * k).from_address(base.ggml_get_data(self._out)))
        self.hs = np.ctypeslib.as_array((ctypes.c_float * (n_embd * many)).from_address(
            base.ggml_get_data(self._hs))).reshape(many, n_embd)
        self.logits_many = np.ctypeslib.as_array((ctypes.c_float * (k * many)).from_address(
            base.ggml_get_data(self._outs))).reshape(many, k)
        self._plan = self._plan_many = None
        self.set_threads(threads)

    def set_threads(self, threads: int) -> None:
        self._plan, self._work = self._plan_for(self._graph, threads)
        self._plan_many, self._work_many = self._plan_for(self._graph_many, threads)

    def _plan_for(self, graph, threads: int):
        plan = self._cpu.ggml_graph_plan(graph, int(threads), None)
        work = np.zeros(max(plan.work_size, 1), np.uint8)
        plan.work_data = work.ctypes.data
        return plan, work

    def compute(self, hidden: np.ndarray) -> np.ndarray:
        """The logits over the subset (a view, overwritten by the next call) for hidden row `hidden`."""
        self.h[:] = hidden
        status = self._cpu.ggml_graph_compute(self._graph, ctypes.byref(self._plan))
        if status != 0:
            raise ChatError(f"ggml could not compute the draft head (status {status})")
        return self.logits

    def argmax(self, hidden: np.ndarray) -> int:
        """The most likely token of the subset (the first of equal ones, as numpy's argmax)."""
        return int(self.ids[int(np.argmax(self.compute(hidden)))])

    def argmax_rows(self, hidden: np.ndarray) -> np.ndarray:
        """`argmax` of each of up to MANY hidden rows, in one pass over the subset's weights."""
        n = len(hidden)
        if not 0 < n <= self.MANY:
            raise ValueError(f"argmax_rows takes 1 to {self.MANY} rows, not {n}")
        self.hs[:n] = hidden
        self.hs[n:] = 0
        status = self._cpu.ggml_graph_compute(self._graph_many, ctypes.byref(self._plan_many))
        if status != 0:
            raise ChatError(f"ggml could not compute the draft head (status {status})")
        return self.ids[np.argmax(self.logits_many[:n], axis=1)]

    def close(self) -> None:
        if self._ctx:
            self.h = self.logits = self.hs = self.logits_many = None
            self._base.ggml_free(self._ctx)
            self._ctx = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
