"""`qwen35 info`: what a GGUF file holds, read from its header alone."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFValueType

from .errors import ConvertError


def read_gguf(path) -> GGUFReader:
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"{path} does not exist")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ConvertError(f"{path} is not a GGUF file")
    try:
        return GGUFReader(path)
    except Exception as e:  # the reader raises assorted errors on a damaged file
        raise ConvertError(f"{path} is not a valid GGUF file ({type(e).__name__}: {e})") from None


def field_value(reader: GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    if field.types[0] == GGUFValueType.ARRAY:
        if field.types[-1] == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", "replace") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    if field.types[0] == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", "replace")
    return field.parts[field.data[0]].tolist()[0]


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
    reader = read_gguf(path)
    arch = field_value(reader, "general.architecture", "?")
    n_blocks = field_value(reader, f"{arch}.block_count", 0)
    nextn = field_value(reader, f"{arch}.nextn_predict_layers", 0)
    n_layers = n_blocks - nextn
    recurrent = [bool(x) for x in field_value(reader, f"{arch}.attention.recurrent_layers", [])][:n_layers]
    tokens = field_value(reader, "tokenizer.ggml.tokens", [])

    by_type: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    params = mtp_params = 0
    for t in reader.tensors:
        count = int(np.prod(t.shape))
        if t.name.startswith(f"blk.{n_layers}.") and nextn:
            mtp_params += count
        else:
            params += count
        entry = by_type[t.tensor_type.name]
        entry[0] += 1
        entry[1] += int(t.n_bytes)

    rows = [
        ("file", f"{path} ({Path(path).stat().st_size / 1e6:,.1f} MB)"),
        ("architecture", f"{arch}  ({field_value(reader, 'general.name', '?')}, {field_value(reader, 'general.size_label', '?')})"),
        ("parameters", f"{params:,}" + (f" (+ {mtp_params:,} in the MTP head)" if mtp_params else "")),
        ("layers", f"{n_layers}: {layer_pattern(recurrent)}" if recurrent else str(n_layers)),
        ("MTP", f"{nextn} layer (block {n_layers})" if nextn else "none"),
    ]
    experts = field_value(reader, f"{arch}.expert_count")
    if experts:
        rows.append(("experts", f"{experts}, {field_value(reader, f'{arch}.expert_used_count')} used per token, + shared expert"))
    rows += [
        ("context", f"{field_value(reader, f'{arch}.context_length', 0):,}"),
        ("tokenizer", f"{field_value(reader, 'tokenizer.ggml.model', '?')} / {field_value(reader, 'tokenizer.ggml.pre', '?')}, {len(tokens):,} tokens"),
        ("chat template", "yes" if "tokenizer.chat_template" in reader.fields else "no"),
    ]
    for i, (name, (count, nbytes)) in enumerate(sorted(by_type.items())):
        rows.append(("tensor types" if i == 0 else "", f"{name:<6} {count:5d} tensors  {nbytes / 1e6:12,.1f} MB"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
