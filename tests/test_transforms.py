"""Each transform on a few hand-made numbers."""

import numpy as np
import pytest

from qwen35.convert import transforms as tf
from qwen35.convert.encode import bf16_bits


def test_neg_exp_turns_a_log_into_the_decay_rate_in_float32():
    a_log = np.array([0.0, np.log(2.0), np.log(0.5)], dtype=np.float32)
    out = tf.neg_exp(a_log)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [-1.0, -2.0, -0.5], rtol=1e-7)


def test_plus_one_shifts_norm_offsets_to_plain_weights():
    np.testing.assert_array_equal(tf.plus_one(np.array([-1.0, 0.0, 0.25], np.float32)), [0.0, 1.0, 1.25])


def test_tiled_value_heads_moves_grouped_heads_to_tiled_order():
    # 2 key heads, 4 value heads: HF groups [k0: v0 v1 | k1: v2 v3]; ggml wants [v0 v2 v1 v3].
    np.testing.assert_array_equal(tf.tiled_value_heads(2, 4), [0, 2, 1, 3])


def test_tiled_value_heads_handles_any_ratio():
    # ratio 3: new position j*Lk + k holds old head k*3 + j.
    np.testing.assert_array_equal(tf.tiled_value_heads(2, 6), [0, 3, 1, 4, 2, 5])
    np.testing.assert_array_equal(tf.tiled_value_heads(1, 3), [0, 1, 2])


def test_tiled_value_heads_is_identity_when_key_and_value_heads_match():
    np.testing.assert_array_equal(tf.tiled_value_heads(4, 4), [0, 1, 2, 3])


def test_tiled_value_heads_rejects_a_ratio_that_does_not_divide():
    with pytest.raises(ValueError):
        tf.tiled_value_heads(2, 5)


def test_expand_heads_moves_whole_head_blocks():
    np.testing.assert_array_equal(tf.expand_heads(np.array([1, 0]), 3), [3, 4, 5, 0, 1, 2])


def test_qkv_rows_reorders_only_the_v_part():
    # key_dim 2 → Q rows 0-1, K rows 2-3; V: 4 heads of dim 1 at rows 4-7.
    order = tf.qkv_rows(2, tf.tiled_value_heads(2, 4), 1)
    np.testing.assert_array_equal(order, [0, 1, 2, 3, 4, 6, 5, 7])


def test_v_head_reorder_applied_to_a_weight_matches_the_contract_formula():
    lk, lv, d = 2, 6, 2
    r = lv // lk
    w = np.arange(lv * d)[:, None] * 10 + np.arange(3)  # rows tagged by their index
    out = w[tf.expand_heads(tf.tiled_value_heads(lk, lv), d)]
    for k in range(lk):
        for j in range(r):
            np.testing.assert_array_equal(out[(j * lk + k) * d:(j * lk + k + 1) * d], w[(k * r + j) * d:(k * r + j + 1) * d])


def test_fused_expert_rows_split_gate_and_up_of_every_expert():
    # 2 experts, ffn length 2: gate_up rows [e0 g g u u | e1 g g u u]
    np.testing.assert_array_equal(tf.fused_expert_rows(2, 2, 0), [0, 1, 4, 5])
    np.testing.assert_array_equal(tf.fused_expert_rows(2, 2, 1), [2, 3, 6, 7])


def test_runs_merges_consecutive_indices():
    assert tf.runs(np.array([0, 1, 2, 5, 6, 3])) == [(0, 3), (5, 7), (3, 4)]
    assert tf.runs(np.arange(0)) == []


def test_bf16_bits_rounds_to_nearest_even():
    x = np.array([1.0, 1.00390625, 1.01171875, -2.5, np.inf, np.nan], dtype=np.float32)
    # 1 + 2^-8 is halfway between 1.0 and 1.0078125: ties to even (1.0); 1 + 3·2^-8 ties up to 1.015625.
    np.testing.assert_array_equal(bf16_bits(x), [0x3F80, 0x3F80, 0x3F82, 0xC020, 0x7F80, 0x7FC0])


def test_temporal_slice_rows_splits_a_conv3d_patch_weight_into_its_two_frames():
    # A [out 1, in 2, kt 2, 2, 2] weight holding 0..15: element [o, i, t, y, x] = 8i + 4t + 2y + x.
    # Seen as rows of 2 (x), row r = 4i + 2t + y. Frame 0 is rows 0, 1 (i=0) and 4, 5 (i=1).
    weight = np.arange(16, dtype=np.float32)
    rows = weight.reshape(-1, 2)
    frame0, frame1 = (tf.temporal_slice_rows((1, 2, 2, 2, 2), t) for t in (0, 1))
    np.testing.assert_array_equal(frame0, [0, 1, 4, 5])
    np.testing.assert_array_equal(frame1, [2, 3, 6, 7])
    # As values: [o, i, y, x] of frame 1 = 8i + 4 + 2y + x.
    np.testing.assert_array_equal(rows[frame1].reshape(1, 2, 2, 2),
                                  [[[[4, 5], [6, 7]], [[12, 13], [14, 15]]]])
    with pytest.raises(ValueError):
        tf.temporal_slice_rows((1, 2, 2, 2, 2), 2)
