"""Measure a trained reference model and write its model card (README.md) and eval_results.json.

Called by ``train_reference.py`` after training; on its own:

    python scripts/reference_card.py [DIR]                         # re-measure DIR (default: the shipped model)
    python scripts/reference_card.py [DIR] --reproduction RUN_DIR  # also record a second training run's test perplexity

Every number in the card comes from a measurement made here or from training.json.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DIR = REPO / "src" / "attnkit" / "models" / "reference"
MAX_EVAL_BLOCK_SIZE = 256  # blocks are the model's context, up to this
EVAL_BATCH_SIZE = 8
SLICE_BLOCKS = 4  # the slice the test-suite re-evaluates through the CLI
HEAD_TEXT_BLOCKS = 8  # test blocks of natural text for previous-token and sink scores
# A head "has" a role when its score clears these; chance levels on 128-256-token text are ~0.01-0.04.
ROLE_THRESHOLDS = {"previous_token": 0.4, "induction": 0.3, "sink": 0.5}
ROLE_NAMES = {"previous_token": "previous-token", "induction": "induction", "sink": "first-token sink"}


def repeat_length(block_size: int) -> int:
    """Length of the random sequence the induction score repeats: [first] + r + r must fit the context."""
    return min(64, (block_size - 1) // 2)


def measure(model_dir: Path) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from attnkit.analyze.heads import measure_head_roles
    from attnkit.common.data import encode_documents, load_corpus, split_blocks
    from attnkit.common.data.bible import load_chapters
    from attnkit.perplexity import evaluate_perplexity, unigram_perplexity

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    block_size = min(MAX_EVAL_BLOCK_SIZE, model.config.n_positions)
    corpus = load_corpus("kjv")
    chapters = load_chapters()

    splits = {}
    ids = {}
    for name, docs in corpus.splits.items():
        ids[name] = encode_documents(tokenizer, docs)
        splits[name] = {
            "chapters": sum(1 for c in chapters if c.split == name),
            "verses": sum(len(c.verses) for c in chapters if c.split == name),
            "words": sum(len(d.split()) for d in docs),
            "characters": sum(len(d) for d in docs),
            "tokens": int(ids[name].numel()),
        }
        splits[name]["tokens_per_word"] = round(splits[name]["tokens"] / splits[name]["words"], 3)
    # Share of test-split word occurrences that are a single token (with GPT-2's leading space).
    words = [w for d in corpus.splits["test"] for w in d.split()]
    single = {w: len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1 for w in set(words)}
    splits["test"]["single_token_word_share"] = round(sum(single[w] for w in words) / len(words), 3)

    results: dict = {"splits": splits, "block_size": block_size, "perplexity": {}, "unigram_perplexity": {}}
    t0 = time.time()
    for name in ("validation", "test"):
        blocks = split_blocks(ids[name], block_size)
        results["perplexity"][name] = evaluate_perplexity(model, blocks, EVAL_BATCH_SIZE).to_dict()
        results["unigram_perplexity"][name] = unigram_perplexity(ids["train"], blocks, len(tokenizer)).to_dict()
    test_blocks = split_blocks(ids["test"], block_size)
    results["perplexity"][f"test_first_{SLICE_BLOCKS}_blocks"] = evaluate_perplexity(
        model, test_blocks[:SLICE_BLOCKS], EVAL_BATCH_SIZE
    ).to_dict()
    results["unigram_perplexity"][f"test_first_{SLICE_BLOCKS}_blocks"] = unigram_perplexity(
        ids["train"], test_blocks[:SLICE_BLOCKS], len(tokenizer)
    ).to_dict()
    results["eval_seconds"] = round(time.time() - t0, 1)

    eot = tokenizer.eos_token_id
    roles = measure_head_roles(model, torch.stack(test_blocks[:HEAD_TEXT_BLOCKS]), len(tokenizer), exclude={eot},
                               repeat_length=repeat_length(block_size), seed=0)
    results["heads"] = roles.to_dict()

    prompt = "And God said"
    g = model.generate(**tokenizer(prompt, return_tensors="pt"), max_new_tokens=40, do_sample=False, pad_token_id=eot)
    results["sample"] = {"prompt": prompt, "greedy": tokenizer.decode(g[0])}
    return results


def _fmt(x: float) -> str:
    return f"{x:.2f}"


def _role_of(h: dict) -> str:
    over = [(h[r] / ROLE_THRESHOLDS[r], r) for r in ROLE_THRESHOLDS if h[r] >= ROLE_THRESHOLDS[r]]
    return ROLE_NAMES[max(over)[1]] if over else "-"


def render_card(results: dict, training: dict) -> str:
    cfg = training["config"]
    s, ppl, uni = results["splits"], results["perplexity"], results["unigram_perplexity"]
    heads = results["heads"]
    best = heads["best"]
    n_layer, n_head = cfg["n_layer"], cfg["n_head"]
    val_log = [e for e in training["log"] if "val_loss" in e]
    slice_key = f"test_first_{SLICE_BLOCKS}_blocks"
    ratio = uni["test"]["perplexity"] / ppl["test"]["perplexity"]
    d, V, T = cfg["n_embd"], cfg["vocab_size"], cfg["block_size"]
    body = n_layer * (12 * d * d + T * d)  # matmul multiply-adds a token: projections + MLP + attention (mean context T/2, QK and AV)
    head_share = V * d / (V * d + body)
    gpt2_share = 50257 * d / (50257 * d + body)

    lines = [
        "---",
        "language: en",
        "license: mit",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [gpt2, attnkit, kjv]",
        "---",
        "",
        "# attnkit reference model: GPT-2 on the King James Bible",
        "",
        "A small GPT-2 (`GPT2LMHeadModel`) trained from scratch on CPU by `scripts/train_reference.py`, "
        "shipped with attnkit as the built-in model `reference` so that attention analysis has a real "
        "trained model with real heads on a machine with no model hub. Every number below was measured "
        "by `scripts/reference_card.py`; the raw numbers are in `eval_results.json` and `training.json`.",
        "",
        "## Model",
        "",
        f"- GPT-2 architecture: {n_layer} layers, {n_head} heads of {cfg['n_embd'] // n_head} dims, "
        f"width {cfg['n_embd']}, context {cfg['block_size']} tokens, tied input/output embeddings; "
        f"{training['parameters']:,} parameters, float32 safetensors.",
        f"- Tokenizer: byte-level BPE (GPT-2's scheme, no unknown tokens) with {cfg['vocab_size']:,} symbols, "
        "trained on the train split only; `<|endoftext|>` separates chapters. Why "
        f"{cfg['vocab_size']:,}: with width {cfg['n_embd']} the output layer costs "
        f"{V * d / 1e6:.1f}M multiply-adds a token, {head_share:.0%} of the model's "
        f"(GPT-2's 50,257 would be {gpt2_share:.0%} and make CPU training several times slower), while KJV text "
        f"still averages {s['test']['tokens_per_word']} tokens a word on the test split and "
        f"{s['test']['single_token_word_share']:.0%} of its words are a single token.",
        "",
        "## Corpus and split",
        "",
        "The King James Bible: the text of Debian's `bible-kjv-text` 4.38 (`bible -f gen1:1-rev22:21`), shipped "
        "with attnkit as `src/attnkit/common/data/kjv.txt.xz` (verse references removed, one verse a line; public domain "
        "text). Split by whole chapters in canonical order: chapter "
        "*k* (0-based) goes to validation when *k* mod 20 = 9, to test when *k* mod 20 = 19, to train otherwise, "
        "so every split samples every part of the book and no held-out chapter is seen in training. "
        "(Parallel passages, e.g. Kings/Chronicles or the gospels, do repeat across chapters; that is a "
        "property of the text, not a leak.)",
        "",
        "| split | chapters | verses | words | tokens |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in ("train", "validation", "test"):
        d = s[name]
        lines.append(f"| {name} | {d['chapters']:,} | {d['verses']:,} | {d['words']:,} | {d['tokens']:,} |")
    lines += [
        "",
        "## Training",
        "",
        f"- {cfg['steps']:,} steps of AdamW (betas 0.9/0.95, weight decay {cfg['weight_decay']} on matrices), "
        f"batch {cfg['batch_size']} x {cfg['block_size']} tokens at random offsets of the train stream, "
        f"learning rate {cfg['lr']:g} after {cfg['warmup_steps']} warmup steps, cosine decay to {cfg['min_lr']:g}, "
        f"gradient clip {cfg['grad_clip']}, dropout {cfg['dropout']} (none on attention), seed {cfg['seed']}.",
        (f"- Position table initialised to sinusoids of amplitude {cfg['position_amplitude']:g} (Vaswani et al., 2017) and "
         "then learnt, without weight decay: GPT-2's random initialisation leaves position *i* and *i*-1 unrelated, "
         "which delays previous-token heads."
         if cfg.get("position_init", "learned") == "sinusoidal" else "- Position table: GPT-2's random initialisation, learnt."),
        f"- Tokens seen: {training['tokens_seen']:,} ({training['tokens_seen'] / training['train_tokens']:.1f} "
        "passes over the train split).",
        f"- Training time: {training['train_seconds'] / 60:.1f} min ({training['total_seconds'] / 60:.1f} min "
        f"end to end) wall clock on {training['machine']['cpu_threads']} CPU thread{'s' if training['machine']['cpu_threads'] != 1 else ''}, torch {training['machine']['torch']}"
        + (f"; {training['train_cpu_seconds'] / 60:.1f} min of CPU time (the wall time includes waiting for a CPU "
           "shared with other jobs)." if "train_cpu_seconds" in training else "."),
        "- Validation loss during training (first "
        f"{cfg['eval_blocks']} validation blocks): "
        + ", ".join(f"step {e['step']}: {e['val_loss']:.3f}" for e in val_log)
        + ".",
        *([
            "- Heads forming during training (best head's score on 2 validation blocks and a 32-token repeated "
            "random sequence; copy gain = first-copy loss - second-copy loss, nats):",
            "",
            "| step | previous-token | induction | sink | copy gain |",
            "|---:|---:|---:|---:|---:|",
            *(f"| {e['step']:,} | {e['best_previous_token']:.2f} | {e['best_induction']:.2f} | {e['best_sink']:.2f} | "
              f"{e['copy_gain']:.2f} |" for e in val_log if "best_sink" in e),
        ] if any("best_sink" in e for e in val_log) else []),
        "",
        "## Evaluation",
        "",
        "Perplexity = exp(mean next-token negative log-likelihood) over every predicted token of "
        f"non-overlapping {results['block_size']}-token blocks of the split (chapters joined by `<|endoftext|>`; "
        "the first token of each block is not predicted). The unigram baseline is the train split's token "
        "frequencies with add-one smoothing, scored on the same tokens.",
        "",
        "| split | tokens scored | model perplexity | unigram perplexity |",
        "|---|---:|---:|---:|",
    ]
    for name in ("validation", "test", slice_key):
        label = name if name != slice_key else f"test, first {SLICE_BLOCKS} blocks"
        lines.append(f"| {label} | {ppl[name]['tokens']:,} | {_fmt(ppl[name]['perplexity'])} | {_fmt(uni[name]['perplexity'])} |")
    lines += [
        "",
        f"On the test split the unigram baseline's perplexity is {ratio:.1f}x the model's. Reproduce with:",
        "",
        "```",
        "attnkit perplexity reference --dataset kjv --split test",
        "attnkit perplexity reference --dataset kjv --split validation",
        "```",
        "",
        "## What the heads do",
        "",
        "Measured with attnkit's seam (`attnkit.analyze.heads.measure_head_roles`, attention probabilities "
        "captured by `attnkit.seam.attach` + `MapCapture`):",
        "",
        f"- **previous-token**: mean attention from position *i* to *i*-1 on {HEAD_TEXT_BLOCKS} test blocks ({heads['text_tokens']:,} tokens), *i* >= 2;",
        "- **sink**: mean attention from position *i* to position 0 on the same blocks (blocks start mid-text, so "
        "position 0 is an arbitrary token), *i* >= 2 (positions 0 and 1 are left out of both scores: there the "
        "previous token is the first token);",
        f"- **induction** (Olsson et al., 2022): on a random token sequence of {heads['repeat_length']} tokens repeated twice, "
        "mean attention from each token of the second copy to the token after its earlier occurrence.",
        "",
        f"Copying, at the level of the model's output: on those repeated random tokens the loss falls from "
        f"{heads['first_half_loss']:.2f} nats on the first copy to {heads['second_half_loss']:.2f} nats on the second.",
        "",
        f"Role = the role whose score clears its threshold ({', '.join(f'{ROLE_NAMES[r]} {t}' for r, t in ROLE_THRESHOLDS.items())}) "
        "by the widest factor; best head per role in bold.",
        "",
        "| layer | head | previous-token | induction | sink | role |",
        "|---:|---:|---:|---:|---:|---|",
    ]
    for h in heads["heads"]:
        cells = []
        for r in ("previous_token", "induction", "sink"):
            v = _fmt(h[r])
            cells.append(f"**{v}**" if best[r] == {"layer": h["layer"], "head": h["head"]} else v)
        lines.append(f"| {h['layer']} | {h['head']} | {' | '.join(cells)} | {_role_of(h)} |")
    chance = heads["chance"]
    lines.append(f"| uniform | attention | {_fmt(chance['previous_token'])} | {_fmt(chance['induction'])} | {_fmt(chance['sink'])} | (chance level) |")
    lines += [""]
    for r in ("previous_token", "induction", "sink"):
        b = best[r]
        score = next(h[r] for h in heads["heads"] if h["layer"] == b["layer"] and h["head"] == b["head"])
        verdict = (
            "clears the threshold" if score >= ROLE_THRESHOLDS[r]
            else f"below the {ROLE_THRESHOLDS[r]} threshold: no head has this role yet "
            f"({score / chance[r]:.1f}x uniform attention's {_fmt(chance[r])})"
        )
        lines.append(f"- Best {ROLE_NAMES[r]} head: layer {b['layer']}, head {b['head']} ({_fmt(score)}), {verdict}.")
    sample = results["sample"]
    lines += [
        "",
        "## Sample",
        "",
        f"Greedy continuation of \"{sample['prompt']}\":",
        "",
        "```",
        sample["greedy"],
        "```",
        "",
        "## Reproduce",
        "",
        "```",
        "python scripts/train_reference.py --out runs/reference   # writes the model and this card there",
        "```",
        "",
        "The run is seeded (initialisation, batch offsets, dropout): on the same machine and thread count a rerun "
        "draws the same batches; on other hardware floating-point order differs, so the weights differ slightly.",
        "",
    ]
    rep = results.get("reproduction")
    if rep:
        change = rep["test_perplexity"] / ppl["test"]["perplexity"] - 1
        lines += [
            f"A second run of the same command ({rep['train_seconds'] / 60:.1f} min of training) reached test perplexity "
            f"{_fmt(rep['test_perplexity'])} against this model's {_fmt(ppl['test']['perplexity'])} ({change:+.2%}); "
            f"its best previous-token / induction heads scored {_fmt(rep['best_previous_token'])} / {_fmt(rep['best_induction'])}"
            + ("; its weights are bit-identical to these." if rep.get("identical_weights") else "; its weights differ from these."),
            "",
        ]
    return "\n".join(lines)


def measure_reproduction(run_dir: Path, model_dir: Path, block_size: int) -> dict:
    """A second training run's test perplexity and best heads, measured the same way."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from attnkit.analyze.heads import measure_head_roles
    from attnkit.common.data import encode_documents, load_corpus, split_blocks
    from attnkit.perplexity import evaluate_perplexity

    model = AutoModelForCausalLM.from_pretrained(run_dir, attn_implementation="sdpa").eval()
    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    test_blocks = split_blocks(encode_documents(tokenizer, load_corpus("kjv").splits["test"]), block_size)
    roles = measure_head_roles(model, torch.stack(test_blocks[:HEAD_TEXT_BLOCKS]), len(tokenizer),
                               exclude={tokenizer.eos_token_id}, repeat_length=repeat_length(block_size), seed=0)
    training = json.loads((run_dir / "training.json").read_text())
    from safetensors.torch import load_file

    mine, theirs = load_file(model_dir / "model.safetensors"), load_file(run_dir / "model.safetensors")
    identical = mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    return {
        "run": run_dir.name,
        "identical_weights": identical,
        "train_seconds": training["train_seconds"],
        "test_perplexity": evaluate_perplexity(model, test_blocks, EVAL_BATCH_SIZE).perplexity,
        "best_previous_token": roles.best("previous_token").previous_token,
        "best_induction": roles.best("induction").induction,
    }


def write_card(model_dir: Path, reproduction: Path | None = None) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model_dir = Path(model_dir)
    training = json.loads((model_dir / "training.json").read_text())
    results = measure(model_dir)
    if reproduction is not None:
        results["reproduction"] = measure_reproduction(Path(reproduction), model_dir, results["block_size"])
    (model_dir / "eval_results.json").write_text(json.dumps(results, indent=1) + "\n")
    (model_dir / "README.md").write_text(render_card(results, training))
    print(f"wrote {model_dir / 'README.md'}: test perplexity {results['perplexity']['test']['perplexity']:.2f} "
          f"(unigram {results['unigram_perplexity']['test']['perplexity']:.2f})")
    return results


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", nargs="?", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--reproduction", type=Path, help="a second run of train_reference.py to compare against")
    args = parser.parse_args()
    write_card(args.model_dir, args.reproduction)
