"""Text to token ids for a model, with one clear error for empty, too short or too long input.

analyze, validate, gate and monitor's trace all turn a user's text into the inputs of one forward.
"""

from __future__ import annotations

from torch import nn

from attnkit.errors import UserError

MIN_TOKENS = 2  # fewest tokens accepted: below this no attention row has a choice to make


def max_positions(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for key in ("n_positions", "max_position_embeddings"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def tokenize(tokenizer, text: str, max_length: int | None, model_max: int | None, truncate_silently: bool = False,
             device=None):
    """Token ids for ``text`` (on ``device`` when given: the model's); a clear error for empty or over-long input."""
    if not text or not text.strip():
        raise UserError("the text is empty; give --text or --text-file with some words in it")
    enc = tokenizer(text, return_tensors="pt", truncation=False)
    n = enc["input_ids"].shape[1]
    if n == 0:
        raise UserError("the text produced no tokens")
    limit = max_length if max_length is not None else model_max
    if max_length is not None and model_max is not None and max_length > model_max:
        raise UserError(f"--max-length {max_length} is more than the model takes ({model_max} positions)")
    if limit is not None and n > limit:
        if max_length is None and not truncate_silently:
            raise UserError(
                f"the text is {n} tokens but the model takes at most {model_max}; "
                f"pass --max-length {model_max} to analyse the first {model_max} tokens"
            )
        enc = {k: v[:, :limit] for k, v in enc.items()}
    kept = enc["input_ids"].shape[1]
    if kept < MIN_TOKENS:
        # One token is one row seeing one key: every statistic would be NaN and every check silent.
        cut = f" after --max-length {max_length}" if max_length is not None and kept < n else ""
        raise UserError(f"the input is {kept} token{'s' if kept != 1 else ''}{cut}; attention statistics need "
                        f"at least {MIN_TOKENS} tokens (a query must see two keys), so give a longer text")
    return {k: v.to(device) for k, v in enc.items()} if device is not None else dict(enc)
