"""Resolve a MODEL argument to a loaded model and tokenizer.

A MODEL is, in this order: your own model as ``module.path:factory`` (``user_model.py``), a
built-in name (see ``BUILTIN_MODELS``), a local Hugging Face directory, or a hub id (only when a
hub is reachable). Every failure a user can cause becomes a
``UserError`` with one clear sentence.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from attnkit.common.loading.builtin import (BUILTIN_MODELS, DEFAULT_MODEL, SHIPPED_MODELS,  # noqa: F401 - the loader's names
                                            LoadedModel, resolve_model_path)
from attnkit.errors import UserError


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name.strip("/").split("/", 1)[-1] or Path(name).exists()


def load_model(
    name: str = DEFAULT_MODEL,
    dtype: torch.dtype | str = torch.float32,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    checkpoint: str | None = None,
    config: str | None = None,
    tokenizer: str | None = None,
    device: torch.device | str = "cpu",
    device_map: str | None = None,
) -> LoadedModel:
    """Load a built-in name, a local HF directory, a hub id, or your own model (``module.path:factory``
    with ``checkpoint``, ``config`` and ``tokenizer``: see ``attnkit.common.loading.user_model``), in eval mode.

    ``device`` is "auto", "cpu", "cuda[:N]" or "mps"; ``dtype`` a torch dtype, its name, or "auto" (see
    ``attnkit.common.loading.device``); ``device_map="auto"`` lets Accelerate place a Hugging Face model
    over GPUs and CPU instead of putting it whole on ``device``."""
    from attnkit.common.loading.device import DEVICE_MAPS, resolve_device, resolve_dtype
    from attnkit.common.loading.user_model import is_user_model_spec, load_user_model

    target = resolve_device(device)
    if device_map is not None and device_map not in DEVICE_MAPS:
        raise UserError(f"cannot read --device-map '{device_map}': use {' or '.join(DEVICE_MAPS)}")
    if is_user_model_spec(name):
        if device_map is not None:
            raise UserError("--device-map places a Hugging Face model; your own model goes whole on --device")
        return load_user_model(name, checkpoint=checkpoint, config=config, tokenizer=tokenizer,
                               dtype=resolve_dtype(dtype, target), device=target)
    given = [option for option, value in (("--checkpoint", checkpoint), ("--config", config), ("--tokenizer", tokenizer))
             if value is not None]
    if given:
        raise UserError(f"{', '.join(given)} go{'es' if len(given) == 1 else ''} with a MODEL of your own, "
                        f"module.path:factory; '{name}' brings its own weights, config and tokenizer")
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    from safetensors import SafetensorError

    path = resolve_model_path(name)
    local = Path(path).expanduser()
    hub_kwargs: dict = {}
    offline: str | None = None  # why the hub cannot be asked, when it cannot
    if local.exists():
        if not local.is_dir():
            raise UserError(f"model path {path} is a file; give the directory that holds config.json")
        if not (local / "config.json").exists():
            raise UserError(f"{path} is not a Hugging Face model directory (no config.json)")
        path = str(local)
    elif _looks_like_path(name) or name.count("/") > 1:
        raise UserError(f"model path {name} does not exist{_did_you_mean(name)}")
    else:
        from attnkit.common.loading.hub import hub_offline_reason

        offline = hub_offline_reason()
        if offline is not None:
            # Only the local hub cache can answer; asking the network would retry for ~25 s.
            hub_kwargs = {"local_files_only": True}

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, **hub_kwargs)
    except (OSError, ValueError) as e:
        if local.exists():
            raise UserError(f"cannot read the model config in {path}: {_first_line(e)}") from e
        builtins = ", ".join(BUILTIN_MODELS)
        where = (f"not in the local hub cache ({offline})" if hub_kwargs
                 else f"not found on the model hub ({_first_line(e)})")
        raise UserError(
            f"cannot find model '{name}'{_did_you_mean(name)}: not a built-in name ({builtins}), "
            f"not a local directory, and {where}"
        ) from e

    is_causal_lm = any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in (config.architectures or []))
    auto = AutoModelForCausalLM if is_causal_lm else AutoModel
    dtype = resolve_dtype(dtype, target, getattr(config, "dtype", None) or getattr(config, "torch_dtype", None))
    try:
        kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
        if device_map is not None:
            kwargs["device_map"] = device_map
        model = auto.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs, **hub_kwargs)
        if device_map is None:
            model = model.to(target)
    except torch.OutOfMemoryError as e:
        from attnkit.common.loading.device import out_of_memory_message

        raise UserError(f"loading {name} on {target}: {out_of_memory_message(e)}") from e
    except SafetensorError as e:
        raise UserError(f"the model weights in {path} are damaged or truncated "
                        f"(model.safetensors: {_first_line(e)}); download or copy them again") from e
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"cannot load the model weights from {path}: {_first_line(e)}") from e
    model.eval()
    if local.exists() and (local / "gate_config.json").exists():
        from attnkit.gate.io import load_gates

        load_gates(model, local)  # a directory `attnkit gate` wrote: the model and its trained gates
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **hub_kwargs)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"cannot load a tokenizer from {path}: {_first_line(e)}") from e
    if not _tokenizes(tokenizer):
        # transformers 5 builds an empty tokenizer from a directory without tokenizer files: every
        # text would become zero tokens (or the model would run on token 0).
        raise UserError(f"{path} has no tokenizer (no tokenizer.json, vocab or merges files); "
                        f"copy the tokenizer files of the model into it")
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, kind="causal-lm" if is_causal_lm else "encoder")


def _tokenizes(tokenizer) -> bool:
    """Does the tokenizer turn plain English into at least one token?"""
    try:
        return len(tokenizer("hello world", add_special_tokens=False)["input_ids"]) > 0
    except Exception:  # noqa: BLE001 - a tokenizer that cannot even do this is as good as none
        return False


def _did_you_mean(name: str) -> str:
    """' (did you mean 'reference'?)' for a near miss of a built-in name, else ''."""
    import difflib

    close = difflib.get_close_matches(Path(name).name.lower(), BUILTIN_MODELS, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
