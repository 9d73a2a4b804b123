"""Fast CPU matmuls on Linux: re-launch with the system OpenBLAS preloaded.

The ``mlx[cpu]`` wheel links a reference BLAS (about 5–8 GFLOP/s on 2 cores here); Debian's
``libopenblas0-pthread`` preloaded gives 60–130 GFLOP/s for the same fp32 matmul, i.e. 10–20×
faster training on the CPU. A library can only be preloaded at process start, so the commands
re-execute themselves once with ``LD_PRELOAD`` set. Set ``MLX_LORA_NO_OPENBLAS=1`` to opt out.
On macOS nothing happens: MLX uses Metal and Accelerate there.
"""

from __future__ import annotations

import ctypes.util
import os
import platform
import sys
from pathlib import Path

OPT_OUT = "MLX_LORA_NO_OPENBLAS"
_CANDIDATES = [
    "/usr/lib/{arch}-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/{arch}-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
]


def find_openblas() -> str | None:
    """Path of a system OpenBLAS, or None."""
    arch = platform.machine()
    for pattern in _CANDIDATES:
        path = pattern.format(arch=arch)
        if Path(path).is_file():
            return path
    name = ctypes.util.find_library("openblas")
    return name if name and Path(name).is_absolute() else None


def preloaded() -> bool:
    return "openblas" in os.environ.get("LD_PRELOAD", "")


def relaunch_env() -> dict[str, str] | None:
    """The environment to re-launch with, or None when nothing would change."""
    if sys.platform != "linux" or os.environ.get(OPT_OUT) or preloaded():
        return None
    lib = find_openblas()
    if lib is None:
        return None
    env = dict(os.environ)
    env["LD_PRELOAD"] = f"{lib}:{env['LD_PRELOAD']}" if env.get("LD_PRELOAD") else lib
    return env


def advice() -> str | None:
    """One line for Linux users without OpenBLAS (printed by the commands, once)."""
    if sys.platform != "linux" or os.environ.get(OPT_OUT) or preloaded() or find_openblas():
        return None
    return (
        "tip: CPU matmuls use the slow reference BLAS of the mlx[cpu] wheel; "
        "`sudo apt-get install libopenblas0-pthread` makes training 10-20x faster (used "
        "automatically)"
    )


def maybe_relaunch() -> None:
    """Replace this process by the same command with OpenBLAS preloaded (Linux CPU only)."""
    env = relaunch_env()
    if env is None:
        tip = advice()
        if tip:
            print(tip, file=sys.stderr)
        return
    env[OPT_OUT] = "1"  # never loop, even if the preload silently fails
    argv = list(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv[1:]], env)
