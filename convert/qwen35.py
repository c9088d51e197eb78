"""The Qwen3.5 family (dense `qwen35`, MoE `qwen35moe`): hyper-parameters, renames, tensor plan.

Every fact here is read from llama.cpp's loader in the llama-cpp-python 0.3.36 sdist
(src/llama-model.cpp, src/models/qwen35.cpp and qwen35moe.cpp).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import numpy as np

from . import transforms as tf
from .checkpoint import Checkpoint
from .errors import ConvertError
from .plan import PlannedTensor, Source
from .profiles import ModelFacts

ARCHITECTURES = {
    "Qwen3_5ForConditionalGeneration": "qwen35",
    "Qwen3_5ForCausalLM": "qwen35",
    "Qwen3_5MoeForConditionalGeneration": "qwen35moe",
    "Qwen3_5MoeForCausalLM": "qwen35moe",
}

# The vision-language release nests the text model under model.language_model; a text-only
# *ForCausalLM checkpoint (transformers' Qwen3_5ForCausalLM) puts it directly under model.
TEXT_PREFIXES = ("model.language_model.", "model.")
MTP = "mtp."
# Left out on purpose: the text GGUF has no place for them (the vision tower goes in an mmproj file).
LEFT_OUT_PREFIXES = ("model.visual.",)

# Layouts a rule can ask for; each resolves to a transforms.py index function.
QKV_ROWS = "qkv_rows"  # [Q ‖ K ‖ V] rows (or conv channels): V heads reordered
V_ROWS = "v_rows"  # rows that are value heads of head_dim each
HEAD_ROWS = "head_rows"  # one row per value head
HEAD_COLUMNS = "head_columns"  # one element per value head (1-D parameters)
V_COLUMNS = "v_columns"  # input columns that are value heads of head_dim each


class Rule(NamedTuple):
    gguf: str
    values: Optional[Callable[[np.ndarray], np.ndarray]] = None
    layout: Optional[str] = None
    squeeze_axis: Optional[int] = None


# HF name (after the block prefix) → GGUF name (after `blk.N.`). A name matches exactly one rule,
# and a rule's value transform is applied exactly once per element: +1 cannot happen twice.
BLOCK_RULES = {
    "input_layernorm.weight": Rule("attn_norm.weight", tf.plus_one),
    "post_attention_layernorm.weight": Rule("post_attention_norm.weight", tf.plus_one),
}
FULL_ATTENTION_RULES = {
    # q_proj rows are per head [query ‖ gate]; llama.cpp splits them the same way: kept as is.
    "self_attn.q_proj.weight": Rule("attn_q.weight"),
    "self_attn.k_proj.weight": Rule("attn_k.weight"),
    "self_attn.v_proj.weight": Rule("attn_v.weight"),
    "self_attn.o_proj.weight": Rule("attn_output.weight"),
    "self_attn.q_norm.weight": Rule("attn_q_norm.weight", tf.plus_one),
    "self_attn.k_norm.weight": Rule("attn_k_norm.weight", tf.plus_one),
}
LINEAR_ATTENTION_RULES = {
    "linear_attn.in_proj_qkv.weight": Rule("attn_qkv.weight", layout=QKV_ROWS),
    "linear_attn.in_proj_z.weight": Rule("attn_gate.weight", layout=V_ROWS),
    "linear_attn.in_proj_b.weight": Rule("ssm_beta.weight", layout=HEAD_ROWS),
    "linear_attn.in_proj_a.weight": Rule("ssm_alpha.weight", layout=HEAD_ROWS),
    "linear_attn.conv1d.weight": Rule("ssm_conv1d.weight", layout=QKV_ROWS, squeeze_axis=1),
    "linear_attn.A_log": Rule("ssm_a", tf.neg_exp, layout=HEAD_COLUMNS),
    "linear_attn.dt_bias": Rule("ssm_dt.bias", layout=HEAD_COLUMNS),
    # A plain-weight gated RMSNorm applied per head: no +1, and shared by all heads, so no reorder.
    "linear_attn.norm.weight": Rule("ssm_norm.weight"),
    "linear_attn.out_proj.weight": Rule("ssm_out.weight", layout=V_COLUMNS),
}
DENSE_FFN_RULES = {
    "mlp.gate_proj.weight": Rule("ffn_gate.weight"),
    "mlp.up_proj.weight": Rule("ffn_up.weight"),
    "mlp.down_proj.weight": Rule("ffn_down.weight"),
}
MOE_FFN_RULES = {
    "mlp.gate.weight": Rule("ffn_gate_inp.weight"),
    "mlp.shared_expert.gate_proj.weight": Rule("ffn_gate_shexp.weight"),
    "mlp.shared_expert.up_proj.weight": Rule("ffn_up_shexp.weight"),
    "mlp.shared_expert.down_proj.weight": Rule("ffn_down_shexp.weight"),
    "mlp.shared_expert_gate.weight": Rule("ffn_gate_inp_shexp.weight", squeeze_axis=0),
}
MTP_RULES = {
    "fc.weight": Rule("nextn.eh_proj.weight"),
    "pre_fc_norm_embedding.weight": Rule("nextn.enorm.weight", tf.plus_one),
    "pre_fc_norm_hidden.weight": Rule("nextn.hnorm.weight", tf.plus_one),
    "norm.weight": Rule("nextn.shared_head_norm.weight", tf.plus_one),
}
GLOBAL_RULES = {
    "embed_tokens.weight": Rule("token_embd.weight"),  # under the text prefix
    "norm.weight": Rule("output_norm.weight", tf.plus_one),  # under the text prefix
    "lm_head.weight": Rule("output.weight"),
}
EXPERT_PARTS = {"gate_proj": "ffn_gate_exps.weight", "up_proj": "ffn_up_exps.weight", "down_proj": "ffn_down_exps.weight"}


@dataclass(frozen=True)
class Hparams:
    arch: str
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    rms_eps: float
    rope_theta: float
    rotary_dim: int
    rope_sections: tuple[int, int, int, int]
    layer_types: tuple[str, ...]
    full_attention_interval: int
    conv_kernel: int
    key_heads: int
    value_heads: int
    key_head_dim: int
    value_head_dim: int
    tied: bool
    mtp_layers: int  # in the config; what is written also depends on the tensors and --no-mtp
    ffn_length: int = 0  # dense
    n_experts: int = 0
    n_experts_used: int = 0
    expert_ffn_length: int = 0
    shared_expert_ffn_length: int = 0

    @property
    def is_moe(self) -> bool:
        return self.arch == "qwen35moe"

    @property
    def key_dim(self) -> int:
        return self.key_heads * self.key_head_dim

    @property
    def value_dim(self) -> int:
        return self.value_heads * self.value_head_dim


def architecture(config: dict) -> str:
    names = config.get("architectures") or []
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    supported = ", ".join(ARCHITECTURES)
    found = ", ".join(names) if names else "none"
    raise ConvertError(f"unsupported architecture {found}; qwen35 converts {supported}")


def read_hparams(config: dict) -> Hparams:
    """Hyper-parameters from the merged config; every value the loader needs comes from here."""
    arch = architecture(config)

    def need(key: str):
        if key not in config or config[key] is None:
            raise ConvertError(f"config.json lacks {key}, which a Qwen3.5 config must have")
        return config[key]

    rope = config.get("rope_parameters") or {}
    # Older configs keep rope keys at the top level of text_config.
    rope_theta = rope.get("rope_theta", config.get("rope_theta"))
    if rope_theta is None:
        raise ConvertError("config.json lacks rope_parameters.rope_theta")
    partial = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 0.25))
    sections = list(rope.get("mrope_section", config.get("mrope_section", [11, 11, 10])))
    if len(sections) > 4:
        raise ConvertError(f"mrope_section {sections} has more than 4 entries")
    sections += [0] * (4 - len(sections))

    n_layers = int(need("num_hidden_layers"))
    interval = int(config.get("full_attention_interval", 4))
    layer_types = config.get("layer_types")
    if layer_types is None:
        layer_types = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(n_layers)]
    if len(layer_types) != n_layers:
        raise ConvertError(f"layer_types has {len(layer_types)} entries but num_hidden_layers is {n_layers}")
    unknown = sorted(set(layer_types) - {"full_attention", "linear_attention"})
    if unknown:
        raise ConvertError(f"layer_types holds unknown kind {unknown[0]!r}")

    head_dim = int(config.get("head_dim") or need("hidden_size") // need("num_attention_heads"))
    hp = dict(
        arch=arch,
        n_layers=n_layers,
        hidden=int(need("hidden_size")),
        n_heads=int(need("num_attention_heads")),
        n_kv_heads=int(need("num_key_value_heads")),
        head_dim=head_dim,
        vocab_size=int(need("vocab_size")),
        context_length=int(need("max_position_embeddings")),
        rms_eps=float(need("rms_norm_eps")),
        rope_theta=float(rope_theta),
        rotary_dim=int(head_dim * partial),
        rope_sections=tuple(int(s) for s in sections),
        layer_types=tuple(layer_types),
        full_attention_interval=interval,
        conv_kernel=int(need("linear_conv_kernel_dim")),
        key_heads=int(need("linear_num_key_heads")),
        value_heads=int(need("linear_num_value_heads")),
        key_head_dim=int(need("linear_key_head_dim")),
        value_head_dim=int(need("linear_value_head_dim")),
        tied=bool(config.get("tie_word_embeddings", False)),
        mtp_layers=int(config.get("mtp_num_hidden_layers") or 0),
    )
    if arch == "qwen35moe":
        hp.update(
            n_experts=int(need("num_experts")),
            n_experts_used=int(need("num_experts_per_tok")),
            expert_ffn_length=int(need("moe_intermediate_size")),
            shared_expert_ffn_length=int(need("shared_expert_intermediate_size")),
        )
    else:
        hp.update(ffn_length=int(need("intermediate_size")))
    h = Hparams(**hp)
    if h.value_heads % h.key_heads:
        raise ConvertError(f"linear_num_value_heads {h.value_heads} is not a multiple of linear_num_key_heads {h.key_heads}")
    if h.key_head_dim != h.value_head_dim:
        # llama.cpp sizes both head kinds from ssm.state_size.
        raise ConvertError(f"llama.cpp needs linear_key_head_dim == linear_value_head_dim, got {h.key_head_dim} and {h.value_head_dim}")
    if h.mtp_layers > 1:
        raise ConvertError(f"mtp_num_hidden_layers is {h.mtp_layers}; llama.cpp runs at most one MTP layer")
    return h


def expected_shapes(h: Hparams) -> dict[str, tuple[int, ...]]:
    """Checkpoint shape of every block tensor (name after the block prefix), from the config."""
    H, conv = h.hidden, 2 * h.key_dim + h.value_dim
    shapes = {
        "input_layernorm.weight": (H,),
        "post_attention_layernorm.weight": (H,),
        "self_attn.q_proj.weight": (2 * h.n_heads * h.head_dim, H),
        "self_attn.k_proj.weight": (h.n_kv_heads * h.head_dim, H),
        "self_attn.v_proj.weight": (h.n_kv_heads * h.head_dim, H),
        "self_attn.o_proj.weight": (H, h.n_heads * h.head_dim),
        "self_attn.q_norm.weight": (h.head_dim,),
        "self_attn.k_norm.weight": (h.head_dim,),
        "linear_attn.in_proj_qkv.weight": (conv, H),
        "linear_attn.in_proj_z.weight": (h.value_dim, H),
        "linear_attn.in_proj_b.weight": (h.value_heads, H),
        "linear_attn.in_proj_a.weight": (h.value_heads, H),
        "linear_attn.conv1d.weight": (conv, 1, h.conv_kernel),
        "linear_attn.A_log": (h.value_heads,),
        "linear_attn.dt_bias": (h.value_heads,),
        "linear_attn.norm.weight": (h.value_head_dim,),
        "linear_attn.out_proj.weight": (H, h.value_dim),
        "mlp.gate_proj.weight": (h.ffn_length, H),
        "mlp.up_proj.weight": (h.ffn_length, H),
        "mlp.down_proj.weight": (H, h.ffn_length),
        "mlp.gate.weight": (h.n_experts, H),
        "mlp.shared_expert.gate_proj.weight": (h.shared_expert_ffn_length, H),
        "mlp.shared_expert.up_proj.weight": (h.shared_expert_ffn_length, H),
        "mlp.shared_expert.down_proj.weight": (H, h.shared_expert_ffn_length),
        "mlp.shared_expert_gate.weight": (1, H),
        "mlp.experts.gate_up_proj": (h.n_experts, 2 * h.expert_ffn_length, H),
        "mlp.experts.down_proj": (h.n_experts, H, h.expert_ffn_length),
        "mlp.experts.gate_proj.weight": (h.expert_ffn_length, H),
        "mlp.experts.up_proj.weight": (h.expert_ffn_length, H),
        "mlp.experts.down_proj.weight": (H, h.expert_ffn_length),
    }
    shapes.update({"mtp." + k: (H,) for k in ("pre_fc_norm_embedding.weight", "pre_fc_norm_hidden.weight", "norm.weight")})
    shapes["mtp.fc.weight"] = (H, 2 * H)
    return shapes


class _Planner:
    def __init__(self, ckpt: Checkpoint, h: Hparams):
        self.ckpt, self.h = ckpt, h
        self.shapes = expected_shapes(h)
        self.tensors: list[PlannedTensor] = []
        self.used: set[str] = set()
        value_order = tf.tiled_value_heads(h.key_heads, h.value_heads)
        self.reordered = h.key_heads != h.value_heads
        self.layout_index = {
            QKV_ROWS: tf.qkv_rows(h.key_dim, value_order, h.value_head_dim),
            V_ROWS: tf.expand_heads(value_order, h.value_head_dim),
            HEAD_ROWS: value_order,
            HEAD_COLUMNS: value_order,
            V_COLUMNS: tf.expand_heads(value_order, h.value_head_dim),
        }

    def source(self, name: str, shape_key: str | None, expected: tuple[int, ...] | None = None):
        if name not in self.ckpt:
            raise ConvertError(f"checkpoint lacks tensor {name}")
        info = self.ckpt[name]
        want = expected if expected is not None else self.shapes[shape_key]
        if info.shape != want:
            raise ConvertError(f"tensor {name} has shape {list(info.shape)} but config.json implies {list(want)}")
        self.used.add(name)
        return info

    def add(self, hf_name: str, rule: Rule, gguf_name: str, shape_key: str | None = None, expected=None):
        info = self.source(hf_name, shape_key, expected)
        shape = list(info.shape)
        if rule.squeeze_axis is not None:
            del shape[rule.squeeze_axis]
        rows, columns = np.arange(info.rows), None
        if rule.layout is not None and self.reordered:
            index = self.layout_index[rule.layout]
            if rule.layout in (HEAD_COLUMNS, V_COLUMNS):
                columns = index
            else:
                rows = index
        self.tensors.append(
            PlannedTensor(
                name=gguf_name,
                shape=tuple(shape),
                source_dtype=info.dtype,
                sources=(Source(hf_name, tuple(tf.runs(rows))),),
                values=rule.values,
                columns=columns,
            )
        )

    def add_rules(self, prefix: str, rules: dict[str, Rule], block: int, shape_prefix: str = ""):
        for suffix, rule in rules.items():
            self.add(prefix + suffix, rule, f"blk.{block}.{rule.gguf}", shape_prefix + suffix)

    def add_experts(self, prefix: str, block: int):
        h = self.h
        fused = prefix + "mlp.experts.gate_up_proj"
        if fused in self.ckpt:
            gate_up = self.source(fused, "mlp.experts.gate_up_proj")
            down = self.source(prefix + "mlp.experts.down_proj", "mlp.experts.down_proj")
            for part, part_name in enumerate(("gate_proj", "up_proj")):
                rows = tf.fused_expert_rows(h.n_experts, h.expert_ffn_length, part)
                self._add_stacked(block, part_name, gate_up.dtype, (Source(fused, tuple(tf.runs(rows))),))
            self._add_stacked(block, "down_proj", down.dtype, (Source(down.name, ((0, down.rows),)),))
            return
        for part_name in EXPERT_PARTS:
            sources, dtypes = [], set()
            for j in range(h.n_experts):
                info = self.source(f"{prefix}mlp.experts.{j}.{part_name}.weight", f"mlp.experts.{part_name}.weight")
                dtypes.add(info.dtype)
                sources.append(Source(info.name, ((0, info.rows),)))
            if len(dtypes) > 1:
                raise ConvertError(f"experts of {prefix}mlp.experts.*.{part_name} mix dtypes {sorted(dtypes)}")
            self._add_stacked(block, part_name, dtypes.pop(), tuple(sources))

    def _add_stacked(self, block: int, part_name: str, dtype: str, sources: tuple[Source, ...]):
        h = self.h
        per_expert = (h.hidden, h.expert_ffn_length) if part_name == "down_proj" else (h.expert_ffn_length, h.hidden)
        self.tensors.append(
            PlannedTensor(f"blk.{block}.{EXPERT_PARTS[part_name]}", (h.n_experts, *per_expert), dtype, sources)
        )

    def add_ffn(self, prefix: str, block: int):
        if self.h.is_moe:
            self.add_rules(prefix, MOE_FFN_RULES, block)
            self.add_experts(prefix, block)
        else:
            self.add_rules(prefix, DENSE_FFN_RULES, block)


def text_prefix(ckpt: Checkpoint) -> str:
    for prefix in TEXT_PREFIXES:
        if prefix + "embed_tokens.weight" in ckpt:
            return prefix
    raise ConvertError("checkpoint has no token embedding (model.language_model.embed_tokens.weight or model.embed_tokens.weight)")


def mtp_present(ckpt: Checkpoint, h: Hparams) -> bool:
    return h.mtp_layers > 0 and any(name.startswith(MTP) for name in ckpt.tensors)


def plan_tensors(ckpt: Checkpoint, h: Hparams, *, mtp: bool) -> list[PlannedTensor]:
    """The GGUF tensors in file order. Left out: the vision tower, MTP when dropped, and a tied
    checkpoint's copy of lm_head; any other tensor without a place is an error."""
    p = _Planner(ckpt, h)
    H, V = h.hidden, h.vocab_size
    text = text_prefix(ckpt)
    p.add(text + "embed_tokens.weight", GLOBAL_RULES["embed_tokens.weight"], "token_embd.weight", expected=(V, H))
    if not h.tied:
        if "lm_head.weight" not in ckpt:
            raise ConvertError("config.json says tie_word_embeddings is false, but the checkpoint has no lm_head.weight")
        p.add("lm_head.weight", GLOBAL_RULES["lm_head.weight"], "output.weight", expected=(V, H))
    p.add(text + "norm.weight", GLOBAL_RULES["norm.weight"], "output_norm.weight", expected=(H,))

    for i, kind in enumerate(h.layer_types):
        prefix = f"{text}layers.{i}."
        p.add_rules(prefix, BLOCK_RULES, i)
        p.add_rules(prefix, FULL_ATTENTION_RULES if kind == "full_attention" else LINEAR_ATTENTION_RULES, i)
        p.add_ffn(prefix, i)

    write_mtp = mtp and mtp_present(ckpt, h)
    if write_mtp:
        block = h.n_layers
        prefix = MTP + "layers.0."
        p.add_rules(prefix, BLOCK_RULES, block)
        p.add_rules(prefix, FULL_ATTENTION_RULES, block)
        p.add_ffn(prefix, block)
        p.add_rules(MTP, MTP_RULES, block, shape_prefix=MTP)

    left_out = [name for name in ckpt.tensors if name not in p.used]
    unexpected = [n for n in left_out if (n.startswith(text) and not n.startswith(LEFT_OUT_PREFIXES))
                  or (write_mtp and n.startswith(MTP))]
    if unexpected:
        raise ConvertError(f"checkpoint tensor {unexpected[0]} has no place in a {h.arch} GGUF ({len(unexpected)} such tensors)")
    return p.tensors


def blocks_written(tensors: list[PlannedTensor], h: Hparams) -> tuple[int, int]:
    """(block_count, nextn_predict_layers) as the written tensors have them."""
    mtp = any(t.name.startswith(f"blk.{h.n_layers}.") for t in tensors)
    return h.n_layers + int(mtp), int(mtp)


def model_facts(h: Hparams, tensors: list[PlannedTensor], *, imatrix: bool = False) -> ModelFacts:
    """What quantization profiles may condition on, for these planned tensors."""
    block_count, _ = blocks_written(tensors, h)
    return ModelFacts(block_count, h.layer_types, h.n_heads // h.n_kv_heads, h.n_experts, h.tied,
                      tuple(t.name for t in tensors), imatrix=imatrix)


def metadata(h: Hparams, tensors: list[PlannedTensor]) -> list[tuple[str, str, object]]:
    """(key, type, value) of every architecture key the loader reads; types as it checks them."""
    a = h.arch
    block_count, nextn = blocks_written(tensors, h)
    kv = [
        ("general.architecture", "string", a),
        (f"{a}.context_length", "u32", h.context_length),
        (f"{a}.embedding_length", "u32", h.hidden),
        (f"{a}.block_count", "u32", block_count),
        (f"{a}.nextn_predict_layers", "u32", nextn),
        (f"{a}.attention.head_count", "u32", h.n_heads),
        (f"{a}.attention.head_count_kv", "u32", h.n_kv_heads),
        # Must be written: llama.cpp's default n_embd / n_head is wrong for Qwen3.5.
        (f"{a}.attention.key_length", "u32", h.head_dim),
        (f"{a}.attention.value_length", "u32", h.head_dim),
        (f"{a}.attention.layer_norm_rms_epsilon", "f32", h.rms_eps),
        (f"{a}.rope.dimension_count", "u32", h.rotary_dim),
        (f"{a}.rope.dimension_sections", "i32[]", list(h.rope_sections)),
        (f"{a}.rope.freq_base", "f32", h.rope_theta),
        (f"{a}.ssm.conv_kernel", "u32", h.conv_kernel),
        (f"{a}.ssm.state_size", "u32", h.key_head_dim),
        (f"{a}.ssm.group_count", "u32", h.key_heads),
        (f"{a}.ssm.time_step_rank", "u32", h.value_heads),
        (f"{a}.ssm.inner_size", "u32", h.value_dim),
        (f"{a}.full_attention_interval", "u32", h.full_attention_interval),
        # Written from layer_types rather than derived from the interval; MTP blocks are not recurrent.
        (f"{a}.attention.recurrent_layers", "bool[]",
         [t == "linear_attention" for t in h.layer_types] + [False] * nextn),
    ]
    if h.is_moe:
        kv += [
            (f"{a}.expert_count", "u32", h.n_experts),
            (f"{a}.expert_used_count", "u32", h.n_experts_used),
            (f"{a}.expert_feed_forward_length", "u32", h.expert_ffn_length),
            (f"{a}.expert_shared_feed_forward_length", "u32", h.shared_expert_ffn_length),
        ]
    else:
        kv.append((f"{a}.feed_forward_length", "u32", h.ffn_length))
    return kv


def parameter_counts(tensors: list[PlannedTensor], h: Hparams) -> tuple[int, int]:
    """(total, active per token) parameters of the main model, MTP block excluded."""
    mtp_prefix = f"blk.{h.n_layers}."
    total = active = 0
    for t in tensors:
        if t.name.startswith(mtp_prefix):
            continue
        total += t.n_elements
        if "_exps." in t.name:
            active += t.n_elements * h.n_experts_used // h.n_experts
        else:
            active += t.n_elements
    return total, active


def size_label(tensors: list[PlannedTensor], h: Hparams) -> str:
    """Qwen's naming: `0.8B`, `9B`, `35B-A3B`."""
    total, active = parameter_counts(tensors, h)

    def billions(n: int) -> str:
        b = n / 1e9
        if b >= 1:
            return f"{round(b)}B"
        return f"{b:.1f}B" if b >= 0.1 else f"{round(n / 1e6)}M"

    return f"{billions(total)}-A{billions(active)}" if h.is_moe else billions(total)
