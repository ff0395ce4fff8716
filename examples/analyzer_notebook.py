# %% [markdown]
# # Attention statistics over your own data loop
#
# `Analyzer(model)` watches every forward inside its `with` block and pools each head's statistics
# over all of them: entropy, sinks, spikes, logit extremes, with a 95% interval of each head's mean
# entropy over the sequences. Padding takes no part (pass the `attention_mask`). The model is left
# exactly as it was found afterwards. This file is a notebook in the percent format: open it in
# Jupyter (jupytext) or VS Code, or run it as a script.

# %%
import torch

from attnkit.analyze import Analyzer
from attnkit.common.loading.registry import load_model

loaded = load_model("reference")  # a small GPT-2 that ships with attnkit; any Hugging Face model works
model, tokenizer = loaded.model, loaded.tokenizer

texts = [
    "In the beginning God created the heaven and the earth.",
    "And the earth was without form, and void; and darkness was upon the face of the deep.",
    "And God said, Let there be light: and there was light.",
    "And God saw the light, that it was good: and God divided the light from the darkness.",
    "Jesus wept.",
    "The LORD is my shepherd; I shall not want.",
]


def loader(batch_size: int = 3):
    """Your own loader: right-padded batches with their attention mask."""
    for start in range(0, len(texts), batch_size):
        ids = [tokenizer(t)["input_ids"] for t in texts[start : start + batch_size]]
        longest = max(len(i) for i in ids)
        yield {
            "input_ids": torch.tensor([i + [0] * (longest - len(i)) for i in ids]),
            "attention_mask": torch.tensor([[1] * len(i) + [0] * (longest - len(i)) for i in ids]),
        }


# %%
with Analyzer(model, name="reference") as a, torch.no_grad():
    for batch in loader():
        model(**batch)
analysis = a.result()
print(f"{analysis.sequences} sequences, {analysis.rows} query rows, {len(analysis.issues)} issues")

# %% [markdown]
# Each head carries its statistics; `entropy_ci95` is the interval over the sequences.

# %%
for head in analysis.heads[:4]:
    lo, hi = head["entropy_ci95"]
    print(f"layer {head['layer']} head {head['head']}: entropy {head['entropy']:.3f} nats, 95% CI [{lo:.3f}, {hi:.3f}]")
for issue in analysis.issues[:3]:
    print(issue.severity, issue.where, issue.type)

# %% [markdown]
# In a notebook the analysis renders itself (`_repr_html_`): the header, the heatmap and the issues.
# `to_json()` is the report `attnkit analyze --json` writes; `plot_heatmap("heads.png")` saves the figure.

# %%
analysis  # noqa: B018 - the notebook shows it
report = analysis.to_json()
png = analysis.plot_heatmap()
