"""MoE kernels behind one interface (`interface.MoEKernels`), chosen by name.

    torch    plain torch, any device: the reference (kernels/reference.py)
    grouped  CUDA: Triton NVFP4 decode + torch._grouped_mm + Triton epilogues (kernels/grouped.py)
    cute     Hopper (sm_90): fused CuTe DSL kernels, NVFP4 decoded in the kernel (kernels/cute_moe.py)
"""

from __future__ import annotations

import importlib.util

import torch

from .interface import ExpertWeights, MoEKernels, RoutingPlan, WeightView, build_plan
from .nvfp4 import NVFP4Weights

KERNEL_NAMES = ("torch", "grouped", "cute")


def available_kernels(device: torch.device | str) -> list[str]:
    """The implementations that run on `device`."""
    device = torch.device(device)
    names = ["torch"]
    if device.type == "cuda" and importlib.util.find_spec("triton") is not None:
        names.append("grouped")
        hopper = torch.cuda.get_device_capability(device)[0] == 9
        if hopper and all(importlib.util.find_spec(m) is not None for m in ("cutlass", "quack")):
            names.append("cute")
    return names


def default_kernels(device: torch.device | str) -> str:
    """grouped on CUDA, else torch. Not the fused cute kernels: their FC1 beats grouped but their FC2 does
    not at e2e's 32K-token batches, e2e with them measured level with grouped, and their FC2 adds a
    token's k rows with atomics in no fixed order, which moved DWDP's logits 15% away from replicated's
    in the 27-layer random model (results/h200x2/kernels_h200x2.csv, e2e_cute_h200x2.csv)."""
    return "grouped" if "grouped" in available_kernels(device) else "torch"


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
    if name == "cute":
        if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] != 9:
            raise ValueError("kernels 'cute' run on Hopper (sm_90) GPUs only; use --kernels grouped or torch")
        from .fused import FusedCuteKernels

        return FusedCuteKernels(act_quant)
    raise ValueError(f"unknown kernels {name!r}; choose one of: {', '.join(KERNEL_NAMES)}")


__all__ = ["ExpertWeights", "KERNEL_NAMES", "MoEKernels", "NVFP4Weights", "RoutingPlan", "WeightView", "build_plan", "available_kernels", "default_kernels", "get_kernels"]
