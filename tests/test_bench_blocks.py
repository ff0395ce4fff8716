"""bench/results.py: each benchmark run replaces only its own marked block of BENCHMARKS.md, so two runs
of one script under different block names (bench_sparse.py --block) keep each other's results."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from results import markers, write_block  # noqa: E402


def _block(name: str, body: str) -> str:
    start, end = markers(name)
    return f"{start}\n{body}\n{end}"


def test_two_blocks_replace_only_their_own(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n## Sparse\n\nlead\n\n" + _block("a", "old a") + "\n\nbetween\n\n"
                    + _block("b", "old b") + "\n\ntail\n")
    write_block(path, "b", _block("b", "new b"))
    write_block(path, "a", _block("a", "new a\nrows"))
    expected = ("# Benchmarks\n\n## Sparse\n\nlead\n\n" + _block("a", "new a\nrows") + "\n\nbetween\n\n"
                + _block("b", "new b") + "\n\ntail\n")
    assert path.read_text() == expected


def test_a_missing_block_is_appended_after_its_heading(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n" + _block("a", "x") + "\n")
    write_block(path, "c", _block("c", "y"), "## C")
    assert path.read_text() == "# Benchmarks\n\n" + _block("a", "x") + "\n\n## C\n\n" + _block("c", "y") + "\n"


def test_the_stand_in_attention_is_the_rest_of_the_model():
    """bench/no_attention.py, the floors' and ceilings' stand-in: the model runs with it, its output
    has the attention's layout, and a training step's backward still reaches every projection (so
    the step's time is the rest of the model's, backward included)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from no_attention import register

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    model.set_attn_implementation(register())
    ids = torch.randint(0, 64, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        grad = getattr(model.model.layers[0].self_attn, name).weight.grad
        assert grad is not None, name
    # the queries' path carries the gradient; the keys' and values' is joined at zero weight
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert model.model.layers[0].self_attn.k_proj.weight.grad.abs().sum() == 0
    with torch.no_grad():  # under no_grad the stand-in is the query alone: no work on the keys
        logits = model(input_ids=ids).logits
    assert logits.shape == (2, 12, 64) and torch.isfinite(logits).all()
