"""Images are exact: llama.cpp's image embeddings from our F32 mmproj, and the logits of a prompt
holding the image, against transformers' float32 forward (tests/vision_fixture.py), for the dense and the MoE
checkpoint (Qwen3_5ForConditionalGeneration, Qwen3_5MoeForConditionalGeneration).

The model and mmproj load through the runtime (native.Model, runtime.vision.Projector), the way a
chat loads them. Against transformers the comparison always runs; the logits floor is measured,
not assumed, where llama.cpp's reference converter is available: the same run with its mmproj of
the same checkpoint (llama.cpp's merger GELU is tanh where transformers' is erf, and its CPU GELU
reads an fp16 table, so neither file reaches the text model's 1e-12).
"""

import numpy as np
import pytest

from tests.test_mmproj import reference_mmproj
from tests.test_parity import kl_and_top1
from tests.vision_fixture import N_IMAGE_TOKENS

pytest.importorskip("llama_cpp")
pytest.importorskip("torch")
pytest.importorskip("transformers")

from qwen35.runtime.engine import native  # noqa: E402
from qwen35.runtime.engine.vision import Projector  # noqa: E402

# Measured on x86-64 (dense, MoE): 1 - cosine 5.4e-7 per image token, prompt KL 2.3e-7 and 5.1e-7.
# The bars leave ~10x of that, no more: clip.cpp's gelu_quick in place of the tower's GELU (an mmproj
# without clip.use_gelu) gives 1 - cosine 3.9e-5 and KL 2.4e-5; an image advancing the position by
# its cells (12) instead of M-RoPE's max(nx, ny) (4) gives KL 4.6e-4 and 9.9e-4, and leaves the
# embeddings alone.
MIN_COSINE = 1 - 1e-5
MAX_KL = 5e-6


@pytest.fixture(scope="module", params=["dense", "moe"])
def fixture(request):
    """The dense and the MoE vision-language checkpoints."""
    return request.getfixturevalue("vision_fixture" if request.param == "dense" else "moe_vision_fixture")


@pytest.fixture(scope="module")
def converted(fixture, tmp_path_factory):
    from qwen35.convert.pipeline import Conversion

    out = tmp_path_factory.mktemp("vision")
    text, mmproj = Conversion(fixture.checkpoint, ["f32"], out / "", mmproj="f32").run()
    return text.path, mmproj.path


class Run:
    """The text model and one mmproj, loaded as a chat loads them."""

    def __init__(self, model_path, mmproj_path):
        native.init()
        self.model = native.Model(str(model_path))
        self.n_embd = native.L.llama_model_n_embd(self.model.ptr)
        self.projector = Projector(mmproj_path, self.model, self.n_embd, threads=2)
        self.ctx = native.Context(self.model, 256, 2, n_batch=64, exact=True)

    def logits(self) -> np.ndarray:
        return self.ctx.logits(-1)

    def close(self):
        self.ctx.close()
        self.projector.close()
        self.model.close()


def image_chunks(run, fixture):
    image = run.projector.image(fixture.image)
    chunks = run.projector.tokenize(run.projector.marker, [image])
    image.close()
    return chunks


def test_image_embeddings_match_transformers(fixture, converted):
    run = Run(*converted)
    try:
        chunks = image_chunks(run, fixture)
        (image,) = [c for c in chunks.items if c.is_image]
        assert (image.n_tokens, image.n_pos) == (N_IMAGE_TOKENS, 4)  # 4×3 merged patches, M-RoPE: max(4, 3)
        ours = run.projector.encode(image)
        chunks.close()
    finally:
        run.close()
    theirs = fixture.reference_embeddings
    assert ours.shape == theirs.shape
    cosine = (ours * theirs).sum(-1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(theirs, axis=-1)
    assert cosine.min() >= MIN_COSINE, cosine


def prompt_logits(fixture, model_path, mmproj_path) -> tuple[np.ndarray, list[int]]:
    """llama.cpp's logits at every text position of the prompt, and those positions' indices in
    transformers' sequence."""
    p = fixture.prompt
    run = Run(model_path, mmproj_path)
    try:
        rows, index = [], []
        pos = hf = 0  # llama.cpp's position; the index in transformers' sequence

        def text(tokens):
            nonlocal pos, hf
            for t in tokens:
                run.ctx.decode([t], pos)
                rows.append(run.logits())
                index.append(hf)
                pos, hf = pos + 1, hf + 1

        text(p["before"])
        chunks = image_chunks(run, fixture)
        kinds = [("image" if c.is_image else list(c.tokens)) for c in chunks.items]
        assert kinds == [[p["vision_start"]], "image", [p["vision_end"]]], kinds
        text([p["vision_start"]])
        # An image batch yields no logits (mtmd decodes embeddings); M-RoPE advances 4 positions, 12 cells.
        pos = run.projector.eval(run.ctx, chunks.items[1], pos, logits_last=False)
        hf += N_IMAGE_TOKENS
        text([p["vision_end"]] + p["after"])
        chunks.close()
    finally:
        run.close()
    return np.stack(rows), index


@pytest.fixture(scope="module")
def ours(fixture, converted):
    """(logits at the prompt's text positions with our mmproj, their indices in transformers' sequence)."""
    return prompt_logits(fixture, *converted)


def test_prompt_with_an_image_matches_transformers(fixture, ours):
    """Ours against transformers alone: needs no reference converter, so it always runs."""
    logits, index = ours
    kl, top1 = kl_and_top1(fixture.reference_logits[index], logits)
    print(f"mean KL {kl:.3g}, top-1 {top1:.3f}")
    assert kl < MAX_KL and top1 == 1.0


def test_prompt_with_an_image_is_at_the_reference_converters_floor(fixture, converted, ours, tmp_path):
    """The floor, where llama.cpp's reference converter is available (it skips without): the same
    prompt with the reference's mmproj of the same checkpoint is no closer to transformers."""
    floor_mmproj = reference_mmproj(fixture.checkpoint, "f32", tmp_path / "reference-mmproj.gguf")
    logits, index = ours
    reference = fixture.reference_logits[index]
    kl, top1 = kl_and_top1(reference, logits)
    floor, floor_top1 = kl_and_top1(reference, prompt_logits(fixture, converted[0], floor_mmproj)[0])
    print(f"mean KL {kl:.3g} (reference converter's mmproj: {floor:.3g}), top-1 {top1:.3f} ({floor_top1:.3f})")
    assert kl <= floor * 1.01 + 1e-12
    assert top1 >= floor_top1
