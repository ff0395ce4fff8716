"""attnkit's C++ kernels: each built once per machine by ``torch.utils.cpp_extension`` and cached.

    STATS = NativeKernel("qk_stats", Path(__file__).with_name("qk_stats.cpp"), "attnkit", "statistics kernel",
                         headers=(VEC_MATH,))
    ops = STATS.load()          # torch.ops.attnkit, or None (after one RuntimeWarning) where it cannot be built

A source file registers its operators with ``TORCH_LIBRARY(<namespace>, m)`` (one namespace a
file: torch allows one ``TORCH_LIBRARY`` per namespace). It is compiled with ``-O3 -march=native``:
it runs where it is built, so it uses that machine's vector width (AVX-512, AVX2, or none). The
build (~10 s of CPU) is cached in torch's extensions directory (``TORCH_EXTENSIONS_DIR``) under a
name that digests the source, the flags, torch, Python and the CPU; later processes load it in
under a second. Where it cannot be built or loaded, ``load`` returns None after one RuntimeWarning
and callers take their eager path. A build started by ``load`` is announced first by one
``KernelBuildNotice`` (a warning; the CLI shows a status line instead, ``load(announce=False)``).
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import threading
import warnings
from pathlib import Path

import torch

FLAGS = ["-O3", "-march=native"]
VEC_MATH = Path(__file__).with_name("vec_math.h")  # the vector math the kernels share (included by relative path)


class KernelBuildNotice(UserWarning):
    """attnkit is building one of its C++ kernels for this machine: once, later runs load the build."""


class NativeKernel:
    """One C++ source file and its operators under ``torch.ops.<namespace>``, built on first use."""

    def __init__(self, name: str, source: Path, namespace: str, what: str, headers: tuple[Path, ...] = (),
                 build_seconds: int = 10) -> None:
        # headers: the files the source includes by relative path (part of the build's digest);
        # build_seconds: about how long a build takes (what the notice of a build says)
        self.name, self.source, self.namespace, self.what, self.headers = name, source, namespace, what, headers
        self.build_seconds = build_seconds
        self._ops = None
        self._failed: str | None = None
        self._lock = threading.Lock()

    def build_name(self) -> str:
        """The build's name: a digest of what the binary depends on (the source, the flags, torch,
        Python, and this CPU, as ``-march=native`` targets it), so that a cached build is only
        reused where it was made for."""
        cpu = platform.processor()
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:  # Linux: the model and its instruction sets
                cpu = "".join(line for line in f.read(1 << 16).splitlines(True)
                              if line.startswith(("model name", "flags")))[:8192]
        except OSError:
            pass
        code = [p.read_text(encoding="utf-8") for p in (self.source, *self.headers)]
        key = "\n".join([*code, " ".join(FLAGS), torch.__version__, sys.version,
                         platform.machine(), cpu])
        return f"attnkit_{self.name}_" + hashlib.sha256(key.encode()).hexdigest()[:16]

    def load(self, announce: bool = True):
        """``torch.ops.<namespace>`` with the kernel's operators, building it on first use (after a
        ``KernelBuildNotice`` when ``announce``); None (after one warning) where it cannot be. A
        build made before is loaded directly (torch's extension builder, whose import alone costs
        a cold process ~4 MiB and a fraction of a second, is only imported to build)."""
        if self._ops is not None or self._failed is not None:
            return self._ops
        with self._lock:
            if self._ops is None and self._failed is None:
                try:
                    name = self.build_name()
                    directory = build_dir(name)
                    built = directory / f"{name}.so"
                    if built.is_file():
                        torch.ops.load_library(str(built))
                    else:
                        if announce:  # a build takes seconds, inside whatever call first needs the kernel
                            warnings.warn(f"attnkit: building the C++ {self.what} for this CPU (once per machine, "
                                          f"about {self.build_seconds} s)", KernelBuildNotice, stacklevel=3)
                        from torch.utils import cpp_extension

                        directory.mkdir(parents=True, exist_ok=True)
                        cpp_extension.load(
                            name=name,
                            sources=[str(self.source)],
                            extra_cflags=FLAGS,
                            build_directory=str(directory),
                            is_python_module=False,  # registers torch.ops.<namespace> (no pybind11: a faster build)
                            verbose=bool(os.environ.get("ATTNKIT_KERNEL_VERBOSE")),
                        )
                    self._ops = getattr(torch.ops, self.namespace)
                except Exception as exc:  # noqa: BLE001 - no compiler, no ninja, a build error: stay eager
                    last = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
                    self._failed = f"{type(exc).__name__}: {last}"
                    warnings.warn(f"attnkit: the C++ {self.what} is unavailable ({self._failed}); "
                                  "using the eager kernel", RuntimeWarning, stacklevel=3)
        return self._ops

    def failure(self) -> str | None:
        """Why the kernel could not be built or loaded, once ``load`` has tried; else None."""
        return self._failed

    def needs_build(self) -> bool:
        """Whether ``load`` would build the kernel: nothing loaded or tried yet, no build for this machine."""
        if self._ops is not None or self._failed is not None:
            return False
        name = self.build_name()
        return not (build_dir(name) / f"{name}.so").is_file()


def build_dir(name: str) -> Path:
    """Where a build lives: under ``TORCH_EXTENSIONS_DIR`` (torch's own setting), else ~/.cache/torch_extensions."""
    base = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions")
    return Path(base) / name


__all__ = ["FLAGS", "KernelBuildNotice", "NativeKernel", "build_dir"]
