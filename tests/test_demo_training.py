"""The demo trainer's model growth (demo/training/train.py `grow`, `--layers`): a saved model grown by
layers whose residual writers are zero computes exactly what it did, main model and MTP head alike.
Nothing is trained here (tests never train): the shipped weights, loaded twice."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from qwen35.demo.training import train  # noqa: E402

WEIGHTS = Path(train.__file__).resolve().parents[1] / "weights"


def test_a_grown_model_computes_what_the_saved_one_did():
    state, _ = train.load_resume(WEIGHTS, WEIGHTS)
    kept = state["kept"]
    saved = train.DemoModel(kept, 4)
    saved.load_state_dict(dict(state["model"]))
    grown = train.DemoModel(kept, 8)
    weights = dict(state["model"])
    assert train.grow(grown, weights) == 4
    grown.load_state_dict(weights)
    # The new layers are real layers (fresh weights), only their writes into the residual stream are zero.
    layers = grown.hf.model.language_model.layers
    assert layers[7].self_attn.o_proj.weight.abs().max() == 0 and layers[7].self_attn.q_proj.weight.abs().max() > 0
    assert layers[4].linear_attn.out_proj.weight.abs().max() == 0 and layers[4].mlp.down_proj.weight.abs().max() == 0
    assert grown.hf.config.text_config.layer_types == (["linear_attention"] * 3 + ["full_attention"]) * 2
    ids = torch.randint(0, len(kept), (2, 24), generator=torch.Generator().manual_seed(0))
    saved.eval(), grown.eval()
    with torch.no_grad():
        (h4, mtp4), (h8, mtp8) = saved(ids), grown(ids)
    assert torch.equal(h4, h8) and torch.equal(mtp4, mtp8)


def test_layers_come_in_fours():
    assert train.text_config(layers=8)["full_attention_interval"] == 4
    with pytest.raises(SystemExit, match="multiple of 4"):
        train.main(["--layers", "6", "--out", "/nonexistent/never-written"])


def test_a_resumed_last_pt_carries_the_record_of_its_runs(tmp_path):
    """A run resumed from a trainer's last.pt records the runs before it from the file itself (run 8,
    resumed from run 7's last.pt into a new weights directory, had lost them: added by hand)."""
    meta = {"command": "python -m demo.training.train ...", "steps": 9193, "cpu_seconds": 2963.0,
            "previous_runs": [{"command": "first", "cpu_seconds": 4222.1}]}
    torch.save({"model": {}, "step": 9193, "kept": [0, 1], "meta": meta}, tmp_path / "last.pt")
    state, manifest = train.load_resume(tmp_path / "last.pt", tmp_path / "elsewhere")
    assert manifest == meta and "meta" not in state and state["kept"] == [0, 1]
    torch.save({"model": {}, "step": 1, "kept": [0]}, tmp_path / "old.pt")  # saved before it carried them
    assert train.load_resume(tmp_path / "old.pt", tmp_path / "elsewhere")[1] is None


@pytest.mark.parametrize("part", ["vision", "text"])
def test_training_one_part_leaves_the_other_exactly_as_it_was(part):
    """`--train vision` / `--train text`: one optimizer step on a loss that reaches every weight moves
    that part's only (the vision tower; all but it) — weight decay included, which would move a frozen
    weight left in the optimizer."""
    state, _ = train.load_resume(WEIGHTS, WEIGHTS)
    model = train.DemoModel(state["kept"], 4)
    model.load_state_dict(dict(state["model"]))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    learning = train.learning_parameters(model, part)
    assert learning and all(n.startswith(train.VISION) == (part == "vision") for n, _ in learning)
    opt = train.optimizer(learning, 1e-2)
    loss = sum((p.float() ** 2).sum() for p in model.parameters() if p.requires_grad)
    loss = loss + sum(p.sum() * 0 for p in model.parameters())  # (frozen ones in the graph, no gradient)
    loss.backward()
    opt.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {n for n, _ in learning}
    assert any(n.startswith("mtp.") for n in moved) == (part == "text")
    with pytest.raises(ValueError, match="one of"):
        train.learning_parameters(model, "embeddings")


def test_training_the_vision_tower_needs_a_model_to_continue():
    with pytest.raises(SystemExit, match="--resume"):
        train.main(["--train", "vision", "--out", "/nonexistent/never-written"])
    with pytest.raises(SystemExit, match="/nonexistent/model does not exist"):
        train.main(["--resume", "/nonexistent/model", "--out", "/nonexistent/never-written"])


def test_the_evaluation_says_in_one_line_what_it_was_given_wrong():
    from qwen35.demo.training import evaluate

    with pytest.raises(SystemExit, match="unknown kind.*pictures"):
        evaluate.main(["/nonexistent.gguf", "--kinds", "image,pictures"])
    with pytest.raises(SystemExit, match="/nonexistent.gguf does not exist"):
        evaluate.main(["/nonexistent.gguf", "--kinds", "image"])
