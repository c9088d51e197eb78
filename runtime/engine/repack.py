"""Which weights llama.cpp's CPU backend repacks when the model loads (its `CPU_REPACK` buffer type).

A repacked weight is copied, at load time, from the memory-mapped file into interleaved blocks in
anonymous memory (ggml-cpu/repack.cpp, ggml_repack_get_optimal_repack_type). The mapped original
stays mapped — the loader only unmaps the file's ends outside the tensors it maps directly — so
right after loading both copies are resident; the original is never read again, so the kernel may
drop it from the page cache under memory pressure (and a file mostly copied is read, not mapped:
memory.maps_weights). AMX, where runtime.cpu lets it run, copies the weights it takes the same way.
A tied embedding is the worst case: the input embedding is read as loaded (GET_ROWS, not
repacked), and the output projection that shares its data is a MUL_MAT weight, repacked into a
second, anonymous copy.

Whether a weight is repacked depends on the CPU features llama.cpp was built for and finds at run
time (`llama_print_system_info`: NEON, DOTPROD, MATMUL_INT8, AVX2, …), its type, and its row count:
`repacked_layout` is that decision, rule for rule as the pinned llama.cpp makes it. RISC-V's
vector layouts (which also depend on a compile flag the system info does not show) are not modelled.
"""

from __future__ import annotations

# Per type, llama.cpp's choices in order: (features all required, rows must divide by, layout).
# Row count is ne[1] (the number of output rows of the matrix; per expert for a 3-D expert tensor).
_RULES: dict[str, tuple[tuple[frozenset[str], int, str], ...]] = {}


def _rules(type_name: str, *choices: tuple[str, int, str]) -> None:
    _RULES[type_name] = tuple((frozenset(features.split()), rows, layout) for features, rows, layout in choices)


_rules("Q4_0", ("AVX2", 8, "q4_0_8x8"), ("SVE MATMUL_INT8 SVE_CNT=32", 8, "q4_0_8x8"),
       ("NEON MATMUL_INT8", 4, "q4_0_4x8"), ("NEON DOTPROD", 4, "q4_0_4x4"), ("VXE", 4, "q4_0_4x4"))
_rules("Q4_K", ("AVX2", 8, "q4_K_8x8"), ("NEON MATMUL_INT8", 8, "q4_K_8x8"), ("NEON DOTPROD", 8, "q4_K_8x4"))
_rules("Q2_K", ("AVX512", 8, "q2_K_8x8"))
_rules("Q5_K", ("NEON MATMUL_INT8", 8, "q5_K_8x8"), ("NEON DOTPROD", 8, "q5_K_8x4"))
_rules("Q6_K", ("NEON MATMUL_INT8", 8, "q6_K_8x8"), ("NEON DOTPROD", 8, "q6_K_8x4"))
_rules("IQ4_NL", ("AVX2", 8, "iq4_nl_8x8"), ("NEON DOTPROD", 4, "iq4_nl_4x4"))
_rules("MXFP4", ("AVX2", 8, "mxfp4_8x8"), ("NEON DOTPROD", 4, "mxfp4_4x4"))
_rules("Q8_0", ("NEON MATMUL_INT8", 4, "q8_0_4x8"), ("NEON DOTPROD", 4, "q8_0_4x4"))
_rules("Q1_0", ("NEON MATMUL_INT8", 4, "q1_0_4x8"), ("NEON DOTPROD", 4, "q1_0_4x4"))

# AMX (Intel Xeon tiles, ggml-cpu/amx), offered to the loader before CPU_REPACK when runtime.cpu
# allows it: not a feature llama.cpp reports but that decision, added to the features by the caller.
# It takes a MUL_MAT weight (not MUL_MAT_ID: no expert stacks) of these types whose rows divide by
# 32 (two tiles, amx.cpp supports_op) and whose row length divides by the alignment, and stores
# each block with some bytes more (mmq.cpp get_row_size): a Q8_0 block's int32 compensation, a
# Q4_K or Q5_K block's unpacked scales, an IQ4_XS block's. Per type: (values a block, row-length
# alignment, extra bytes a block).
AMX_IN_USE = "AMX in use"
_AMX: dict[str, tuple[int, int, int]] = {"Q4_0": (32, 32, 0), "Q4_1": (32, 32, 0), "Q8_0": (32, 32, 4),
                                         "Q4_K": (256, 256, 4), "Q5_K": (256, 256, 4), "Q6_K": (256, 256, 0),
                                         "IQ4_XS": (256, 256, 2)}
AMX_LAYOUT = "amx"

# Weights llama.cpp reads with GET_ROWS, not MUL_MAT (llama-arch.cpp, LLM_TENSOR_INFOS): never repacked.
_LOOKUP_TABLES = ("token_embd.weight", "nextn.embed_tokens.weight")


def cpu_features() -> frozenset[str]:
    """What the loaded llama.cpp library reports for this CPU (compile-time and run-time checks)."""
    from .cpu import features

    return frozenset(features())


def repacked_layout(features: frozenset[str], type_name: str, dims: tuple[int, ...]) -> str | None:
    """The interleaved layout llama.cpp repacks a weight of this type and shape (ggml order: row
    length first, then rows) into, or None if it stays as it is in the file."""
    if "REPACK" not in features or len(dims) < 2:
        return None
    for required, rows, layout in _RULES.get(type_name, ()):
        if required <= features and dims[1] % rows == 0:
            return layout
    return None


def is_matmul_weight(name: str, dims: tuple[int, ...]) -> bool:
    """Whether llama.cpp multiplies by this weight (MUL_MAT for a matrix, MUL_MAT_ID for a 3-D
    expert stack): only those go to the repack buffer type."""
    return len(dims) in (2, 3) and not name.endswith(_LOOKUP_TABLES)


def amx_takes(features: frozenset[str], type_name: str, dims: tuple[int, ...]) -> bool:
    if AMX_IN_USE not in features or len(dims) != 2 or type_name not in _AMX:
        return False
    _, alignment, _ = _AMX[type_name]
    return dims[0] % alignment == 0 and dims[1] % 32 == 0


def repacked(features: frozenset[str], name: str, type_name: str, dims: tuple[int, ...]) -> str | None:
    """The layout a weight is copied into at load time (AMX_LAYOUT, or a CPU_REPACK layout), or None."""
    if not is_matmul_weight(name, dims):
        return None
    return AMX_LAYOUT if amx_takes(features, type_name, dims) else repacked_layout(features, type_name, dims)


def copy_bytes(layout: str, type_name: str, dims: tuple[int, ...], nbytes: int) -> int:
    """The size of the copy in `layout` of a weight of `nbytes`: CPU_REPACK's interleaved blocks are
    the same blocks; AMX's carry their extra bytes."""
    if layout != AMX_LAYOUT:
        return nbytes
    block, _, extra = _AMX[type_name]
    return nbytes + extra * (dims[0] // block) * dims[1]
