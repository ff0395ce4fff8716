"""Arguments and loading shared by subcommands."""

from __future__ import annotations

import argparse
import os
import shlex
from pathlib import Path

from attnkit.common.loading.builtin import BUILTIN_MODELS, DEFAULT_MODEL
from attnkit.errors import UserError

DTYPES = ("float32", "float16", "bfloat16")  # names of torch dtypes (kept in step with common/loading/device.py)


def add_model_argument(p: argparse.ArgumentParser) -> None:

    names = ", ".join(BUILTIN_MODELS)
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"built-in name ({names}), local Hugging Face directory, hub id, or your own model as "
                   f"module.path:factory (imported from the current directory or an installed package: that runs "
                   f"its code) (default: {DEFAULT_MODEL})")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a hub model's own code to run")
    add_device_options(p)
    add_own_model_options(p)


def add_device_options(p: argparse.ArgumentParser) -> None:
    """--device, --dtype, --device-map: where the model runs and in which number format."""
    where = p.add_argument_group("device and dtype")
    where.add_argument("--device", default="cpu", metavar="auto|cpu|cuda[:N]|mps",
                       help="where the model runs; auto: CUDA if present, else MPS, else the CPU; under torchrun, auto and "
                       "cuda mean each process's own GPU, cuda:LOCAL_RANK (default: cpu)")
    where.add_argument("--dtype", choices=("auto",) + DTYPES, default="auto",
                       help="dtype to run the model in; auto: the checkpoint's own dtype on a GPU, float32 on the CPU "
                       "(default: auto)")
    where.add_argument("--device-map", choices=("auto",), default=None,
                       help="auto: Accelerate spreads a Hugging Face model too large for one device over GPUs and CPU")


def load_options(args: argparse.Namespace) -> dict:
    """The ``load_model`` keywords for --device, --dtype and --device-map, and the own-model options."""
    return {"device": getattr(args, "device", "cpu"), "dtype": getattr(args, "dtype", "auto"),
            "device_map": getattr(args, "device_map", None), **model_options(args)}


def add_own_model_options(p: argparse.ArgumentParser) -> None:
    """--checkpoint, --config, --tokenizer: what a MODEL of the user's own (module.path:factory) needs."""
    own = p.add_argument_group("your own model (MODEL as module.path:factory)")
    own.add_argument("--checkpoint", metavar="FILE",
                     help="state dict to load: .safetensors, or .pt/.pth read with torch.load(weights_only=True) — "
                     "tensors only, pickled code is never run ({'model': ...}, {'state_dict': ...}, 'module.' and "
                     "'_orig_mod.' prefixes unwrapped)")
    own.add_argument("--config", metavar="FILE",
                     help="config passed to the factory: JSON, YAML, or a .py file exposing config/CONFIG/cfg/Config "
                     "(FILE.py:NAME for another name); default: the checkpoint's own model_args/config, if any")
    own.add_argument("--tokenizer", metavar="DIR|NAME|ids",
                     help="Hugging Face tokenizer directory, built-in model name, or 'ids': the text is "
                     "whitespace-separated token ids")


def model_options(args: argparse.Namespace) -> dict:
    """The ``load_model`` keywords for a MODEL of the user's own (None where not given)."""
    return {"checkpoint": getattr(args, "checkpoint", None), "config": getattr(args, "config", None),
            "tokenizer": getattr(args, "tokenizer", None)}


def model_flags(args: argparse.Namespace) -> str:
    """The own-model options as they were given, for commands the report suggests next."""
    given = [(flag, value) for flag, value in (("--checkpoint", getattr(args, "checkpoint", None)),
                                                ("--config", getattr(args, "config", None)),
                                                ("--tokenizer", getattr(args, "tokenizer", None))) if value is not None]
    return " ".join(f"{flag} {shlex.quote(value)}" for flag, value in given)


def read_text(text: str | None, text_file: str | None) -> str | None:
    if text is not None and text_file is not None:
        raise UserError("give --text or --text-file, not both")
    if text_file is None:
        return text
    path = Path(text_file)
    if not path.exists():
        raise UserError(f"text file {text_file} does not exist")
    if path.is_dir():
        raise UserError(f"{text_file} is a directory; give a text file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{text_file} is not UTF-8 text") from e


def parse_int_list(spec: str | None, what: str) -> list[int] | None:
    """'0,2,5-7' -> [0, 2, 5, 6, 7]."""
    if spec is None:
        return None
    out: list[int] = []
    try:
        for part in spec.split(","):
            part = part.strip()
            if "-" in part:
                a, b = part.split("-", 1)
                first, last = int(a), int(b)
                if last < first:
                    raise UserError(f"{what} range '{part}' runs backwards; write it low-high, e.g. {last}-{first}")
                out.extend(range(first, last + 1))
            elif part:
                out.append(int(part))
    except ValueError as e:
        raise UserError(f"cannot read {what} '{spec}': use numbers from 0 like 0,2,5-7") from e
    if not out:
        raise UserError(f"cannot read {what} '{spec}': use numbers from 0 like 0,2,5-7")
    if any(x < 0 for x in out):
        raise UserError(f"{what} are numbered from 0")
    return out


def check_outputs(**targets: str | None) -> None:
    """Refuse report paths that cannot be written, before a run that may take minutes.

    ``targets`` maps an option name (``json``, ``html``, ``plot``) to its path; ``-`` (stdout)
    is only meaningful for ``json``.
    """
    from attnkit.common.io import check_writable

    for option, target in targets.items():
        if target is None or (target == "-" and option == "json"):
            continue
        check_writable(target, f"--{option}")
    plot = targets.get("plot")
    if plot is not None:
        suffix = Path(plot).suffix.lower()
        if suffix != ".png":
            raise UserError(f"--plot writes a PNG image; give a path ending in .png, not {plot}")


def check_positive(value: int | None, option: str, minimum: int = 1) -> None:
    """``None`` means "not given"; anything given must be at least ``minimum`` (0 is not "default")."""
    if value is not None and value < minimum:
        raise UserError(f"{option} must be at least {minimum}, got {value}")


def offline_by_default() -> None:
    """No hub is reachable on most machines attnkit runs on: fail fast instead of retrying a network."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def build_stats_kernels(model, enabled: bool = True) -> None:
    """Build the single-pass statistics kernel for this machine before a run of ``model`` that uses
    it, under a spinner that says so (once per machine and CPU; afterwards the build is loaded)."""
    from attnkit.common.progress import stderr_status
    from attnkit.metrics.fused import build_qk_kernels, qk_kernels_to_build

    device = next((p.device for p in model.parameters()), "cpu")
    names = qk_kernels_to_build(device)
    if names:
        with stderr_status("building the statistics kernel for this CPU (once per machine, about 10 s)",
                           enabled=enabled):
            build_qk_kernels(names)
