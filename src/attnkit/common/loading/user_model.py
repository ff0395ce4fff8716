"""Your own model from the command line: ``module.path:factory`` with ``--checkpoint``, ``--config``, ``--tokenizer``.

    attnkit validate mymodels:build --checkpoint ckpt.pt --config cfg.json --tokenizer reference

- **MODEL** ``module.path:factory`` (or ``path/to/file.py:factory``): ``factory`` is a function or a
  class in that module that returns an ``nn.Module``; it is imported from the current directory
  or an installed package. Importing it runs that code: that is what the user asked for.
- **--config FILE**: JSON, YAML (with PyYAML installed) or a Python file (``FILE.py`` exposing
  ``config``, ``CONFIG``, ``cfg`` or ``Config``; ``FILE.py:NAME`` picks another name; a class is
  instantiated with no arguments, a function called). JSON and YAML arrive as a ``ConfigDict``:
  a dict whose keys are also attributes, so ``factory(config)`` works for code that reads
  ``config["n_embd"]`` and for code that reads ``config.n_embd``. Without ``--config``, a
  checkpoint's own ``model_args`` or ``config`` entry (nanoGPT saves ``model_args``) is used.
- **--checkpoint FILE**: a state dict in safetensors, or a ``.pt`` / ``.pth`` / ``.bin`` / ``.ckpt``
  file read with ``torch.load(weights_only=True)``: tensors and plain containers only, never
  pickled code (a pickle that needs more is refused with the way to re-save it). The wrappings
  ``{"model": ...}``, ``{"state_dict": ...}``, ``{"model_state_dict": ...}`` and the key prefixes
  ``module.`` (DDP) and ``_orig_mod.`` (``torch.compile``) are unwrapped. Missing keys,
  unexpected keys and shape mismatches are listed in one line.
- **--tokenizer**: a Hugging Face tokenizer directory, a built-in model's name (``reference``,
  ``minilm``), a hub name when a hub is reachable, or ``ids``: the text (``--text``,
  ``--text-file``) is then whitespace-separated token ids.

The model is wrapped in ``UserModel``, which gives attnkit's features the calling convention
they use for Hugging Face models (``model(input_ids=..., attention_mask=..., output_hidden_states=...)``
returning ``.logits``, ``.hidden_states``) and a ``config`` with the number of positions. The
forward gets the token ids as its first argument (and ``attention_mask`` if it takes one); a
model that returns only the last position's logits unless given targets (nanoGPT) is called with
the ids as ``targets`` / ``labels``, its loss unused.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import os
import pickle
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import Tensor, nn

from attnkit.common.loading.builtin import LoadedModel
from attnkit.errors import UserError

# module.path:factory, or path/to/file.py:factory
_SPEC = re.compile(r"^(?P<module>[A-Za-z_][\w.]*|[^:]+\.py):(?P<factory>[A-Za-z_][\w.]*)$")
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_STATE_DICT_KEYS = ("model", "state_dict", "model_state_dict", "module", "net", "weights")
_PREFIXES = ("module.", "_orig_mod.")
_CONFIG_NAMES = ("config", "CONFIG", "cfg", "Config")
_POSITION_KEYS = ("block_size", "n_positions", "max_position_embeddings", "max_seq_len", "max_seq_length",
                  "context_length", "seq_len", "n_ctx")
_LISTED = 3  # keys named in a mismatch message, per kind


def is_user_model_spec(name: str) -> bool:
    """Whether MODEL names a factory (``module.path:factory``) rather than a model name or directory."""
    return bool(_SPEC.match(name)) and not Path(name).exists()


class ConfigDict(dict):
    """A JSON / YAML config: a dict whose keys are also attributes (``cfg["n_embd"]`` and ``cfg.n_embd``)."""

    def __getattr__(self, key: str):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(f"the config has no '{key}'") from None

    @classmethod
    def of(cls, value):
        if isinstance(value, dict):
            return cls({k: cls.of(v) for k, v in value.items()})
        if isinstance(value, list):
            return [cls.of(v) for v in value]
        return value


# --------------------------------------------------------------------------- importing user code
def _import_module(module_name: str, spec: str):
    """Import the module part of MODEL, from a file path or from the current directory / installed packages."""
    if module_name.endswith(".py"):
        path = Path(module_name).expanduser()
        if not path.is_file():
            raise UserError(f"cannot import {spec}: {module_name} does not exist")
        name = f"attnkit_user_model_{path.stem}"
        file_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(file_spec)
        sys.modules[name] = module  # dataclasses and pickles look their module up here
        _run_user_code(lambda: file_spec.loader.exec_module(module), f"importing {module_name}")
        return module
    cwd = os.getcwd()
    if cwd not in sys.path:  # the console script does not put the current directory on the path
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and module_name.startswith(e.name):
            raise UserError(f"cannot import module '{module_name}' for {spec}: no such module in the current "
                            f"directory ({cwd}) or among installed packages") from e
        raise UserError(f"importing {module_name} failed: {_first_line(e)}") from e
    except Exception as e:  # noqa: BLE001 - the user's module raised while importing: their error, in one line
        raise UserError(f"importing {module_name} raised {_first_line(e)}") from e


def _run_user_code(fn, what: str):
    try:
        return fn()
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - user code: its failure is reported as theirs, in one line
        raise UserError(f"{what} raised {_first_line(e)}") from e


def _factory(spec: str):
    match = _SPEC.match(spec)
    module_name, factory_name = match["module"], match["factory"]
    module = _import_module(module_name, spec)
    obj = module
    for part in factory_name.split("."):
        if not hasattr(obj, part):
            own = [(n, v) for n, v in vars(module).items()
                   if callable(v) and not n.startswith("_") and getattr(v, "__module__", None) == module.__name__]
            callables = sorted(n for n, v in own if inspect.isfunction(v)) + sorted(n for n, v in own if inspect.isclass(v))
            listed = f" (it has {', '.join(callables[:8])})" if callables else ""
            raise UserError(f"module {module_name} has no '{factory_name}'{listed}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserError(f"{spec} is a {type(obj).__name__}, not a function or class that builds the model")
    return obj


def _call_factory(factory, config, spec: str) -> nn.Module:
    if config is None:
        try:
            required = [p.name for p in inspect.signature(factory).parameters.values()
                        if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        except (TypeError, ValueError):
            required = []
        if required:
            raise UserError(f"{spec} needs a config (its parameter '{required[0]}'): give --config FILE "
                            "(or a checkpoint that carries model_args)")
        model = _run_user_code(factory, spec)
    else:
        try:
            inspect.signature(factory).bind(config)
        except TypeError:
            raise UserError(f"{spec} takes no config argument, but --config (or the checkpoint's own config) gives one; "
                            "make the factory take one argument") from None
        except ValueError:  # a builtin without a signature: just call it
            pass
        model = _run_user_code(lambda: factory(config), spec)
    if not isinstance(model, nn.Module):
        raise UserError(f"{spec} returned an object of type {type(model).__name__}, not a torch.nn.Module")
    return model


# --------------------------------------------------------------------------- config
def load_config(path_spec: str):
    """The object ``--config`` names: JSON / YAML as a ``ConfigDict``, a Python file's config object."""
    file_part, _, name = path_spec.partition(":") if re.search(r"\.py:\w+$", path_spec) else (path_spec, "", "")
    path = Path(file_part).expanduser()
    if not path.exists():
        raise UserError(f"config file {file_part} does not exist")
    if path.is_dir():
        raise UserError(f"config {file_part} is a directory; give a .json, .yaml or .py file")
    suffix = path.suffix.lower()
    if suffix == ".py":
        module = _import_module(str(path), f"--config {path_spec}")
        names = (name,) if name else _CONFIG_NAMES
        found = next((n for n in names if hasattr(module, n)), None)
        if found is None:
            raise UserError(f"config file {file_part} defines none of {', '.join(names)}; "
                            f"name the object: --config {file_part}:NAME")
        value = getattr(module, found)
        if inspect.isclass(value) or inspect.isfunction(value):
            value = _run_user_code(value, f"--config {file_part}:{found}()")
        return value
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"config file {file_part} is not UTF-8 text") from None
    if suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise UserError(f"config file {file_part} is YAML, which needs PyYAML: pip install pyyaml "
                            "(or give the config as JSON)") from None
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise UserError(f"config file {file_part} is not valid YAML: {_first_line(e)}") from None
    else:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"config file {file_part} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
    if not isinstance(value, dict):
        raise UserError(f"config file {file_part} holds a {type(value).__name__}; a config is a mapping of names to values")
    return ConfigDict.of(value)


# --------------------------------------------------------------------------- checkpoint
def read_checkpoint(path_str: str) -> dict:
    """The checkpoint file's contents: safetensors, or ``torch.load(weights_only=True)``."""
    path = Path(path_str).expanduser()
    if not path.exists():
        raise UserError(f"checkpoint {path_str} does not exist")
    if path.is_dir():
        raise UserError(f"checkpoint {path_str} is a directory; give the .safetensors or .pt file")
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"checkpoint {path_str} is not a readable safetensors file: {_first_line(e)}") from None
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        needed = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if needed is None:  # not a pickle of objects at all: damaged, or another format
            detail = re.search(r"WeightsUnpickler error: \s*(.+)", str(e))
            raise UserError(f"cannot read checkpoint {path_str}: not a state dict saved by torch.save or safetensors"
                            f"{f' ({detail[1].strip()})' if detail else ''}") from None
        raise UserError(
            f"checkpoint {path_str} is a pickle that needs {needed[1]} to load, which torch.load(weights_only=True) "
            "refuses: attnkit does not run pickled code; re-save the weights alone with "
            "torch.save(model.state_dict(), 'ckpt.pt') (or as safetensors)"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise UserError(f"cannot read checkpoint {path_str}: {_first_line(e)} "
                        "(expected a state dict in safetensors or torch.save format)") from None


def _is_state_dict(value) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(v, Tensor) for v in value.values())


def state_dict_of(contents, path_str: str) -> dict[str, Tensor]:
    """The state dict inside a checkpoint's contents, unwrapped and without DDP / compile prefixes."""
    state = contents
    for _ in range(3):  # {"model": {"state_dict": ...}} at worst
        if _is_state_dict(state):
            break
        if not isinstance(state, dict):
            raise UserError(f"checkpoint {path_str} holds a {type(state).__name__}, not a state dict")
        key = next((k for k in _STATE_DICT_KEYS if isinstance(state.get(k), dict)), None)
        if key is None:
            keys = ", ".join(map(str, list(state)[:6]))
            raise UserError(f"checkpoint {path_str} holds no state dict: its keys are {keys}; expected tensors, or "
                            f"one of {', '.join(_STATE_DICT_KEYS)} holding them")
        state = state[key]
    if not _is_state_dict(state):
        raise UserError(f"checkpoint {path_str} holds no tensors")
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state


def checkpoint_config(contents):
    """The config a checkpoint carries itself (nanoGPT's ``model_args``), as a ``ConfigDict``, or None."""
    if isinstance(contents, dict) and not _is_state_dict(contents):
        for key in ("model_args", "config"):
            if isinstance(contents.get(key), dict):
                return ConfigDict.of(contents[key])
    return None


def _listed(keys: list[str]) -> str:
    more = f", ... {len(keys) - _LISTED} more" if len(keys) > _LISTED else ""
    return ", ".join(keys[:_LISTED]) + more


def load_weights(model: nn.Module, state: dict[str, Tensor], path_str: str, spec: str) -> None:
    """Load ``state`` into ``model`` strictly; a mismatch is one line listing what does not fit."""
    own = model.state_dict()
    # Tied weights (nanoGPT's lm_head and wte) are one tensor under two names; safetensors keeps one.
    names_of: dict[tuple, list[str]] = {}
    for k, v in own.items():
        if v.numel() > 0:
            names_of.setdefault((v.data_ptr(), tuple(v.shape), v.stride()), []).append(k)
    tied = {k: names for names in names_of.values() if len(names) > 1 for k in names}
    for k in [k for k in own if k not in state and any(t in state for t in tied.get(k, ()))]:
        state = {**state, k: state[next(t for t in tied[k] if t in state)]}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(own[k].shape)})"
              for k in own if k in state and state[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key{'s' if len(missing) != 1 else ''} ({_listed(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key{'s' if len(unexpected) != 1 else ''} ({_listed(unexpected)})")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch{'es' if len(shapes) != 1 else ''} ({_listed(shapes)})")
    if problems:
        raise UserError(f"checkpoint {path_str} does not fit the model {spec} builds: {'; '.join(problems)}; "
                        "is it this model's checkpoint, built with the same --config?")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise UserError(f"checkpoint {path_str} does not load into {spec}: {_first_line(e)}") from None


# --------------------------------------------------------------------------- tokenizer
class TokenIdsTokenizer:
    """``--tokenizer ids``: the text is whitespace-separated token ids (for models without a tokenizer).

    Implements the part of a Hugging Face tokenizer that attnkit uses. A word that is not an integer
    is refused, except a one-word text, which gives no ids (that is how attnkit asks which special
    tokens a tokenizer adds: none).
    """

    all_special_ids: list[int] = []
    eos_token_id = None

    def _encode(self, text: str) -> list[int]:
        words = text.split()
        ids = [int(w) for w in words if re.fullmatch(r"\d+", w)]
        if len(words) == 1 and not ids:
            return []  # validate asks which special tokens wrap a one-word text ("a"): none
        if len(ids) != len(words):
            bad = next(w for w in words if not re.fullmatch(r"\d+", w))
            raise UserError(f"--tokenizer ids reads the text as whitespace-separated token ids; '{bad[:20]}' is not one")
        return ids

    def __call__(self, text, add_special_tokens: bool = True, return_tensors=None, truncation=False, **_ignored):
        if isinstance(text, (list, tuple)):
            return {"input_ids": [self._encode(t) for t in text]}
        ids = self._encode(text)
        if return_tensors == "pt":
            ids_t = torch.tensor([ids], dtype=torch.long)
            return {"input_ids": ids_t, "attention_mask": torch.ones_like(ids_t)}
        return {"input_ids": ids}

    def decode(self, ids, **_ignored) -> str:
        return " ".join(str(int(i)) for i in ids)

    def convert_ids_to_tokens(self, i):
        return str(int(i))

    def __len__(self) -> int:
        return 0


def load_tokenizer(name: str):
    if name == "ids":
        return TokenIdsTokenizer()
    from attnkit.common.loading.builtin import BUILTIN_MODELS, resolve_model_path

    path = resolve_model_path(name) if name in BUILTIN_MODELS else name
    local = Path(path).expanduser()
    kwargs: dict = {}
    if local.exists():
        if not local.is_dir():
            raise UserError(f"--tokenizer {name} is a file; give the directory that holds tokenizer.json "
                            "(or vocab/merges files), a built-in model's name, or 'ids'")
        path = str(local)
    else:
        from attnkit.common.loading.hub import hub_offline_reason

        offline = hub_offline_reason()
        if offline is not None:
            kwargs = {"local_files_only": True}
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"cannot load a tokenizer from {name}: {_first_line(e)} (give an HF tokenizer directory, "
                        f"a built-in model's name ({', '.join(BUILTIN_MODELS)}) or 'ids')") from None
    try:
        usable = len(tokenizer("hello world", add_special_tokens=False)["input_ids"]) > 0
    except Exception:  # noqa: BLE001 - a tokenizer that cannot even do this is as good as none
        usable = False
    if not usable:
        raise UserError(f"--tokenizer {name} has no tokenizer files (tokenizer.json, vocab or merges)")
    return tokenizer


# --------------------------------------------------------------------------- the model as attnkit calls it
class UserOutput(SimpleNamespace):
    """What a Hugging Face model returns, as far as attnkit reads it: ``logits``, ``hidden_states``, ``out[0]``."""

    def __getitem__(self, i):
        return (self.logits,)[i]


def _logits_of(out, spec: str) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, dict) and isinstance(out.get("logits"), Tensor):
        return out["logits"]
    if isinstance(getattr(out, "logits", None), Tensor):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]  # nanoGPT's (logits, loss)
    raise UserError(f"{spec}'s forward returned a {type(out).__name__}; attnkit needs a tensor of logits "
                    "(or a tuple, dict or object whose first entry / .logits is one)")


class UserModel(nn.Module):
    """The user's model (``self.module``, the one child, which attnkit's attach looks through) called the
    way attnkit calls Hugging Face models: token ids in, ``.logits`` and ``.hidden_states`` out."""

    def __init__(self, module: nn.Module, spec: str, positions: int | None, user_config=None) -> None:
        super().__init__()
        self.module = module
        self.spec = spec
        self.config = SimpleNamespace(n_positions=positions, user_config=user_config)
        parameters = inspect.signature(module.forward).parameters
        self._takes_attention_mask = "attention_mask" in parameters
        # nanoGPT returns the last position's logits only, unless it is given targets: then it is
        # called with the input ids as targets (its loss is not used), once that is seen to happen.
        self._targets_keyword = next((k for k in ("targets", "labels") if k in parameters), None)
        self._pass_targets = False

    def _logits(self, input_ids: Tensor, kwargs: dict) -> Tensor:
        if self._pass_targets:
            return _logits_of(self.module(input_ids, **kwargs, **{self._targets_keyword: input_ids}), self.spec)
        logits = _logits_of(self.module(input_ids, **kwargs), self.spec)
        if (self._targets_keyword is not None and logits.dim() == 3 and logits.shape[1] == 1
                and input_ids.shape[1] > 1):
            self._pass_targets = True
            return self._logits(input_ids, kwargs)
        return logits

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, output_hidden_states: bool = False,
                **_ignored) -> UserOutput:
        kwargs = {"attention_mask": attention_mask} if self._takes_attention_mask and attention_mask is not None else {}
        if not output_hidden_states:
            return UserOutput(logits=self._logits(input_ids, kwargs), hidden_states=None)
        hidden: list[Tensor] = []
        handles = [m.register_forward_pre_hook(_keep_input(hidden, input_ids.shape)) for m in _attention_modules(self.module)]
        try:
            logits = self._logits(input_ids, kwargs)
        finally:
            for h in handles:
                h.remove()
        return UserOutput(logits=logits, hidden_states=tuple(hidden))


def _attention_modules(root: nn.Module) -> list[nn.Module]:
    """The attention modules the seam reaches, in module order (whichever adapter reaches them)."""
    from attnkit.seam.adapters import ADAPTERS

    chosen = {id(m) for adapter in ADAPTERS.values() for m in adapter.find(root)}
    return [m for m in root.modules() if id(m) in chosen]


def _keep_input(store: list[Tensor], ids_shape: torch.Size):
    """A pre-hook keeping the hidden states entering an attention module, when they are (B, T, D)."""

    def hook(_module, args) -> None:
        x = args[0] if args else None
        if isinstance(x, Tensor) and x.dim() == 3 and x.shape[:2] == ids_shape:
            store.append(x)

    return hook


def _positions(config, module: nn.Module) -> int | None:
    for source in (config, getattr(module, "config", None), module):
        for key in _POSITION_KEYS:
            value = source.get(key) if isinstance(source, dict) else getattr(source, key, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


@torch.no_grad()
def _kind(model: UserModel, vocab: int | None) -> str:
    """"causal-lm" when each position's output depends on earlier tokens only (checked: a change to the
    last token leaves the others' outputs exactly as they were) and has one logit per token id."""
    n = min(8, model.config.n_positions or 8)
    ids = torch.arange(1, n + 1).unsqueeze(0) % max(vocab or n + 1, 2)
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % max(vocab or n + 1, 2)
    try:
        a, b = model(ids).logits, model(changed).logits
    except (IndexError, RuntimeError) as e:
        raise UserError(f"{model.spec} cannot run on token ids: {_first_line(e)}") from None
    if a.dim() != 3 or a.shape[:2] != ids.shape:
        return "encoder"
    causal = torch.equal(a[:, :-1], b[:, :-1]) and not torch.equal(a[:, -1], b[:, -1])
    return "causal-lm" if causal and (vocab is None or a.shape[-1] >= vocab) else "encoder"


def load_user_model(spec: str, checkpoint: str | None = None, config: str | None = None,
                    tokenizer: str | None = None, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu"):
    """``module.path:factory`` built, loaded and wrapped for attnkit: a ``LoadedModel``."""
    if tokenizer is None:
        raise UserError(f"{spec} needs --tokenizer: a Hugging Face tokenizer directory, a built-in model's name "
                        "(e.g. reference), or 'ids' to read the text as token ids")
    # Inputs are read before any user code runs, so that a typo fails at once.
    contents = read_checkpoint(checkpoint) if checkpoint is not None else None
    state = state_dict_of(contents, checkpoint) if contents is not None else None
    cfg = load_config(config) if config is not None else checkpoint_config(contents)
    tok = load_tokenizer(tokenizer)
    factory = _factory(spec)
    module = _call_factory(factory, cfg, spec)
    if state is not None:
        load_weights(module, state, checkpoint, spec)
    module = module.to(device=device, dtype=dtype).eval()
    model = UserModel(module, spec, _positions(cfg, module), cfg).eval()
    vocab = len(tok) if len(tok) > 0 else None
    return LoadedModel(model=model, tokenizer=tok, name=spec, kind=_kind(model, vocab))


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    text = lines[0] if lines else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
