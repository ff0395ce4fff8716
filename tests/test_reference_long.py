"""The shipped ``reference-long`` model: what its card says holds, re-measured here independently.

The card (scripts/reference_long_card.py) measures through attnkit's seam on the whole test split;
these tests re-measure slices of it with different code: attention maps from the model's own eager
``output_attentions`` (not the seam), window losses from an explicit additive mask passed to the
eager model, copy samples built here with their own generator.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from attnkit.common.loading.registry import load_model

MODEL_DIR = Path(__file__).resolve().parents[1] / "src" / "attnkit" / "models" / "reference_long"
CONTEXT = 1024


@pytest.fixture(scope="module")
def card() -> dict:
    return json.loads((MODEL_DIR / "eval_results.json").read_text())


@pytest.fixture(scope="module")
def eager():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(MODEL_DIR, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def test_ids(eager):
    from transformers import AutoTokenizer

    from attnkit.common.data import encode_documents, load_corpus

    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    return encode_documents(tokenizer, load_corpus("kjv").splits["test"]), tokenizer.eos_token_id


def blocks(test_ids, n: int, length: int = CONTEXT, offset: int = 0) -> torch.Tensor:
    ids, bos = test_ids
    body = length - 1
    rows = [torch.cat([torch.tensor([bos]), ids[s : s + body]]) for s in range(offset, offset + n * body, body)]
    return torch.stack(rows)


def nll(model, x: torch.Tensor, attention_mask=None) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=x, attention_mask=attention_mask).logits[:, :-1].float()
    return F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none").double()  # (B, T-1)


def window_mask(T: int, window: int, sinks: int) -> torch.Tensor:
    """(1, 1, T, T) additive mask: causal, the last ``window - sinks`` keys and the first ``sinks``."""
    q, k = torch.arange(T)[:, None], torch.arange(T)[None, :]
    keep = (k <= q) & ((q - k < window - sinks) | (k < sinks))
    return torch.where(keep, 0.0, torch.finfo(torch.float32).min)[None, None]


def test_it_is_a_llama_with_grouped_query_attention_trained_at_1024_tokens():
    loaded = load_model("reference-long")
    config = loaded.model.config
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert config.num_key_value_heads < config.num_attention_heads
    training = json.loads((MODEL_DIR / "training.json").read_text())
    assert training["config"]["context"] >= 1024
    assert config.max_position_embeddings >= 1024
    assert (MODEL_DIR / "model.safetensors").stat().st_size < 8_000_000  # the package stays small


def test_full_attention_beats_a_128_token_window(eager, test_ids, card):
    """8 test blocks, explicit masks on the eager model: far context lowers the loss."""
    x = blocks(test_ids, 8)
    full = nll(eager, x)
    windowed = nll(eager, x, window_mask(CONTEXT, 128, sinks=4).expand(x.size(0), 1, -1, -1))
    margin = float(windowed.mean() - full.mean())
    assert margin >= 0.05, margin
    # ... and the card's whole-split figure, through the seam, agrees with this slice's sign and size.
    assert card["window"]["margin_vs_sinks_sliding"] >= 0.1
    assert abs(margin - card["window"]["margin_vs_sinks_sliding"]) < 0.1
    # Positions past the window are where full attention gains.
    far = slice(511, None)
    assert float(windowed[:, far].mean() - full[:, far].mean()) > margin * 0.9


def copy_losses(eager, test_ids, *, kind: str, distance: tuple[int, int], L: int = 48, seed: int = 123, mask=None):
    """Mean NLL of the first and the second copy of passages written twice into held-out text."""
    g = torch.Generator().manual_seed(seed)
    x = blocks(test_ids, 6, offset=20_000)
    donors = blocks(test_ids, 6, offset=45_000)
    first = 100
    seconds = []
    for i in range(x.size(0)):
        s = int(torch.randint(0, CONTEXT - L, (), generator=g))
        passage = donors[i, s : s + L] if kind == "natural" else torch.randint(1, 1024, (L,), generator=g)
        second = first + int(torch.randint(distance[0], distance[1] + 1, (), generator=g))
        x[i, first : first + L] = passage
        x[i, second : second + L] = passage
        seconds.append(second)
    loss = nll(eager, x, None if mask is None else mask.expand(x.size(0), 1, -1, -1))
    first_copy = torch.stack([loss[i, first : first + L - 1] for i in range(x.size(0))]).mean()
    second_copy = torch.stack([loss[i, s : s + L - 1] for i, s in enumerate(seconds)]).mean()
    return float(first_copy), float(second_copy)


def test_random_passages_512_tokens_apart_are_copied_and_need_the_far_context(eager, test_ids):
    first, second = copy_losses(eager, test_ids, kind="random", distance=(512, 800))
    assert first - second >= 5.0, (first, second)
    # Without the far context (4 sinks + a 128 window) the second copy is as unpredictable as the first.
    _, second_windowed = copy_losses(eager, test_ids, kind="random", distance=(512, 800), mask=window_mask(CONTEXT, 128, 4))
    assert second_windowed - second >= 5.0


def test_natural_passages_are_copied_from_a_few_hundred_tokens_back(eager, test_ids):
    first, second = copy_losses(eager, test_ids, kind="natural", distance=(64, 256))
    assert first - second >= 1.0, (first, second)


def test_natural_passages_512_tokens_apart_gain_a_nat(eager, test_ids):
    first, second = copy_losses(eager, test_ids, kind="natural", distance=(512, 800))
    assert first - second >= 1.0, (first, second)


def test_the_heads_the_card_names_do_what_it_says_in_eager_attention(eager, test_ids, card):
    """The card's best sink and induction heads, re-scored from the model's own output_attentions."""
    best_sink = max(card["heads"], key=lambda h: h["sink"])
    best_induction = max(card["heads"], key=lambda h: h["induction"])
    x = blocks(test_ids, 2)  # the card's first two test blocks of 1024 (it scores four)
    with torch.no_grad():
        maps = eager(input_ids=x, output_attentions=True).attentions  # per layer (B, H, T, T)
    sink = float(maps[best_sink["layer"]][:, best_sink["head"], 2:, 0].mean())
    assert abs(sink - best_sink["sink"]) < 0.1, (sink, best_sink)
    # The card names no head a first-token sink (none gives the BOS half of its attention): true here too.
    assert all(float(p[:, :, 2:, 0].mean(dim=(0, 2)).max()) < 0.5 for p in maps)

    g = torch.Generator().manual_seed(7)
    bos = test_ids[1]
    r = torch.randint(0, 1024, (2, 200), generator=g)
    r[r == bos] = bos + 1
    ids = torch.cat([torch.full((2, 1), bos), r, r], dim=1)
    with torch.no_grad():
        maps = eager(input_ids=ids, output_attentions=True).attentions
    q = torch.arange(202, 401)  # second-copy tokens
    induction = float(maps[best_induction["layer"]][:, best_induction["head"], q, q - 199].mean())
    assert induction >= 0.3 and abs(induction - best_induction["induction"]) < 0.15


def test_training_windows_hold_what_the_card_says_is_mixed_in():
    """The training script's windows: BOS first, a repeated span per copy window, random first copies unscored."""
    import importlib.util
    import sys

    scripts = Path(__file__).resolve().parents[1] / "scripts"
    sys.path.insert(0, str(scripts))
    try:
        spec = importlib.util.spec_from_file_location("train_reference_long", scripts / "train_reference_long.py")
        script = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = script  # dataclasses look their module up there
        spec.loader.exec_module(script)
    finally:
        sys.path.remove(str(scripts))
        sys.modules.pop("train_reference_long", None)
    cfg = script.TrainConfig(batch_size=64, copy_share=1.0, copy_random_share=0.5, copy_spans=1, context=256, copy_min=8,
                             copy_max=32)
    stream = torch.arange(10_000) % 997 + 1  # no token 0 (the BOS), no repeats within a window
    x, labels = script.training_windows(stream, cfg, bos=0, vocab=1024, g=torch.Generator().manual_seed(0))
    assert x.shape == (64, 256) and bool((x[:, 0] == 0).all())
    random_first_copies = 0
    for row, lab in zip(x, labels):
        # a span of >= 8 tokens occurs twice in every window (the stream itself never repeats within 256 tokens)
        pairs = {(int(a), int(b)) for a, b in zip(row[1:-1], row[2:])}
        assert len(pairs) < 254 - 6
        ignored = (lab == script.IGNORE).nonzero().flatten()
        if ignored.numel():
            random_first_copies += 1
            assert cfg.copy_min <= ignored.numel() <= cfg.copy_max  # exactly the first copy is unscored
        kept = lab != script.IGNORE
        assert bool((lab[kept] == row[kept]).all())
    assert 16 <= random_first_copies <= 48  # about half the spans are random tokens


def test_attnkit_perplexity_reproduces_the_card_s_full_attention_figure(card, tmp_path, capsys):
    """The CLI (its own block builder, BOS from the tokenizer) against the card's script."""
    from attnkit.cli.main import main

    report = tmp_path / "ppl.json"
    code = main(["perplexity", "reference-long", "--block-size", "1024", "--max-blocks", str(card["blocks"]["test"]),
                 "--json", str(report)])
    assert code == 0, capsys.readouterr().err
    got = json.loads(report.read_text())
    assert got["tokens"] == card["window"]["full"]["tokens"]
    assert abs(got["nll"] - card["window"]["full"]["nll"]) < 1e-3


@pytest.mark.parametrize("name", ["reference-long", "reference"])
def test_validate_finds_the_induction_heads_the_cards_name_and_no_others(name, card):
    """validate's copying check on 4 x 128 test tokens: reference-long's card names L3H2 and L3H3
    induction heads (and L3H2 parks on the BOS when it has nothing to copy); reference's card none."""
    from attnkit.common.data import load_corpus
    from attnkit.validate import Options, validate

    loaded = load_model(name)
    report = validate(loaded.model, loaded.tokenizer, load_corpus("kjv").split("test"), name=name, kind=loaded.kind,
                      options=Options(seq_len=128, sequences=4, ablation_blocks=1))
    figures = report.section("tokens").figures
    found = {(h["layer"], h["head"]) for h in figures["induction_heads"]}
    if name == "reference":
        assert found == set()
        return
    named = {(h["layer"], h["head"]) for h in card["heads"] if h["induction"] >= 0.3}
    assert found == named == {(3, 2), (3, 3)}
    assert {(h["layer"], h["head"]) for h in figures["special_heads"]} == {(3, 2)}
