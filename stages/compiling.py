"""torch.compile needs a C++ compiler where it runs on the CPU: its kernels there are C++ that it
builds at the first compiled call. Without one that first call fails deep inside torch (in a Ray
actor, after the prompt was encoded); `require_compiler` says so when the model is set up instead,
naming the setting that asked for compilation.
"""

from __future__ import annotations

import torch


class CompilerMissing(RuntimeError):
    """torch.compile was asked for on the CPU and torch finds no working C++ compiler."""


def require_compiler(device: torch.device | str, setting: str) -> None:
    """Raises `CompilerMissing` naming `setting` (e.g. "stages.base.compile") when compiled code would
    run on the CPU `device` and torch's inductor finds no C++ compiler (it tries $CXX, else g++;
    clang++ on macOS). GPUs need none: their kernels are Triton."""
    if torch.device(device).type != "cpu":
        return
    try:  # the search torch itself runs, and its error (private modules, so guarded)
        from torch._inductor import config, exc
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:  # a torch laid out otherwise names a missing compiler at the first call
        return
    try:
        get_cpp_compiler()
    except exc.InvalidCxxCompiler:
        search = config.cpp.cxx if isinstance(config.cpp.cxx, (list, tuple)) else (config.cpp.cxx,)
        tried = [name for name in search if name is not None]
        raise CompilerMissing(
            f"{setting}=true compiles C++ kernels on the CPU, and torch finds no working C++ compiler "
            f"(it tried {', '.join(tried)}; the CXX environment variable names another): install one "
            f"(e.g. `apt install g++`) or set {setting}=false"
        ) from None
