"""NVFP4: 4-bit e2m1 values, one e4m3 scale per 16 consecutive k, one fp32 global scale per expert.

Layout of a weight stack `[E, N, K]` (E experts, N output rows, K the reduction dim):

    packed        uint8          [E, N, K/2]   two e2m1 codes per byte, low nibble = even k
    block_scale   float8_e4m3fn  [E, N, K/16]  per-16 scale, already multiplied by the global scale
    global_scale  float32        [E]           448 * 6 / amax(expert)

    w[e, n, k] ~= e2m1(code) * block_scale[e, n, k // 16] / global_scale[e]

The product e2m1 x e4m3 needs at most 2 + 4 = 6 significant bits, so `decode` (which leaves the global
scale out) is exact in bf16: kernels decode to bf16, run bf16 MMA, and divide by the global scale in
the epilogue. NVLink moves exactly these bytes: 0.5 B per weight plus 1/16 B of scale.

That is the `rows` layout. A kernel set may reorder the bytes of each expert once, when the model is
built (`prepare_experts`), into the order its threads read them (the Hopper CuTe DSL kernels' fragment
order); the tensors keep their shapes and sizes, so arenas and NVLink copies move them unchanged, and
`layout` names the order so that a kernel never reads bytes it cannot interpret.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

E2M1_MAX = 6.0
E4M3_MAX = 448.0
BLOCK = 16
ROWS = "rows"  # the layout above

# e2m1 magnitudes by code (bit 3 is the sign): 0, 0.5, 1, 1.5, 2, 3, 4, 6.
E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
# Midpoints between consecutive magnitudes: rounding thresholds.
_E2M1_MIDPOINTS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])


@dataclass
class NVFP4Weights:
    """A stack of E experts' weights `[E, N, K]` in NVFP4 (see the module docstring for the layout)."""

    packed: torch.Tensor
    block_scale: torch.Tensor
    global_scale: torch.Tensor
    layout: str = ROWS  # the byte order of packed and block_scale within each expert (module docstring)

    def __post_init__(self) -> None:
        e, n, half_k = self.packed.shape
        check_k(2 * half_k)
        if self.packed.dtype != torch.uint8:
            raise TypeError(f"packed must be uint8, got {self.packed.dtype}")
        if self.block_scale.dtype != torch.float8_e4m3fn or tuple(self.block_scale.shape) != (e, n, half_k * 2 // BLOCK):
            raise ValueError(
                f"block_scale must be float8_e4m3fn of shape {(e, n, half_k * 2 // BLOCK)}, "
                f"got {self.block_scale.dtype} {tuple(self.block_scale.shape)}"
            )
        if self.global_scale.dtype != torch.float32 or tuple(self.global_scale.shape) != (e,):
            raise ValueError(f"global_scale must be float32 of shape ({e},), got {self.global_scale.dtype} {tuple(self.global_scale.shape)}")

    @property
    def num_experts(self) -> int:
        return self.packed.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        e, n, half_k = self.packed.shape
        return e, n, half_k * 2

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.packed, self.block_scale, self.global_scale

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def experts(self, start: int, stop: int) -> NVFP4Weights:
        """Experts [start, stop) as views (no copy)."""
        return NVFP4Weights(self.packed[start:stop], self.block_scale[start:stop], self.global_scale[start:stop], self.layout)

    def to(self, device: torch.device | str) -> NVFP4Weights:
        return NVFP4Weights(*(t.to(device) for t in self.tensors()), self.layout)

    @staticmethod
    def empty(num_experts: int, n: int, k: int, device: torch.device | str = "cpu") -> NVFP4Weights:
        check_k(k)
        return NVFP4Weights(
            torch.empty(num_experts, n, k // 2, dtype=torch.uint8, device=device),
            torch.empty(num_experts, n, k // BLOCK, dtype=torch.float8_e4m3fn, device=device),
            torch.empty(num_experts, dtype=torch.float32, device=device),
        )

    @staticmethod
    def cat(parts: list[NVFP4Weights]) -> NVFP4Weights:
        """Expert stacks (of one layout) one after another."""
        layouts = {p.layout for p in parts}
        if len(layouts) != 1:
            raise ValueError(f"cannot concatenate expert stacks of different layouts: {sorted(layouts)}")
        return NVFP4Weights(*(torch.cat(ts) for ts in zip(*(p.tensors() for p in parts))), layouts.pop())

    @staticmethod
    def nbytes_per_expert(n: int, k: int) -> int:
        return n * k // 2 + n * k // BLOCK + 4


def check_k(k: int) -> None:
    if k % BLOCK:
        raise ValueError(f"NVFP4 needs the reduction dim K to be a multiple of {BLOCK}, got K={k}")


def check_layout(w, layout: str, user: str) -> None:
    """Refuse weights (NVFP4Weights or a WeightView) whose bytes are in another order than `user` reads."""
    if w.layout != layout:
        raise ValueError(
            f"{user} needs expert weights in the {layout!r} layout, got {w.layout!r}: weights are prepared "
            "for one kernel set (prepare_experts), so build them with the kernels that read them"
        )


def round_to_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Codes (uint8, 0..15) of the e2m1 values nearest to `x` (already scaled into [-6, 6]; larger
    magnitudes saturate). Ties round to the even code, as IEEE round-to-nearest-even does."""
    mag = x.abs().clamp(max=E2M1_MAX)
    mids = _E2M1_MIDPOINTS.to(device=x.device, dtype=mag.dtype)
    code = torch.bucketize(mag, mids)  # mids[i-1] < mag <= mids[i] -> i: a tie lands on the lower code
    tie = mag == mids[code.clamp(max=len(mids) - 1)]
    code = code + (tie & (code % 2 == 1)).to(code.dtype)  # odd code on a tie: move up to the even one
    sign = (x < 0) & (code > 0)  # no negative zero codes
    return (code + 8 * sign.to(code.dtype)).to(torch.uint8)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """[..., K] codes -> [..., K/2] bytes, low nibble = even k."""
    if codes.shape[-1] % 2:
        raise ValueError(f"cannot pack an odd number of codes ({codes.shape[-1]})")
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """[..., K/2] bytes -> [..., K] codes."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


def quantize(w: torch.Tensor) -> NVFP4Weights:
    """Quantise expert weights `[E, N, K]` (any float dtype) to NVFP4, one global scale per expert."""
    if w.dim() != 3:
        raise ValueError(f"expected expert weights [E, N, K], got shape {tuple(w.shape)}")
    e, n, k = w.shape
    check_k(k)
    w32 = w.float()
    if not torch.isfinite(w32).all():  # after the cast: float64 beyond float32's range is inf too
        raise ValueError("cannot quantise weights that contain inf or NaN (or values beyond float32's range)")
    amax = w32.abs().amax(dim=(1, 2))
    global_scale = torch.where(amax > 0, E2M1_MAX * E4M3_MAX / amax, torch.ones_like(amax))
    blocks = w32.view(e, n, k // BLOCK, BLOCK)
    block_amax = blocks.abs().amax(dim=-1)
    block_scale = (block_amax / E2M1_MAX * global_scale[:, None, None]).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)
    step = block_scale.float() / global_scale[:, None, None]  # the scale in weight units
    scaled = torch.where(step[..., None] > 0, blocks / step[..., None], torch.zeros_like(blocks))
    codes = round_to_e2m1(scaled).view(e, n, k)
    return NVFP4Weights(pack(codes), block_scale, global_scale.float())


DECODE_CHUNK = 1 << 27  # weights decoded at a time: the index and fp32 temporaries take 13 bytes each


def decode(q: NVFP4Weights, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """e2m1 x e4m3 block scale, without the global scale: exact in bf16. `[E, N, K]`. A few experts at a
    time, so that the temporaries stay ~1.7 GB (all of DeepSeek-V3's W13 at once would take ~90 GB)."""
    check_layout(q, ROWS, "decoding")
    e, n, k = q.shape
    lut = E2M1_VALUES.to(device=q.device, dtype=torch.float32)
    out = torch.empty(e, n, k, dtype=dtype, device=q.device)
    step = max(1, DECODE_CHUNK // (n * k))
    for first in range(0, e, step):
        part = slice(first, first + step)
        values = lut[unpack(q.packed[part]).long()]
        out[part] = (values.view(-1, n, k // BLOCK, BLOCK) * q.block_scale[part].float()[..., None]).view(-1, n, k).to(dtype)
    return out


def dequantize(q: NVFP4Weights, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weights NVFP4 represents, global scale applied. `[E, N, K]`."""
    return (decode(q, torch.float32) / q.global_scale[:, None, None]).to(dtype)


def fake_quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """Quantise-dequantise activations `[M, K]` to NVFP4 (per-16 scales along K) to reproduce W4A4
    numerics with bf16 kernels. The global scale is per row, not per tensor, so a token's numerics do
    not depend on which other tokens share its batch (replicated, DWDP and EP batch differently)."""
    if x.shape[0] == 0:
        return x
    # Rows with inf/NaN pass through unchanged (a grouped GEMM leaves the rows past its last group
    # undefined, and no token reads them); every finite row is quantised on its own.
    finite = torch.isfinite(x).all(dim=1, keepdim=True)
    q = dequantize(quantize(torch.where(finite, x, 0).unsqueeze(1)), x.dtype).squeeze(1)
    return torch.where(finite, q, x)
