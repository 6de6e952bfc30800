"""MoE kernels behind one interface (`interface.MoEKernels`), chosen by name.

    torch    plain torch, any device: the reference (kernels/reference.py)
    grouped  CUDA: Triton NVFP4 decode + torch._grouped_mm + Triton epilogues (kernels/grouped.py)
    cute     Hopper (sm_90): fused CuTe DSL kernels, NVFP4 decoded in the kernel (kernels/cute_moe.py)
    cute-det Hopper: both fused kernels, FC2's writing each routed row and a fixed-order finalize adding
             them (deterministic; the e2e default where its shapes fit)
    cute-fc1 Hopper: cute's FC1 with grouped's FC2 (deterministic; the default before cute-det, kept to
             reproduce results measured with it)
"""

from __future__ import annotations

import importlib.util

import torch

from .interface import ExpertWeights, MoEKernels, RoutingPlan, UnsupportedCase, WeightView, build_plan
from .nvfp4 import NVFP4Weights

KERNEL_NAMES = ("torch", "grouped", "cute", "cute-det", "cute-fc1")


def available_kernels(device: torch.device | str) -> list[str]:
    """The implementations that run on `device`."""
    device = torch.device(device)
    names = ["torch"]
    if device.type == "cuda" and importlib.util.find_spec("triton") is not None:
        names.append("grouped")
        hopper = torch.cuda.get_device_capability(device)[0] == 9
        if hopper and all(importlib.util.find_spec(m) is not None for m in ("cutlass", "quack")):
            names += ["cute", "cute-det", "cute-fc1"]
    return names


def default_kernels(device: torch.device | str, hidden: int, intermediate: int) -> str:
    """The fastest deterministic implementation that runs on `device` for experts of this hidden and
    intermediate size: cute-det where both fused kernels' tiles fit (its FC1 and FC2 beat grouped's at 8K
    to 32K tokens, and its finalize sums in a fixed order, which keeps DWDP bit-identical to replicated:
    results/h200x2/), cute-fc1 where only FC1's do, else grouped, else the torch reference."""
    names = available_kernels(device)
    if "cute-det" in names:
        from .cute_moe import check_shape

        def fits(fc1: bool) -> bool:
            try:
                check_shape(fc1, 2 * intermediate if fc1 else hidden, hidden if fc1 else intermediate)
                return True
            except UnsupportedCase:
                return False

        if fits(True):
            return "cute-det" if fits(False) else "cute-fc1"
    return "grouped" if "grouped" in names else "torch"


def get_kernels(name: str, device: torch.device | str, act_quant: bool = False) -> MoEKernels:
    """`act_quant`: NVFP4 quantise-dequantise of the expert GEMMs' activations (W4A4 numerics)."""
    device = torch.device(device)
    if name == "torch":
        from .reference import TorchReferenceKernels

        return TorchReferenceKernels(act_quant)
    if name == "grouped":
        if device.type != "cuda":
            raise ValueError("kernels 'grouped' run on CUDA GPUs only; use --kernels torch on CPU")
        from .grouped import GroupedTritonKernels

        return GroupedTritonKernels(act_quant)
    if name in ("cute", "cute-det", "cute-fc1"):
        if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] != 9:
            raise ValueError(f"kernels {name!r} run on Hopper (sm_90) GPUs only; use --kernels grouped or torch")
        from .fused import FusedCuteKernels, FusedDeterministicKernels, FusedFC1Kernels

        return {"cute": FusedCuteKernels, "cute-det": FusedDeterministicKernels, "cute-fc1": FusedFC1Kernels}[name](act_quant)
    raise ValueError(f"unknown kernels {name!r}; choose one of: {', '.join(KERNEL_NAMES)}")


__all__ = ["ExpertWeights", "KERNEL_NAMES", "MoEKernels", "NVFP4Weights", "RoutingPlan", "UnsupportedCase", "WeightView", "build_plan", "available_kernels", "default_kernels", "get_kernels"]
