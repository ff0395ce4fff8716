"""Train attnkit's reference model: a small GPT-2 on the King James Bible, on CPU.

    python scripts/train_reference.py                      # ~35 min on one CPU thread; writes src/attnkit/models/reference/
    python scripts/train_reference.py --out runs/ref2      # reproduce elsewhere without touching the shipped model
    python scripts/train_reference.py --card-only          # re-measure and rewrite the model card only
    python scripts/reference_card.py --reproduction runs/ref2   # ... and record the second run in it

Steps: (1) train a byte-level BPE tokenizer on the train split, (2) train a GPT2LMHeadModel on
random 128-token windows of the train stream with AdamW and a warmup + cosine schedule,
(3) save it in Hugging Face format (safetensors), (4) measure it (validation / test perplexity,
unigram baseline, head roles via attnkit's seam) and write the model card from those
measurements. Everything is seeded; on the same machine and thread count a rerun gives the
same weights.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "src" / "attnkit" / "models" / "reference"
EOT = "<|endoftext|>"
LOG_EVERY = 100  # steps between entries of training.json's loss log (every step made it 3 MB)


@dataclass
class TrainConfig:
    # Tokenizer. 1024 symbols: most words take two or three tokens, so predicting the rest of a
    # word needs the previous tokens, which pushes the model to form previous-token and
    # copying heads (at 4096 symbols, 3M tokens gave no such heads: a word-statistics model with
    # near-uniform attention).
    vocab_size: int = 1024
    # Model: 4 layers so that two-layer circuits (previous-token head feeding an induction head)
    # can form; 4 heads of 32 dims. Width 128, not 256: heads form after a number of *tokens*
    # that hardly depends on width, and a narrower model sees 2.7x more tokens per CPU second
    # (5,200 against 1,900 for the earlier 8-head, width-256, context-256 model; training.json of each).
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    # 128 positions, not 256: at the same 256 tokens a step, 1 x 256 formed a previous-token head
    # three times slower (best score 0.10 against 0.31 after 2.6M tokens).
    block_size: int = 128
    # Position table initialised to sinusoids (Vaswani et al., 2017) and then learnt: random
    # rows leave i and i-1 unrelated, and a 32-dim head cannot map each of 128 random rows to
    # its predecessor; a smooth table lets "attend to i-1" be one rotation. Amplitude 0.05: rows of
    # norm 0.4, the order of the token rows' 0.23 at initialisation. "learned" = GPT-2's N(0, 0.02).
    position_init: str = "sinusoidal"
    position_amplitude: float = 0.05
    dropout: float = 0.0  # a few passes over the train split: too few to overfit, and dropout slows head formation
    # Optimisation. Small steps (batch x context tokens): induction heads appear after about
    # 10^5.7 * sqrt(batch * context) tokens (Aoyama et al., 2025), so fewer tokens a step should
    # mean fewer tokens in all (~8M here). They had not formed by 10.2M tokens (model card).
    steps: int = 40_000
    batch_size: int = 2
    lr: float = 1.5e-3
    min_lr: float = 1.5e-4
    warmup_steps: int = 500
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 2_500
    eval_blocks: int = 48  # validation blocks used for the periodic check (the full split at the end)
    seed: int = 1234
    # One thread: the same weights on any machine of this kind, and two runs (ship + reproduce)
    # can share a 2-core machine side by side.
    threads: int = 1


def training_arguments(doc: str, default_out: Path) -> argparse.ArgumentParser:
    """The options both reference scripts take besides their config's fields."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=default_out, help="output directory (default: the shipped model)")
    p.add_argument("--card-only", action="store_true", help="skip training; measure the model in --out and write its card")
    p.add_argument("--no-card", action="store_true", help="train and save, but do not measure or write the card")
    return p


def parse_config(p: argparse.ArgumentParser, config_class):
    """One --option per field of the config dataclass, its default the field's."""
    defaults = asdict(config_class())
    for name, value in defaults.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = p.parse_args()
    return args, config_class(**{k: getattr(args, k) for k in defaults})


def parse_args() -> tuple[argparse.Namespace, TrainConfig]:
    return parse_config(training_arguments(__doc__, DEFAULT_OUT), TrainConfig)


# ---------------------------------------------------------------------------------------------
# tokenizer


def train_tokenizer(documents: list[str], vocab_size: int):
    """Byte-level BPE (GPT-2's scheme: no unknown tokens) trained on the train split only."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(documents, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOT, eos_token=EOT, unk_token=EOT, model_max_length=1024
    )


# ---------------------------------------------------------------------------------------------
# training


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``min_lr`` at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def sinusoids(positions: int, dim: int) -> torch.Tensor:
    """(positions, dim) table of Vaswani et al. (2017): sin / cos pairs at geometric frequencies."""
    pos = torch.arange(positions, dtype=torch.float32)[:, None]
    angle = pos / 10_000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)  # (T, dim / 2)
    table = torch.zeros(positions, dim)
    table[:, 0::2], table[:, 1::2] = torch.sin(angle), torch.cos(angle)
    return table


def _sinusoidal_positions(wpe: torch.Tensor, cfg: TrainConfig) -> None:
    with torch.no_grad():
        wpe.copy_(cfg.position_amplitude * sinusoids(*wpe.shape))


def _learned_positions(wpe: torch.Tensor, cfg: TrainConfig) -> None:
    """GPT-2's own N(0, 0.02) initialisation, already applied by the model."""


POSITION_INITS = {"sinusoidal": _sinusoidal_positions, "learned": _learned_positions}


def init_positions(model: torch.nn.Module, cfg: TrainConfig) -> None:
    if cfg.position_init not in POSITION_INITS:
        raise SystemExit(f"--position-init must be one of {sorted(POSITION_INITS)}, not {cfg.position_init!r}")
    POSITION_INITS[cfg.position_init](model.transformer.wpe.weight, cfg)  # (T, C)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # Decay weight matrices and the token table; biases, LayerNorm gains and the position table
    # are left alone (decay would pull the positions back towards the mean and blur them).
    position_table = model.transformer.wpe.weight
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2 and p is not position_table]
    no_decay = [p for p in params if not any(p is q for q in decay)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


def train(out: Path, cfg: TrainConfig) -> None:
    from rich.console import Console
    from transformers import GPT2Config, GPT2LMHeadModel

    from attnkit.common.data import encode_documents, load_corpus, random_blocks, split_blocks
    from attnkit.analyze.heads import measure_head_roles
    from attnkit.perplexity import evaluate_perplexity

    console = Console()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    corpus = load_corpus("kjv")
    tokenizer = train_tokenizer(corpus.splits["train"], cfg.vocab_size)
    tokenizer.save_pretrained(out)
    train_ids = encode_documents(tokenizer, corpus.splits["train"])
    val_blocks = split_blocks(encode_documents(tokenizer, corpus.splits["validation"]), cfg.block_size)
    console.print(f"tokenizer: {len(tokenizer)} symbols; train stream {train_ids.numel():,} tokens")

    eot = tokenizer.convert_tokens_to_ids(EOT)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=cfg.block_size,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=0.0,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
    )
    config.architectures = ["GPT2LMHeadModel"]
    model = GPT2LMHeadModel._from_config(config, attn_implementation="sdpa")
    init_positions(model, cfg)
    model.train()
    optimizer = make_optimizer(model, cfg)
    batches = torch.Generator().manual_seed(cfg.seed)
    n_params = sum(p.numel() for p in model.parameters())
    console.print(f"model: {n_params:,} parameters; {cfg.steps} steps x {cfg.batch_size} x {cfg.block_size} tokens")

    log: list[dict] = []
    t_train, cpu_train = time.time(), time.process_time()
    with train_progress(console) as progress:
        task = progress.add_task("train", total=cfg.steps, loss=float("nan"), val="-")
        running = None
        for step in range(cfg.steps):
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x = random_blocks(train_ids, cfg.block_size, cfg.batch_size, batches)
            loss = model(input_ids=x, labels=x).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
            entry = {"step": step + 1, "loss": round(loss.item(), 4), "lr": lr}
            if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                val = evaluate_perplexity(model, val_blocks[: cfg.eval_blocks], batch_size=8)
                entry["val_loss"] = round(val.nll, 4)
                # Watch the heads form: best previous-token and induction scores so far (seam, 2 blocks).
                roles = measure_head_roles(model, torch.stack(val_blocks[:2]), len(tokenizer), exclude={eot}, repeat_length=32, batch=2)
                entry["best_previous_token"] = round(roles.best("previous_token").previous_token, 3)
                entry["best_induction"] = round(roles.best("induction").induction, 3)
                entry["best_sink"] = round(roles.best("sink").sink, 3)
                entry["copy_gain"] = round(roles.copy_gain, 3)
                model.train()
                progress.update(task, val=f"{val.nll:.3f}")
                progress.console.print(
                    f"step {step + 1}: train loss {running:.3f}, val loss {val.nll:.3f} (ppl {val.perplexity:.2f}), "
                    f"best previous-token {entry['best_previous_token']:.2f}, induction {entry['best_induction']:.2f}, "
                    f"sink {entry['best_sink']:.2f}, copy gain {entry['copy_gain']:.2f} nats"
                )
            if (step + 1) % LOG_EVERY == 0 or "val_loss" in entry:
                log.append(entry)
            progress.update(task, advance=1, loss=running)
    save_trained(model, out, cfg, n_params, train_ids, cfg.steps * cfg.batch_size * cfg.block_size,
                 (t_start, t_train, cpu_train), log, console)


def train_progress(console):
    """The training progress bar both reference scripts show: steps, running loss, last validation loss."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = [
        TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.3f}"),
        TextColumn("val {task.fields[val]}"), TimeElapsedColumn(), TimeRemainingColumn(),
    ]
    return Progress(*columns, console=console)


def save_trained(model, out: Path, cfg, n_params: int, train_ids: torch.Tensor, tokens_seen: int,
                 clocks: tuple[float, float, float], log: list[dict], console, extra: dict | None = None) -> None:
    """Save the model (safetensors) and training.json; ``clocks`` = (start, training start, CPU time at
    training start); ``extra``: more fields for training.json."""
    t_start, t_train, cpu_train = clocks
    train_seconds = time.time() - t_train
    # CPU time tells an unshared machine's wall time (about cpu / threads) when others share the cores.
    cpu_seconds = time.process_time() - cpu_train
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    record = {
        "config": asdict(cfg),
        "parameters": n_params,
        "train_tokens": train_ids.numel(),
        "tokens_seen": tokens_seen,
        "train_seconds": round(train_seconds, 1),
        "train_cpu_seconds": round(cpu_seconds, 1),
        "total_seconds": round(time.time() - t_start, 1),
        "machine": {"cpu_threads": cfg.threads, "platform": platform.platform(), "torch": torch.__version__},
        "log": log,
        "command": " ".join(["python", *sys.argv]),
        **(extra or {}),
    }
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    console.print(f"saved to {out} ({train_seconds / 60:.1f} min of training)")


def main() -> int:
    args, cfg = parse_args()
    if not args.card_only:
        train(args.out, cfg)
    if not args.no_card:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from reference_card import write_card

        write_card(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
