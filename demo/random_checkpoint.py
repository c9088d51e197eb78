"""A tiny random-weight checkpoint with Qwen3.5's real structure and vocabulary: the fixture most tests
and benches convert and run (built in a second, no training). Its replies are noise; the demo model
that answers is the trained one (walkthrough.py, training/).
"""

from __future__ import annotations

from pathlib import Path

from ..convert.errors import ConvertError
from .synthetic import write_checkpoint

REFERENCE_CONFIG = "qwen3.5-0.8b.config.RECONSTRUCTED.json"


def demo_config() -> dict:
    """Qwen3.5-0.8B's config with the text model shrunk; vocabulary, layer pattern, MTP and rope kept."""
    layer_types = (["linear_attention"] * 3 + ["full_attention"]) * 2
    text = {
        "attention_bias": False, "attn_output_gate": True, "dtype": "bfloat16", "eos_token_id": 248044,
        "full_attention_interval": 4, "head_dim": 64, "hidden_act": "silu", "hidden_size": 128,
        "intermediate_size": 384, "layer_types": layer_types, "linear_conv_kernel_dim": 4,
        "linear_key_head_dim": 32, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
        "linear_value_head_dim": 32, "max_position_embeddings": 262144, "model_type": "qwen3_5_text",
        "mtp_num_hidden_layers": 1, "num_attention_heads": 4, "num_hidden_layers": len(layer_types),
        "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "tie_word_embeddings": True, "vocab_size": 248320,
        "rope_parameters": {"mrope_interleaved": True, "mrope_section": [11, 11, 10], "rope_type": "default",
                            "rope_theta": 10000000, "partial_rotary_factor": 0.25},
    }
    vision = {"depth": 1, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2, "in_channels": 3,
              "patch_size": 16, "temporal_patch_size": 2, "spatial_merge_size": 2, "out_hidden_size": 128,
              "num_position_embeddings": 64, "model_type": "qwen3_5", "hidden_act": "gelu_pytorch_tanh"}
    return {"architectures": ["Qwen3_5ForConditionalGeneration"], "model_type": "qwen3_5",
            "_name_or_path": "qwen35-demo", "text_config": text, "tie_word_embeddings": True,
            "vision_config": vision, "image_token_id": 248056, "video_token_id": 248057,
            "vision_start_token_id": 248053, "vision_end_token_id": 248054}


def build_demo_checkpoint(directory: Path) -> Path:
    from .real_vocab import QwenTokenizerMissing, write_chat_template, write_tokenizer_files

    ckpt = write_checkpoint(directory, demo_config())
    try:
        write_tokenizer_files(ckpt)
    except QwenTokenizerMissing as e:
        raise ConvertError(str(e)) from None
    write_chat_template(ckpt)
    (ckpt / "README.md").write_text("---\nlicense: apache-2.0\n---\nRandom-weight qwen35 demo checkpoint.\n")
    return ckpt
