"""Which torch build ``make setup`` installs on this machine: pip arguments on stdout, the reason on stderr.

``torch==2.13.0`` names both builds: PyPI's wheel for Linux x86_64 is the CUDA build (about 6 GB installed with its
``nvidia-*`` and ``cuda-*`` packages), PyTorch's CPU index and local wheel folders hold ``2.13.0+cpu`` (about 0.2 GB
download), and pip takes whichever the places it looks offer (a ``+cpu`` local label sorts above the plain version).
So the pin alone does not decide; this script does, in this order:

1. ``TORCH`` / ``TORCH_INDEX`` given by the user (``make setup TORCH=... TORCH_INDEX=...``): exactly that;
2. a GPU (``nvidia-smi -L`` lists one): the CUDA build, PyPI's default;
3. no GPU, and pip already resolves the pin to a CPU build (a local wheel in pip's configured find-links, or a
   platform whose PyPI wheel is CPU-only): that;
4. no GPU, and PyTorch's CPU wheel index answers within a few seconds: the CPU build from it;
5. otherwise PyPI's default build, with a one-line note of its size and of the override.

Usage (what the Makefile runs, with the virtual environment's Python, after upgrading its pip)::

    TORCH=torch==2.13.0 TORCH_INDEX= TORCH_ORIGIN=file .venv/bin/python tools/torch_choice.py
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from urllib.parse import unquote, urlparse

DEFAULT_TORCH = "torch==2.13.0"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
CUDA_INDEX = "https://download.pytorch.org/whl/cu130"  # the CUDA version of PyPI's torch 2.13.0 wheel
CUDA_SIZE = "about 6 GB installed with its nvidia-* and cuda-* packages"


def gpu_names() -> list[str]:
    """GPUs that ``nvidia-smi -L`` lists; [] without the tool, a driver, or a GPU."""
    try:
        done = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.split(":", 1)[1].split("(")[0].strip() for line in done.stdout.splitlines()
            if done.returncode == 0 and line.startswith("GPU ")]


def resolve(spec: str, index: str | None = None) -> tuple[str, str] | None:
    """``(version, location)`` of the torch that pip would install for ``spec`` (a dry run, nothing installed)."""
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--ignore-installed", "--quiet",
           "--report", "-", *(["--index-url", index] if index else []), spec]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        item = json.loads(done.stdout)["install"][0]
    except (OSError, subprocess.TimeoutExpired, ValueError, KeyError, IndexError):
        return None
    url = urlparse(item["download_info"]["url"])
    where = unquote(url.path).rsplit("/", 1)[0] if url.scheme == "file" else url.netloc
    return item["metadata"]["version"], where


def reachable(url: str, timeout: float = 5.0) -> bool:
    """Whether ``url`` answers an HTTP HEAD request within ``timeout`` seconds."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout) as response:
            return response.status < 400
    except (OSError, ValueError):
        return False


def choose(spec: str, index: str, user_set: bool, gpus: list[str], machine: str,
           resolve: Callable[[str, str | None], tuple[str, str] | None],
           reachable: Callable[[str], bool]) -> tuple[list[str], str]:
    """The pip arguments that install torch here, and one line that says which build and why."""
    index_args = ["--index-url", index] if index else []
    if user_set or index:
        return [*index_args, spec], f"torch: {spec}{' from ' + index if index else ''} (your choice: TORCH/TORCH_INDEX)"
    found = resolve(spec, None)
    found_text = f"{found[0]} from {found[1]}" if found else "as pip resolves it"
    if gpus:
        line = f"torch: the CUDA build for the GPU(s) nvidia-smi lists ({', '.join(gpus)}): {spec}, {found_text}"
        if found and "+cpu" in found[0]:
            line += (f"; but that is a CPU build that pip's configured wheel folder offers: for the CUDA build run "
                     f"make setup TORCH_INDEX={CUDA_INDEX}")
        return [spec], line
    if found and ("+cpu" in found[0] or machine != "Linux-x86_64"):
        return [spec], f"torch: the CPU build (no GPU: nvidia-smi lists none): {found_text}"
    if reachable(CPU_INDEX + "/torch/"):
        cpu = resolve(spec, CPU_INDEX)
        return (["--index-url", CPU_INDEX, spec],
                f"torch: the CPU build (no GPU: nvidia-smi lists none) from PyTorch's CPU wheel index: "
                f"{cpu[0] if cpu else spec} from {CPU_INDEX}")
    return [spec], (f"torch: no GPU, but no CPU build is within reach (no local CPU wheel for pip, {CPU_INDEX} "
                    f"unreachable), so {spec} is PyPI's default, the CUDA build ({found_text}; {CUDA_SIZE}); "
                    f"to avoid it: make setup TORCH=/path/to/torch-...+cpu-....whl or TORCH_INDEX=<a CPU wheel index>")


def main() -> int:
    spec = os.environ.get("TORCH") or DEFAULT_TORCH
    index = os.environ.get("TORCH_INDEX", "").strip()
    # make's $(origin TORCH): "file" or "undefined" when the Makefile's default is in force
    user_set = os.environ.get("TORCH_ORIGIN", "file") not in ("file", "undefined", "default")
    machine = f"{platform.system()}-{platform.machine()}"
    args, line = choose(spec, index, user_set, gpu_names(), machine, resolve, reachable)
    print(line, file=sys.stderr)
    print(" ".join(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
