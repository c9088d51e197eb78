"""`qwen35 info`: what a GGUF file holds, read from its header alone."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from .errors import ConvertError
from .gguf_file import ArrayInfo, GGUFFormatError, GGUFHeader, read_header


def read_gguf(path) -> GGUFHeader:
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"{path} does not exist")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ConvertError(f"{path} is not a GGUF file")
    try:
        return read_header(path)
    except GGUFFormatError as e:
        raise ConvertError(f"{path} is not a valid GGUF file ({e})") from None


def layer_pattern(recurrent: list[bool]) -> str:
    """`3×linear + 1×full, ×6` for the releases' layout; any layout described by its shortest period."""
    n = len(recurrent)
    period = next(p for p in range(1, n + 1) if n % p == 0 and recurrent == recurrent[:p] * (n // p))
    groups: list[list] = []
    for r in recurrent[:period]:
        kind = "linear" if r else "full"
        if groups and groups[-1][1] == kind:
            groups[-1][0] += 1
        else:
            groups.append([1, kind])
    text = " + ".join(f"{count}×{kind}" for count, kind in groups)
    return f"{text}, ×{n // period}" if n // period > 1 else text


def describe(path) -> str:
    header = read_gguf(path)
    meta = header.metadata
    arch = meta.get("general.architecture", "?")
    n_blocks = meta.get(f"{arch}.block_count", 0)
    nextn = meta.get(f"{arch}.nextn_predict_layers", 0)
    n_layers = n_blocks - nextn
    recurrent = [bool(x) for x in meta.get(f"{arch}.attention.recurrent_layers", [])][:n_layers]
    tokens = meta.get("tokenizer.ggml.tokens", [])
    n_tokens = tokens.count if isinstance(tokens, ArrayInfo) else len(tokens)

    by_type: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    params = mtp_params = 0
    for t in header.tensors:
        count = 1
        for d in t.shape:
            count *= d
        if nextn and t.name.startswith(f"blk.{n_layers}."):
            mtp_params += count
        else:
            params += count
        entry = by_type[t.ggml_type.name]
        entry[0] += 1
        entry[1] += t.nbytes

    rows = [
        ("file", f"{path} ({header.file_size / 1e6:,.1f} MB)"),
        ("architecture", f"{arch}  ({meta.get('general.name', '?')}, {meta.get('general.size_label', '?')})"),
        ("parameters", f"{params:,}" + (f" (+ {mtp_params:,} in the MTP head)" if mtp_params else "")),
        ("layers", f"{n_layers}: {layer_pattern(recurrent)}" if recurrent else str(n_layers)),
        ("MTP", f"{nextn} layer (block {n_layers})" if nextn else "none"),
    ]
    experts = meta.get(f"{arch}.expert_count")
    if experts:
        rows.append(("experts", f"{experts}, {meta.get(f'{arch}.expert_used_count')} used per token, + shared expert"))
    rows += [
        ("context", f"{meta.get(f'{arch}.context_length', 0):,}"),
        ("tokenizer", f"{meta.get('tokenizer.ggml.model', '?')} / {meta.get('tokenizer.ggml.pre', '?')}, {n_tokens:,} tokens"),
        ("chat template", "yes" if "tokenizer.chat_template" in meta else "no"),
        ("profile", meta.get("general.quantization.profile", "unknown (not made by qwen35)")),
    ]
    for i, (name, (count, nbytes)) in enumerate(sorted(by_type.items())):
        rows.append(("tensor types" if i == 0 else "", f"{name:<6} {count:5d} tensors  {nbytes / 1e6:12,.1f} MB"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
