"""Scan every architecture in transformers' registry through the same check as the zoo test.

    HF_HUB_OFFLINE=1 python tests/arch_scan.py [--json OUT] [--markdown OUT] [MODEL_TYPE ...]

Not a test (minutes, and most failures are inputs a generic builder cannot guess): a survey.
Candidates are the model types of ``MODEL_MAPPING_NAMES`` whose modeling file dispatches through
``ALL_ATTENTION_FUNCTIONS``. Each gets a generic tiny config: the registry's default config with
every size field it has shrunk (``SMALL``; sub-configs likewise), built with ``AutoModel`` and fed
inputs for its ``main_input_name``. The result per model type is one of

    exact        captured maps equal eager output_attentions, outputs unchanged under attach
    partial      attach warned that some attention is hand-written and not seen (the rest is checked
                 in the zoo where the family has an entry)
    wrong        the check failed (the message says where; EXPLAINED says why, where known)
    refused      attach raised NoAttentionError / a clear refusal
    uniform      attention too close to uniform for the comparison to mean anything
    not-run      the generic config or inputs did not build or run (no statement about the seam)

Site names are not what the survey checks (the zoo test does): each eager list is matched to the
captured (stack, kind) group that fits it (a multimodal model run on text alone names its one
stack ``language_model``), and calls eager does not report are allowed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import signal
import sys
import traceback
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

from arch_zoo import INIT, VOCAB, Arch  # noqa: E402

# Why a "wrong" result is wrong, where that is understood.
EXPLAINED = {
    "vit_mae": "draws fresh random patch masking on every forward: two forwards differ without attnkit",
    "pegasus_x": "eager output_attentions returns dicts (local/global), which the check cannot compare",
}

# What the zoo knows about a family that a generic config cannot tell (see arch_zoo.Arch).
KNOWN = {
    "granite_swa": {"eager_weights_exclude_sink": True},
    "granitemoe_swa": {"eager_weights_exclude_sink": True},
    "hrm_text": {"in_call_order": True, "extra_sites": 0},  # looped: eager lists every pass in call order
    "dory": {"in_call_order": True, "extra_sites": 0},
}

SMALL = {
    "hidden_size": 32, "d_model": 32, "n_embd": 32, "embed_dim": 32, "dim": 32,
    "num_hidden_layers": 2, "n_layer": 2, "n_layers": 2, "num_layers": 2, "encoder_layers": 2, "decoder_layers": 2,
    "num_decoder_layers": 2, "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "num_heads": 4,
    "encoder_attention_heads": 4, "decoder_attention_heads": 4, "num_key_value_heads": 2,
    "intermediate_size": 64, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "d_ff": 64, "ffn_dim": 64, "hidden_dim": 64,
    "head_dim": 8, "d_kv": 8, "vocab_size": VOCAB, "initializer_range": INIT, "image_size": 32, "patch_size": 8,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2,
    "moe_intermediate_size": 16, "max_position_embeddings": 64, "attention_dropout": 0.0, "hidden_dropout": 0.0,
    "dropout": 0.0, "attention_probs_dropout_prob": 0.0, "hidden_dropout_prob": 0.0, "kv_lora_rank": 16,
    "q_lora_rank": 16, "qk_rope_head_dim": 4, "qk_nope_head_dim": 4, "v_head_dim": 8, "first_k_dense_replace": 1,
    "n_group": 1, "topk_group": 1, "pad_token_id": 0, "num_mel_bins": 16, "max_source_positions": 16,
    "max_target_positions": 32, "initializer_factor": 2.0,
}


def shrunk(config_class) -> dict:
    """Keyword arguments for a tiny ``config_class``: its size fields from SMALL, sub-configs likewise."""
    default = config_class()
    kwargs = {}
    for key, value in SMALL.items():
        if key in default.__dict__ and getattr(default, key, None) is not None:
            kwargs[key] = value
    for key in getattr(default, "sub_configs", {}) or {}:
        sub = getattr(default, key, None)
        if sub is not None and hasattr(sub, "to_dict"):
            kwargs[key] = shrunk(type(sub))
    return kwargs


def candidates() -> dict[str, str]:
    """model_type -> base model class name, for every model type whose modeling file dispatches."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    models_dir = Path(transformers.__file__).parent / "models"
    sources = {p.parent.name: p.read_text() for p in models_dir.glob("*/modeling_*.py")}
    found = {}
    for model_type, cls in MODEL_MAPPING_NAMES.items():
        cls = cls[0] if isinstance(cls, tuple) else cls
        for src in sources.values():
            if re.search(rf"^class {re.escape(cls)}\(", src, re.M):
                if "ALL_ATTENTION_FUNCTIONS" in src:
                    found[model_type] = cls
                break
    return found


def inputs_kind(model) -> tuple[str, dict]:
    name = model.main_input_name
    cfg = model.config
    if name == "input_ids":
        if cfg.is_encoder_decoder:
            return "seq2seq", {}
        # Hybrid caches (linear-attention first layers) cannot answer get_seq_length: no cache.
        return "text", ({"use_cache": False} if hasattr(cfg, "use_cache") else {})
    if name == "pixel_values":
        size = getattr(cfg, "image_size", 32)
        return "pixels", {"size": size[0] if isinstance(size, (list, tuple)) else size}
    if name == "input_values":
        return "audio_values", {}
    if name == "input_features":
        return "audio_features", {"features": getattr(cfg, "num_mel_bins", 16), "frames": 32,
                                  "decoder": bool(cfg.is_encoder_decoder)}
    raise NotImplementedError(f"main input {name!r}")


def _matched_sites(reference, captured: dict) -> dict:
    """Arch fields that match each eager list to the captured group that fits it."""
    counts: dict[tuple[str, str], int] = {}
    for stack, kind, _ in captured:
        counts[(stack, kind)] = counts.get((stack, kind), 0) + 1
    sites = {}
    for field_name in ("attentions", "encoder_attentions", "decoder_attentions", "cross_attentions"):
        maps = [m for m in (getattr(reference, field_name, None) or ()) if m is not None]
        if not maps:
            continue
        kind = "cross" if field_name == "cross_attentions" else "self"
        word = field_name.split("_")[0] if "_" in field_name and kind == "self" else ""
        fits = [g for g, n in counts.items() if g[1] == kind and word in g[0] and n == len(maps)]
        if len(fits) > 1 and ("", kind) in fits:  # the model's own stack before side calls
            fits = [("", kind)]
        if len(fits) == 1:
            sites[field_name] = fits[0]
    reported = sum(len([m for m in (getattr(reference, f, None) or ()) if m is not None]) for f in sites)
    return {"sites": sites, "extra_sites": max(0, len(captured) - reported)}


class _Timeout(Exception):
    pass


def _alarm(*_):
    raise _Timeout()


def scan_one(model_type: str, model_class: str) -> dict:
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    import test_architectures as t

    config_class = CONFIG_MAPPING[model_type]
    try:
        kwargs = shrunk(config_class)
        if not hasattr(transformers, config_class.__name__) or not hasattr(transformers, model_class):
            return {"result": "not-run", "why": "class not exported by transformers"}
        torch.manual_seed(0)
        model = getattr(transformers, model_class)._from_config(config_class(**kwargs), attn_implementation="eager")
        kind, options = inputs_kind(model)
        arch = Arch(model_type, "scan", config_class.__name__, model_class, kwargs, kind, input_options=options)
        model, inputs = arch.build()
        with torch.no_grad():
            reference = model(**inputs, output_attentions=True)
        if not t.reference_maps(arch, reference):
            return {"result": "not-run", "why": "eager output_attentions returned no maps"}
    except Exception as e:  # the generic builder's failure, not the seam's
        return {"result": "not-run", "why": f"{type(e).__name__}: {str(e)[:200]}"}
    try:
        captured, _, _ = t.capture_through_seam(model, inputs)
        arch = dataclasses.replace(arch, **{**_matched_sites(reference, captured), **KNOWN.get(model_type, {})})
        t.test_captured_probabilities_equal_eager_and_outputs_unchanged(arch)
        return {"result": "exact"}
    except AssertionError as e:
        message = str(e) or "assertion without a message"
        if "without transformers' AttentionInterface" in message:
            return {"result": "partial", "why": message.split("compute attention")[0].split("[\"")[-1][:200]}
        if model_type in EXPLAINED:
            return {"result": "wrong", "why": EXPLAINED[model_type]}
        if "attention near uniform" in message:
            return {"result": "uniform", "why": message.split("\n")[0][:200]}
        return {"result": "wrong", "why": message.split("\n")[0][:300]}
    except t.NoAttentionError as e:
        return {"result": "refused", "why": str(e)[:200]}
    except NotImplementedError as e:
        return {"result": "refused", "why": f"NotImplementedError: {str(e)[:200]}"}
    except Exception as e:
        if model_type in EXPLAINED:
            return {"result": "wrong", "why": EXPLAINED[model_type]}
        return {"result": "wrong", "why": f"{type(e).__name__} under attach: {str(e)[:200]}",
                "trace": traceback.format_exc(limit=3)[-400:]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_types", nargs="*")
    parser.add_argument("--json")
    parser.add_argument("--markdown", help="write the per-architecture table (docs/architectures.md)")
    args = parser.parse_args()
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    signal.signal(signal.SIGALRM, _alarm)
    found = candidates()
    names = args.model_types or sorted(found)
    results = {}
    for name in names:
        signal.alarm(180)
        try:
            results[name] = scan_one(name, found[name])
        except _Timeout:
            results[name] = {"result": "not-run", "why": "over 180 s"}
        finally:
            signal.alarm(0)
        print(f"{name:40s} {results[name]['result']:8s} {results[name].get('why', '')[:150]}", flush=True)
    print(dict(Counter(r["result"] for r in results.values())))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, sort_keys=True))
    if args.markdown:
        Path(args.markdown).write_text(markdown(results))


# How a map shows a learned sink (MapCapture's ``sink`` option), said once in the survey's header.
SINKS = (
    'Learned attention sinks: `MapCapture` returns the weights the model applies to its values, the '
    "softmax over the keys and the sink without the sink's column, so a row sums to one minus the sink's "
    'share (what gpt-oss\'s own `output_attentions` returns); `MapCapture(sink="excluded")` returns the '
    "softmax over the keys alone (rows sum to one), what Granite SWA's returns. Each model is compared in"
    ' its own convention.'
)

RESULT_ORDER = ("exact", "partial", "wrong", "refused", "uniform", "not-run")


def markdown(results: dict) -> str:
    import transformers

    counts = Counter(r["result"] for r in results.values())
    lines = [
        "# Every architecture: survey",
        "",
        f"Written by `HF_HUB_OFFLINE=1 python tests/arch_scan.py --markdown docs/architectures.md` "
        f"(transformers {transformers.__version__}, torch {torch.__version__}). Each model type of transformers' "
        "registry whose modeling file dispatches through `AttentionInterface`, built from its default config "
        "with every size field shrunk, checked as `tests/test_architectures.py` checks the zoo: captured maps "
        "equal to eager `output_attentions` (1e-5), outputs under attach equal to outputs without. "
        "`not-run` says nothing about the seam: the generic config or inputs did not build or run "
        "(the reason is the error); `uniform` means attention too close to uniform for the comparison to "
        "mean anything. The curated tests (`tests/arch_zoo.py`) cover the families with hand-made configs.",
        "",
        SINKS,
        "",
        "| result | count |",
        "|---|---:|",
        *[f"| {name} | {counts.get(name, 0)} |" for name in RESULT_ORDER],
        "",
        "| model type | result | why |",
        "|---|---|---|",
    ]
    rank = {name: i for i, name in enumerate(RESULT_ORDER)}
    for name, r in sorted(results.items(), key=lambda item: (rank[item[1]["result"]], item[0])):
        why = r.get("why", "").replace("|", "\\|").replace("\n", " ")
        lines.append(f"| `{name}` | {r['result']} | {why[:160]} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
