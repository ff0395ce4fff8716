"""``validate``: the nine-section attention validation report, for any model the seam reaches.

    from attnkit.validate import validate
    report = validate(model, tokenizer, ["some held-out text ..."], name="my-model")
    report.summary["critical"], report.conclusion.title, report.to_json()["ablation"]

One forward through the seam captures attention maps (every layer, every head) and hidden
states on ``options.sequences`` blocks of ``options.seq_len`` tokens; sections 1-7 read those;
section 8 runs a backward pass and section 9 the ablation on ``options.ablation_blocks`` blocks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from attnkit.common.data import load_corpus
from attnkit.common.distributed import DistEnv
from attnkit.common.data.bible import kjv_available
from attnkit.common.default_text import DEFAULT_TEXT
from attnkit.common.tokenize import max_positions
from attnkit.errors import UserError
from attnkit.validate.capture import Captured, build_blocks, capture
from attnkit.validate.context import Context, Options
from attnkit.validate.sections import SECTIONS
from attnkit.validate.summary import Conclusion, apply_evidence, conclude, counts, exit_status, measure_evidence
from attnkit.validate.types import Section, jsonable

SCHEMA_VERSION = "1.0"


@dataclass
class ValidationReport:
    model: str
    kind: str
    data_source: str
    options: Options
    captured: Captured
    sections: list[Section]
    summary: dict
    conclusion: Conclusion
    seconds: dict = field(default_factory=dict)

    @property
    def exit_status(self) -> int:
        return exit_status(self.summary)

    def section(self, key: str) -> Section:
        return next(s for s in self.sections if s.key == key)

    def to_json(self) -> dict:
        abl = self.section("ablation").figures.get("variants", {}) if any(s.key == "ablation" for s in self.sections) else {}
        return jsonable({
            "schema_version": SCHEMA_VERSION,
            "model": self.model,
            "kind": self.kind,
            "data": {"source": self.data_source, "sequences": int(self.captured.input_ids.shape[0]),
                     "seq_len": int(self.captured.input_ids.shape[1])},
            "options": vars(self.options),
            "sections": [s.to_json() for s in self.sections],
            "ablation": abl,
            "summary": {**self.summary, "conclusion": self.conclusion.to_json()},
            "exit_status": self.exit_status,
            "seconds": self.seconds,
        })


def infer_kind(model: nn.Module) -> str:
    name = type(model).__name__
    return "causal-lm" if name.endswith(("ForCausalLM", "LMHeadModel")) else "encoder"


def default_documents() -> tuple[list[str], str]:
    """The KJV test split (shipped with attnkit, or Debian's ``bible``), else the built-in passage."""
    if kjv_available():
        return load_corpus("kjv").split("test"), "kjv [test]"

    return [DEFAULT_TEXT], "built-in passage"


def validate(
    model: nn.Module,
    tokenizer,
    documents: list[str] | None = None,
    *,
    name: str = "model",
    kind: str | None = None,
    options: Options | None = None,
    data_source: str | None = None,
    on_section: Callable[[str], None] | None = None,
    on_progress: Callable[[int, int, str], None] | None = None,
    env: DistEnv | None = None,
) -> ValidationReport:
    """Run the nine sections on ``model``; the model is left as found.

    ``on_section(key)`` is called before each section; ``on_progress(done, total, key)`` before
    each step, the capture of the attention maps (key ``"capture"``) included, and once more
    with ``done == total`` (key ``"done"``) at the end: enough for a progress bar.

    ``env``: under ``torchrun`` (``attnkit.common.distributed.command_group``) the ablation's
    held-out blocks are shared among the ranks and its sums pooled; sections 1-8 read a few
    captured sequences and run whole on every rank. Every rank returns the same report.
    """
    options = options or Options()
    kind = kind or infer_kind(model)
    if documents is None:
        documents, source = default_documents()
        data_source = data_source or source
    data_source = data_source or "given text"
    if options.seq_len < 4:
        raise UserError(f"--seq-len must be at least 4, got {options.seq_len}")
    limit = max_positions(model)
    if limit is not None and options.seq_len > limit:
        raise UserError(f"--seq-len {options.seq_len} is more than the model takes ({limit} positions)")
    for what, value in (("--sequences", options.sequences), ("--ablation-blocks", options.ablation_blocks),
                        ("--batch-size", options.batch_size)):
        if value < 1:
            raise UserError(f"{what} must be at least 1, got {value}")
    blocks = build_blocks(tokenizer, documents, options.seq_len, max(options.sequences, options.ablation_blocks))
    seconds: dict[str, float] = {}
    total_steps = 1 + len(SECTIONS)
    if on_progress is not None:
        on_progress(0, total_steps, "capture")
    t0 = time.perf_counter()
    captured = capture(model, tokenizer, blocks[: options.sequences])
    seconds["capture"] = time.perf_counter() - t0
    ctx = Context(model=model, tokenizer=tokenizer, name=name, kind=kind, captured=captured,
                  ablation_ids=blocks[: options.ablation_blocks], data_source=data_source, options=options,
                  env=env or DistEnv())
    sections = []
    for step, (key, fn) in enumerate(SECTIONS, 1):
        if on_section is not None:
            on_section(key)
        if on_progress is not None:
            on_progress(step, total_steps, key)
        t = time.perf_counter()
        sections.append(fn(ctx))
        seconds[key] = time.perf_counter() - t
    if on_progress is not None:
        on_progress(total_steps, total_steps, "done")
    # Sample sizes stated in every statistical section; too little data cannot give a ❌ or ⚠.
    apply_evidence(sections, measure_evidence(captured, ctx.ablation_ids, ctx.causal_lm, options))
    summary = counts(sections)
    return ValidationReport(model=name, kind=kind, data_source=data_source, options=options, captured=captured,
                            sections=sections, summary=summary, conclusion=conclude(sections, options),
                            seconds={k: round(v, 3) for k, v in seconds.items()})
