"""Quantization profiles: data files (quant_profiles/*.toml) that map tensors to types.

A profile has a base type and ordered rules; the first rule that matches a tensor gives its type.
A rule matches on the GGUF tensor name (regex) and optionally on the block's position, the layer's
kind (linear attention, full attention, MTP) and facts of the model (GQA ratio, expert count, tied
embeddings, imatrix given). Schema: quant_profiles/README.md.
"""

from __future__ import annotations

import re
try:
    import tomllib  # novermin  (guarded: tests/test_python_versions.py checks the rest needs only 3.10)
except ModuleNotFoundError:  # Python 3.10 (Ubuntu 22.04, Jetson boards): the same parser, as a package
    import tomli as tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .errors import ConvertError
from .plan import PlannedTensor

T = GGMLQuantizationType
PROFILE_DIR = Path(__file__).resolve().parent.parent / "quant_profiles"

# llama_ftype values (include/llama.h), written as general.file_type.
FILE_TYPES = {
    "ALL_F32": 0, "MOSTLY_F16": 1, "MOSTLY_Q4_0": 2, "MOSTLY_Q4_1": 3, "MOSTLY_Q8_0": 7, "MOSTLY_Q5_0": 8,
    "MOSTLY_Q5_1": 9, "MOSTLY_Q2_K": 10, "MOSTLY_Q3_K_S": 11, "MOSTLY_Q3_K_M": 12, "MOSTLY_Q3_K_L": 13,
    "MOSTLY_Q4_K_S": 14, "MOSTLY_Q4_K_M": 15, "MOSTLY_Q5_K_S": 16, "MOSTLY_Q5_K_M": 17, "MOSTLY_Q6_K": 18,
    "MOSTLY_IQ2_XXS": 19, "MOSTLY_IQ2_XS": 20, "MOSTLY_Q2_K_S": 21, "MOSTLY_IQ3_XS": 22, "MOSTLY_IQ3_XXS": 23,
    "MOSTLY_IQ1_S": 24, "MOSTLY_IQ4_NL": 25, "MOSTLY_IQ3_S": 26, "MOSTLY_IQ3_M": 27, "MOSTLY_IQ2_S": 28,
    "MOSTLY_IQ2_M": 29, "MOSTLY_IQ4_XS": 30, "MOSTLY_IQ1_M": 31, "MOSTLY_BF16": 32,
}
# 2-D tensors that stay F32 at every type: the CPU conv kernel aborts on a quantized ssm_conv1d, and
# routers decide which experts run. llama-quantize never quantizes these either (llama-quant.cpp,
# tensor_allows_quantization).
KEEP_F32 = ("ssm_conv1d.weight", "ffn_gate_inp.weight")
# When a type's block does not divide a row, llama.cpp falls back along this table
# (llama-quant.cpp, tensor_type_fallback), then to F16.
FALLBACK = {
    T.IQ1_S: T.IQ4_NL, T.IQ1_M: T.IQ4_NL, T.IQ2_XXS: T.IQ4_NL, T.IQ2_XS: T.IQ4_NL, T.IQ2_S: T.IQ4_NL,
    T.IQ3_XXS: T.IQ4_NL, T.IQ3_S: T.IQ4_NL, T.IQ4_XS: T.IQ4_NL,
    T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0,
}
LAYER_KINDS = ("linear-attention", "full-attention", "mtp")
_CONDITIONS = {"min_gqa", "max_gqa", "experts", "min_experts", "tied", "imatrix"}
_RULE_KEYS = {"tensors", "type", "reason", "layers", "count", "kind"} | _CONDITIONS
_PROFILE_KEYS = {"description", "base", "file_type", "extends", "rule", "matches_llama_quantize", "imatrix_required"}
# Types llama-quantize will not make without an importance matrix (llama-quant.cpp, tensor_requires_imatrix).
IMATRIX_TYPES = {T.IQ3_XXS, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ1_M, T.IQ1_S}
_BLOCK = re.compile(r"^blk\.(\d+)\.")


def _c_div(a: int, b: int) -> int:
    return a // b  # positive operands only: C's truncation and Python's floor agree


def _more_bits(i: int, n: int) -> bool:
    # llama-quant.cpp's use_more_bits(): the first and last eighth, and every third layer between.
    return i < _c_div(n, 8) or i >= _c_div(7 * n, 8) or (i - _c_div(n, 8)) % 3 == 2


def _layer_predicate(spec: str):
    """`more_bits`, `first_eighth`, `first_sixteenth`, `middle`, `first:K`, `last:K`: over (block, blocks)."""
    named = {
        "more_bits": _more_bits,
        "first_eighth": lambda i, n: i < _c_div(n, 8),
        "first_sixteenth": lambda i, n: i < _c_div(n, 16),
        "middle": lambda i, n: _c_div(n, 8) <= i < _c_div(7 * n, 8),
    }
    if spec in named:
        return named[spec]
    m = re.fullmatch(r"(first|last):(\d+)", spec)
    if m:
        k = int(m.group(2))
        return (lambda i, n: i < k) if m.group(1) == "first" else (lambda i, n: i >= n - k)
    raise ValueError(f"unknown layers selector {spec!r} (use more_bits, first_eighth, first_sixteenth, middle, first:K, last:K)")


def parse_type(name: str) -> GGMLQuantizationType:
    try:
        return T[name.upper()]
    except KeyError:
        raise ValueError(f"unknown tensor type {name!r}") from None


@dataclass(frozen=True)
class ModelFacts:
    """What rules may condition on, from the config (so --dry-run needs no weights)."""

    n_blocks: int  # including the MTP block
    layer_types: tuple[str, ...]
    gqa: int
    n_experts: int
    tied: bool
    tensor_names: tuple[str, ...] = ()
    imatrix: bool = False

    def ordinal(self, name: str, substring: str) -> int:
        """Position of `name` among the tensors whose names contain `substring`, in llama-quantize's
        order (by block, then by name: llama-model-loader.h, weight_name_comparer)."""
        counted = sorted((n for n in self.tensor_names if substring in n), key=_llama_order)
        return counted.index(name)

    def kind_of(self, block: int) -> str:
        if block >= len(self.layer_types):
            return "mtp"
        return "linear-attention" if self.layer_types[block] == "linear_attention" else "full-attention"


@dataclass(frozen=True)
class Rule:
    tensors: re.Pattern
    type: GGMLQuantizationType
    reason: str
    layers: Optional[str] = None
    count: Optional[str] = None  # `layers` counts tensors containing this, not blocks
    kind: tuple[str, ...] = ()
    conditions: dict = field(default_factory=dict)

    def matches(self, name: str, facts: ModelFacts) -> bool:
        if not self.tensors.search(name):
            return False
        c = self.conditions
        if "min_gqa" in c and facts.gqa < c["min_gqa"]:
            return False
        if "max_gqa" in c and facts.gqa > c["max_gqa"]:
            return False
        if "experts" in c and facts.n_experts != c["experts"]:
            return False
        if "min_experts" in c and facts.n_experts < c["min_experts"]:
            return False
        if "tied" in c and facts.tied != c["tied"]:
            return False
        if "imatrix" in c and facts.imatrix != c["imatrix"]:
            return False
        if self.layers is None and not self.kind:
            return True
        m = _BLOCK.match(name)
        if m is None:
            return False
        block = int(m.group(1))
        if self.kind and facts.kind_of(block) not in self.kind:
            return False
        if self.layers is None:
            return True
        position = facts.ordinal(name, self.count) if self.count else block
        return _layer_predicate(self.layers)(position, facts.n_blocks)


@dataclass(frozen=True)
class Choice:
    type: GGMLQuantizationType
    reason: str


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    base: GGMLQuantizationType
    file_type: int
    rules: tuple[Rule, ...]
    source: str  # where it was read from, for messages
    imatrix_required: bool = False

    def choose(self, t: PlannedTensor, facts: ModelFacts) -> Choice:
        if len(t.shape) == 1 or t.name.endswith(KEEP_F32):
            return Choice(T.F32, "kept F32 (1-D, norm, conv or router)")
        chosen = Choice(self.base, "base type")
        for rule in self.rules:
            if rule.matches(t.name, facts):
                chosen = Choice(rule.type, rule.reason)
                break
        return _fit_rows(t, chosen)


def _fit_rows(t: PlannedTensor, choice: Choice) -> Choice:
    """A type whose block does not divide the row falls back as llama.cpp does; the plan says so."""
    block = GGML_QUANT_SIZES[choice.type][0]
    if t.row_length % block == 0:
        return choice
    fallback = FALLBACK.get(choice.type, choice.type)
    if t.row_length % GGML_QUANT_SIZES[fallback][0]:
        fallback = T.F16
    note = f"{choice.type.name} needs rows of {block}, this row has {t.row_length}: fell back to {fallback.name}"
    return Choice(fallback, f"{choice.reason}; {note}")


def available() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def load(name_or_path: str) -> Profile:
    """A profile by name (quant_profiles/<name>.toml) or by path to the user's own TOML file."""
    path = Path(name_or_path)
    if name_or_path.endswith(".toml") or path.is_file():
        if not path.is_file():
            raise ConvertError(f"profile file {path} does not exist")
        return _load_file(path, seen=())
    candidate = PROFILE_DIR / f"{name_or_path.lower()}.toml"
    if not candidate.is_file():
        raise ConvertError(f"unknown type or profile {name_or_path!r}; choose from {', '.join(available())}, or give a .toml path")
    return _load_file(candidate, seen=())


def _load_file(path: Path, seen: tuple[str, ...]) -> Profile:
    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConvertError(f"profile {path}: {e}") from None  # tomllib names the line and column
    except (OSError, UnicodeDecodeError) as e:
        raise ConvertError(f"profile {path} cannot be read: {e}") from None

    def fail(message: str, key: str | None = None):
        line = _line_of(text, key) if key else None
        where = f"{path}, line {line}" if line else str(path)
        raise ConvertError(f"profile {where}: {message}")

    unknown = set(data) - _PROFILE_KEYS
    if unknown:
        fail(f"unknown key {sorted(unknown)[0]!r} (allowed: {', '.join(sorted(_PROFILE_KEYS))})", sorted(unknown)[0])
    parent = None
    if "extends" in data:
        if data["extends"] in seen:
            fail(f"extends {data['extends']!r} in a loop", "extends")
        parent_path = PROFILE_DIR / f"{data['extends']}.toml"
        if not parent_path.is_file():
            fail(f"extends unknown profile {data['extends']!r}", "extends")
        parent = _load_file(parent_path, seen + (path.stem,))
    try:
        base = parse_type(data["base"]) if "base" in data else (parent.base if parent else None)
    except ValueError as e:
        fail(str(e), "base")
    if base is None:
        fail("needs a base type (base = \"q4_k\") or extends = \"<profile>\"")
    file_type_name = data.get("file_type")
    if file_type_name is not None and file_type_name not in FILE_TYPES:
        fail(f"unknown file_type {file_type_name!r}", "file_type")
    file_type = FILE_TYPES[file_type_name] if file_type_name else (parent.file_type if parent else _file_type_of(base))

    rules = []
    for i, raw in enumerate(data.get("rule", [])):
        anchor = f"rule #{i + 1}"
        unknown = set(raw) - _RULE_KEYS
        if unknown:
            fail(f"{anchor}: unknown key {sorted(unknown)[0]!r} (allowed: {', '.join(sorted(_RULE_KEYS))})", sorted(unknown)[0])
        for key in ("tensors", "type", "reason"):
            if key not in raw:
                fail(f"{anchor} needs {key!r}")
        try:
            pattern = re.compile(raw["tensors"])
            rule_type = parse_type(raw["type"])
            if "layers" in raw:
                _layer_predicate(raw["layers"])
        except (re.error, ValueError) as e:
            fail(f"{anchor}: {e}", raw.get("tensors"))
        kind = raw.get("kind", ())
        kind = (kind,) if isinstance(kind, str) else tuple(kind)
        if any(k not in LAYER_KINDS for k in kind):
            fail(f"{anchor}: kind must be among {', '.join(LAYER_KINDS)}", "kind")
        conditions = {k: raw[k] for k in _CONDITIONS if k in raw}
        rules.append(Rule(pattern, rule_type, str(raw["reason"]), raw.get("layers"), raw.get("count"), kind, conditions))
    if parent:
        rules += parent.rules  # the child's rules come first: they refine the parent's
    imatrix_required = bool(data.get("imatrix_required", parent.imatrix_required if parent else False))
    return Profile(path.stem, str(data.get("description", "")), base, file_type, tuple(rules), str(path),
                   imatrix_required)


def _llama_order(name: str) -> tuple[int, str]:
    m = _BLOCK.match(name)
    return (int(m.group(1)) if m else -1, name)


def _file_type_of(base: GGMLQuantizationType) -> int:
    name = "ALL_F32" if base == T.F32 else f"MOSTLY_{base.name}"
    return FILE_TYPES.get(name, FILE_TYPES["MOSTLY_F16"])


def _line_of(text: str, needle: str | None) -> int | None:
    if not needle:
        return None
    for number, line in enumerate(text.splitlines(), 1):
        if needle in line:
            return number
    return None
