"""`qwen35 list`: what the store holds, read from each GGUF's header, and what a chat with it needs
here — the runtime's memory estimate for this machine, as `qwen35 run` would check it at load."""

from __future__ import annotations

from ..runtime.engine.errors import ChatError
from ..runtime.engine.modelfile import read_model_file
from .fit import GIB, Machine, context_label, needed
from .names import short_name_of
from .store import entries, models_dir


def table(n_ctx: int, machine: Machine | None = None) -> str:
    found = entries()
    if not found:
        return f"the model store ({models_dir()}) is empty: `qwen35 pull qwen3.5:0.8b` puts a model there"
    machine = machine or Machine.this()
    rows = [("NAME", "PROFILE", "SIZE", "CONTEXT", "VISION", "MTP", f"MEMORY AT {context_label(n_ctx)}")]
    for entry in found:
        name = short_name_of(entry.repo) or entry.repo
        try:
            mf = read_model_file(entry.model)
            mmproj = read_model_file(entry.mmproj) if entry.mmproj else None
        except ChatError as e:
            rows.append((name, entry.profile, "?", "?", "?", "?", f"damaged: {e}"))
            continue
        need = needed(mf, mmproj, n_ctx, machine)
        fits = "" if need <= machine.available else " (does not fit now)"
        rows.append((name, entry.profile, f"{entry.size() / 1e9:.2f} GB", f"{mf.arch_key('context_length', 0):,}",
                     "yes" if mmproj else "no", "yes" if mf.arch_key("nextn_predict_layers", 0) else "no",
                     f"{need / GIB:.1f} GiB{fits}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
