"""`qwen35 info`: what a GGUF file holds, read from its header alone."""

from __future__ import annotations

from collections import defaultdict

from .errors import ConvertError
from ..gguf_header import GGUFFormatError, GGUFHeader, read_header


def read_gguf(path) -> GGUFHeader:
    try:
        return read_header(path)
    except GGUFFormatError as e:
        raise ConvertError(str(e)) from None


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


def _tensor_type_rows(header: GGUFHeader) -> list[tuple[str, str]]:
    by_type: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for t in header.tensors:
        entry = by_type[t.ggml_type.name]
        entry[0] += 1
        entry[1] += t.nbytes
    return [("tensor types" if i == 0 else "", f"{name:<6} {count:5d} tensors  {nbytes / 1e6:12,.1f} MB")
            for i, (name, (count, nbytes)) in enumerate(sorted(by_type.items()))]


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def describe_mmproj(header: GGUFHeader) -> str:
    """An mmproj (llama.cpp's `clip` file): the vision tower a text GGUF needs to see images."""
    meta = header.metadata

    def v(key, default="?"):
        return meta.get(f"clip.vision.{key}", default)

    n_pos = next((t.shape[0] for t in header.tensors if t.name == "v.position_embd.weight"), 0)
    grid = int(n_pos ** 0.5)
    rows = [
        ("file", f"{header.path} ({header.file_size / 1e6:,.1f} MB)"),
        ("kind", f"mmproj for {meta.get('general.name', '?')}: a vision tower, run by llama.cpp's mtmd"),
        ("projector", str(meta.get("clip.projector_type", "?"))),
        ("parameters", f"{sum(t.n_elements for t in header.tensors):,}"),
        ("vision tower", f"{v('block_count')} block{'' if v('block_count') == 1 else 's'}, width {v('embedding_length')}, {v('attention.head_count')} heads, "
                         f"FFN {v('feed_forward_length')}"),
        ("patches", f"{v('patch_size')}×{v('patch_size')} pixels, merged {v('spatial_merge_size')}×{v('spatial_merge_size')} "
                    f"per image token; position grid {grid}×{grid}"),
        ("output width", f"{v('projection_dim')} (must equal the text model's embedding_length)"),
        ("image mean/std", f"{[round(x, 4) for x in v('image_mean', [])]} / {[round(x, 4) for x in v('image_std', [])]}"),
    ]
    return _table(rows + _tensor_type_rows(header))


def describe(path) -> str:
    header = read_gguf(path)
    meta = header.metadata
    if meta.get("general.type") == "mmproj" or meta.get("general.architecture") == "clip":
        return describe_mmproj(header)
    arch = meta.get("general.architecture", "?")
    n_blocks = meta.get(f"{arch}.block_count", 0)
    nextn = meta.get(f"{arch}.nextn_predict_layers", 0)
    n_layers = n_blocks - nextn
    recurrent = [bool(x) for x in meta.get(f"{arch}.attention.recurrent_layers", [])][:n_layers]
    n_tokens = header.array_length("tokenizer.ggml.tokens")

    params = mtp_params = 0
    for t in header.tensors:
        if nextn and t.name.startswith(f"blk.{n_layers}."):
            mtp_params += t.n_elements
        else:
            params += t.n_elements

    rows = [
        ("file", f"{header.path} ({header.file_size / 1e6:,.1f} MB)"),
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
    return _table(rows + _tensor_type_rows(header))
