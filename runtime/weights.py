"""Model weights: containers, a deterministic synthetic generator, and a Hugging Face checkpoint loader.

Routed experts are kept apart from everything else: a `WeightSource` hands out the dense part of the
model (attention, norms, dense MLPs, shared experts, routers, embeddings) and, separately, any
contiguous slice of a layer's routed experts in NVFP4, so each parallel strategy builds exactly the
experts it holds and nothing more.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Protocol

import torch

from ..kernels.nvfp4 import BLOCK, NVFP4Weights, quantize
from .config import ModelConfig


@dataclass
class AttentionWeights:
    kv_a_proj: torch.Tensor  # [kv_lora + rope, H]: compressed kv and the shared rope key
    kv_a_norm: torch.Tensor  # [kv_lora]
    kv_b_proj: torch.Tensor  # [heads * (nope + v), kv_lora]
    o_proj: torch.Tensor  # [H, heads * v]
    q_proj: torch.Tensor | None = None  # [heads * qk, H] when q_lora_rank is None
    q_a_proj: torch.Tensor | None = None  # [q_lora, H]
    q_a_norm: torch.Tensor | None = None  # [q_lora]
    q_b_proj: torch.Tensor | None = None  # [heads * qk, q_lora]


@dataclass
class MLPWeights:
    gate_up: torch.Tensor  # [2I, H]: gate rows, then up rows
    down: torch.Tensor  # [H, I]


@dataclass
class RouterWeights:
    weight: torch.Tensor  # [E, H] fp32
    bias: torch.Tensor  # [E] fp32: e_score_correction_bias, used for choosing, not for weighting


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    post_attention_norm: torch.Tensor
    attention: AttentionWeights
    mlp: MLPWeights | None  # the dense MLP, or the (fused) shared experts of a MoE layer
    router: RouterWeights | None  # MoE layers only


@dataclass
class DenseWeights:
    """Everything but the routed experts."""

    embed: torch.Tensor  # [vocab, H]
    layers: list[LayerWeights]
    final_norm: torch.Tensor
    lm_head: torch.Tensor  # [vocab, H]

    def nbytes(self) -> int:
        seen: set[int] = set()
        total = 0

        def add(t: torch.Tensor | None) -> None:
            nonlocal total
            if t is not None and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()

        for t in (self.embed, self.final_norm, self.lm_head):
            add(t)
        for layer in self.layers:
            add(layer.input_norm)
            add(layer.post_attention_norm)
            for part in (layer.attention, layer.mlp, layer.router):
                if part is not None:
                    for f in fields(part):
                        add(getattr(part, f.name))
        return total


class WeightSource(Protocol):
    config: ModelConfig

    def dense(self, device: torch.device, dtype: torch.dtype) -> DenseWeights: ...

    def experts(self, layer: int, start: int, stop: int, device: torch.device) -> tuple[NVFP4Weights, NVFP4Weights]:
        """Routed experts [start, stop) of `layer` as NVFP4 (W13 `[n, 2I, H]`, W2 `[n, H, I]`)."""
        ...


def expert_nbytes(cfg: ModelConfig) -> int:
    """NVFP4 bytes of one routed expert (W13 + W2, scales included): what DWDP moves per expert."""
    h, i = cfg.hidden_size, cfg.moe_intermediate_size
    return NVFP4Weights.nbytes_per_expert(2 * i, h) + NVFP4Weights.nbytes_per_expert(h, i)


class SyntheticWeights:
    """Deterministic random weights from a seed; any tensor or expert slice is built on its own.

    Every tensor (and every expert) draws from its own generator seeded by hash(seed, name), on the
    device the weights are built on. All ranks of one device type therefore build identical weights,
    and a slice of experts equals the same experts of the full stack. CPU and CUDA generators are
    different algorithms (Mersenne Twister vs Philox), so a CPU model and a GPU model with the same
    seed are different models.
    Scales keep activations O(1): linear layers draw N(0, 1/fan_in), those writing into the residual
    stream (o_proj, MLP and expert down projections) a further 1/sqrt(2 x layers); norms are 1,
    embeddings N(0, 1), router biases N(0, 0.01) so that the bias path is exercised.
    """

    def __init__(self, config: ModelConfig, seed: int = 0):
        config.validate()
        self.config = config
        self.seed = seed

    def _randn(self, name: str, shape: tuple[int, ...], std: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        digest = hashlib.blake2b(f"{self.seed}/{name}".encode(), digest_size=8).digest()
        gen = torch.Generator(device=device)
        gen.manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
        out = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
        return (out * std).to(dtype)

    def _linear(self, name: str, out_dim: int, in_dim: int, device: torch.device, dtype: torch.dtype, residual: bool = False) -> torch.Tensor:
        # Projections back into the residual stream get another 1/sqrt(2 x layers) (GPT-2's init):
        # without it a deep random model amplifies bf16 rounding differences until two correct
        # implementations (EP and replicated) give unrelated logits at 27 layers.
        std = in_dim**-0.5 * ((2 * self.config.num_hidden_layers) ** -0.5 if residual else 1.0)
        return self._randn(name, (out_dim, in_dim), std, device, dtype)

    def dense(self, device: torch.device, dtype: torch.dtype) -> DenseWeights:
        c, dev = self.config, torch.device(device)
        heads, h = c.num_attention_heads, c.hidden_size

        def ones(n: int) -> torch.Tensor:
            return torch.ones(n, device=dev, dtype=dtype)

        layers = []
        for i in range(c.num_hidden_layers):
            p = f"layers.{i}"
            attn = AttentionWeights(
                kv_a_proj=self._linear(f"{p}.kv_a_proj", c.kv_lora_rank + c.qk_rope_head_dim, h, dev, dtype),
                kv_a_norm=ones(c.kv_lora_rank),
                kv_b_proj=self._linear(f"{p}.kv_b_proj", heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank, dev, dtype),
                o_proj=self._linear(f"{p}.o_proj", h, heads * c.v_head_dim, dev, dtype, residual=True),
            )
            if c.q_lora_rank is None:
                attn.q_proj = self._linear(f"{p}.q_proj", heads * c.qk_head_dim, h, dev, dtype)
            else:
                attn.q_a_proj = self._linear(f"{p}.q_a_proj", c.q_lora_rank, h, dev, dtype)
                attn.q_a_norm = ones(c.q_lora_rank)
                attn.q_b_proj = self._linear(f"{p}.q_b_proj", heads * c.qk_head_dim, c.q_lora_rank, dev, dtype)
            moe = c.is_moe_layer(i)
            inter = c.moe_intermediate_size * c.n_shared_experts if moe else c.intermediate_size
            mlp = None
            if inter:
                mlp = MLPWeights(
                    gate_up=self._linear(f"{p}.mlp.gate_up", 2 * inter, h, dev, dtype),
                    down=self._linear(f"{p}.mlp.down", h, inter, dev, dtype, residual=True),
                )
            router = None
            if moe:
                router = RouterWeights(
                    weight=self._linear(f"{p}.router", c.n_routed_experts, h, dev, torch.float32),
                    bias=self._randn(f"{p}.router_bias", (c.n_routed_experts,), 0.01, dev, torch.float32),
                )
            layers.append(LayerWeights(ones(h), ones(h), attn, mlp, router))
        embed = self._randn("embed", (c.vocab_size, h), 1.0, dev, dtype)
        lm_head = embed if c.tie_word_embeddings else self._linear("lm_head", c.vocab_size, h, dev, dtype)
        return DenseWeights(embed=embed, layers=layers, final_norm=ones(h), lm_head=lm_head)

    def experts(self, layer: int, start: int, stop: int, device: torch.device) -> tuple[NVFP4Weights, NVFP4Weights]:
        c, dev = self.config, torch.device(device)
        if (empty := _no_experts(c, layer, start, stop, dev)) is not None:
            return empty
        h, i = c.hidden_size, c.moe_intermediate_size
        # one expert at a time: DeepSeek-V3's 128 experts of a rank would need 22 GiB as one fp32 stack
        w13 = [quantize(self._linear(f"layers.{layer}.experts.{e}.w13", 2 * i, h, dev, torch.float32)[None]) for e in range(start, stop)]
        w2 = [quantize(self._linear(f"layers.{layer}.experts.{e}.w2", h, i, dev, torch.float32, residual=True)[None]) for e in range(start, stop)]
        return NVFP4Weights.cat(w13), NVFP4Weights.cat(w2)


def _no_experts(c: ModelConfig, layer: int, start: int, stop: int, device: torch.device) -> tuple[NVFP4Weights, NVFP4Weights] | None:
    """Checks an expert slice request; returns empty stacks when the slice is empty."""
    if not c.is_moe_layer(layer) or layer >= c.num_hidden_layers:
        raise ValueError(f"layer {layer} of {c.name} is not a MoE layer (MoE layers: {c.first_k_dense_replace}..{c.num_hidden_layers - 1})")
    if not 0 <= start <= stop <= c.n_routed_experts:
        raise ValueError(f"expert slice [{start}, {stop}) is outside [0, {c.n_routed_experts})")
    if start < stop:
        return None
    h, i = c.hidden_size, c.moe_intermediate_size
    return NVFP4Weights.empty(0, 2 * i, h, device), NVFP4Weights.empty(0, h, i, device)


class CheckpointWeights:
    """A local Hugging Face checkpoint directory of the DeepSeek-V3 family (config.json + *.safetensors).

    Routed experts in bf16/fp16/fp32 or fp8 with 128x128 block scales (`weight_scale_inv`) are
    quantised to NVFP4 at load; experts already in NVFP4 in the ModelOpt layout (`weight` uint8 packed
    with the low nibble first, `weight_scale` e4m3 per 16, `weight_scale_2` fp32 = 1 / global scale)
    are taken as they are. Other fp8 weights are dequantised to the compute dtype.
    """

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"checkpoint directory {self.path} does not exist")
        self.config = ModelConfig.from_hf_config(self.path)
        quant = json.loads((self.path / "config.json").read_text()).get("quantization_config") or {}
        self.fp8_block = tuple(quant.get("weight_block_size", (128, 128)))  # DeepSeek's fp8 checkpoints: 128 x 128
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{self.path} holds no *.safetensors files")
        self._file_of: dict[str, Path] = {}
        for f in files:
            with safe_open(f, framework="pt") as st:
                for key in st.keys():
                    self._file_of[key] = f
        self._open: dict[Path, object] = {}

    def has(self, name: str) -> bool:
        return name in self._file_of

    def _raw(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self._file_of:
            raise KeyError(f"tensor {name!r} is missing from checkpoint {self.path}")
        f = self._file_of[name]
        if f not in self._open:
            self._open[f] = safe_open(f, framework="pt")
        return self._open[f].get_tensor(name)

    def _float(self, name: str, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """A weight as a float tensor of the expected shape, fp8 block-scaled weights dequantised."""
        t = self._raw(name)
        if t.dtype == torch.uint8:
            raise ValueError(f"tensor {name!r} is NVFP4-packed; only routed experts may be NVFP4 in this loader")
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            t = _dequantize_fp8_blocks(t, self._raw(name + "_scale_inv"), name, self.fp8_block)
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"tensor {name!r} in {self.path} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        return t.to(device=device, dtype=dtype)

    def dense(self, device: torch.device, dtype: torch.dtype) -> DenseWeights:
        c, dev = self.config, torch.device(device)
        heads, h = c.num_attention_heads, c.hidden_size
        layers = []
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}"
            a = f"{p}.self_attn"
            attn = AttentionWeights(
                kv_a_proj=self._float(f"{a}.kv_a_proj_with_mqa.weight", (c.kv_lora_rank + c.qk_rope_head_dim, h), dev, dtype),
                kv_a_norm=self._float(f"{a}.kv_a_layernorm.weight", (c.kv_lora_rank,), dev, dtype),
                kv_b_proj=self._float(f"{a}.kv_b_proj.weight", (heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank), dev, dtype),
                o_proj=self._float(f"{a}.o_proj.weight", (h, heads * c.v_head_dim), dev, dtype),
            )
            if c.q_lora_rank is None:
                attn.q_proj = self._float(f"{a}.q_proj.weight", (heads * c.qk_head_dim, h), dev, dtype)
            else:
                attn.q_a_proj = self._float(f"{a}.q_a_proj.weight", (c.q_lora_rank, h), dev, dtype)
                attn.q_a_norm = self._float(f"{a}.q_a_layernorm.weight", (c.q_lora_rank,), dev, dtype)
                attn.q_b_proj = self._float(f"{a}.q_b_proj.weight", (heads * c.qk_head_dim, c.q_lora_rank), dev, dtype)
            moe = c.is_moe_layer(i)
            mlp_prefix = f"{p}.mlp.shared_experts" if moe else f"{p}.mlp"
            inter = c.moe_intermediate_size * c.n_shared_experts if moe else c.intermediate_size
            mlp = None
            if inter:
                gate = self._float(f"{mlp_prefix}.gate_proj.weight", (inter, h), dev, dtype)
                up = self._float(f"{mlp_prefix}.up_proj.weight", (inter, h), dev, dtype)
                mlp = MLPWeights(torch.cat([gate, up]), self._float(f"{mlp_prefix}.down_proj.weight", (h, inter), dev, dtype))
            router = None
            if moe:
                router = RouterWeights(
                    weight=self._float(f"{p}.mlp.gate.weight", (c.n_routed_experts, h), dev, torch.float32),
                    bias=self._float(f"{p}.mlp.gate.e_score_correction_bias", (c.n_routed_experts,), dev, torch.float32),
                )
            layers.append(
                LayerWeights(
                    input_norm=self._float(f"{p}.input_layernorm.weight", (h,), dev, dtype),
                    post_attention_norm=self._float(f"{p}.post_attention_layernorm.weight", (h,), dev, dtype),
                    attention=attn,
                    mlp=mlp,
                    router=router,
                )
            )
        embed = self._float("model.embed_tokens.weight", (c.vocab_size, h), dev, dtype)
        if c.tie_word_embeddings:
            lm_head = embed
        else:
            lm_head = self._float("lm_head.weight", (c.vocab_size, h), dev, dtype)
        return DenseWeights(embed=embed, layers=layers, final_norm=self._float("model.norm.weight", (h,), dev, dtype), lm_head=lm_head)

    def experts(self, layer: int, start: int, stop: int, device: torch.device) -> tuple[NVFP4Weights, NVFP4Weights]:
        c, dev = self.config, torch.device(device)
        if (empty := _no_experts(c, layer, start, stop, dev)) is not None:
            return empty
        h, i = c.hidden_size, c.moe_intermediate_size
        w13, w2 = [], []
        for e in range(start, stop):
            p = f"model.layers.{layer}.mlp.experts.{e}"
            w13.append(self._expert_nvfp4([f"{p}.gate_proj", f"{p}.up_proj"], (i, h)))
            w2.append(self._expert_nvfp4([f"{p}.down_proj"], (h, i)))
        return NVFP4Weights.cat(w13).to(dev), NVFP4Weights.cat(w2).to(dev)

    def _expert_nvfp4(self, prefixes: list[str], shape: tuple[int, int]) -> NVFP4Weights:
        """One expert's weight (several projections stacked along N) as NVFP4 `[1, N, K]`."""
        if self._raw(prefixes[0] + ".weight").dtype != torch.uint8:
            parts = [self._float(p + ".weight", shape, torch.device("cpu"), torch.float32) for p in prefixes]
            return quantize(torch.cat(parts).unsqueeze(0))
        n, k = shape
        packed, scales, scale_2 = [], [], []
        for p in prefixes:
            packed.append(self._expect(p + ".weight", (n, k // 2), torch.uint8))
            scales.append(self._expect(p + ".weight_scale", (n, k // BLOCK), torch.float8_e4m3fn).float())
            scale_2.append(self._raw(p + ".weight_scale_2").float().reshape(()))
        # One global scale per expert tensor: projections quantised with different second-level scales
        # are brought to the largest (their block scales shrink, so they stay within e4m3's range).
        common = torch.stack(scale_2).max()
        if not all(torch.equal(s, common) for s in scale_2):
            warnings.warn(f"{prefixes}: weight_scale_2 differ; re-rounding block scales to one global scale (lossy)", stacklevel=2)
        block = torch.cat([s * (s2 / common) for s, s2 in zip(scales, scale_2)]).to(torch.float8_e4m3fn)
        return NVFP4Weights(torch.cat(packed).unsqueeze(0), block.unsqueeze(0), (1.0 / common).reshape(1).float())

    def _expect(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        t = self._raw(name)
        if t.dtype != dtype or tuple(t.shape) != tuple(shape):
            raise ValueError(f"tensor {name!r} in {self.path} is {t.dtype} {tuple(t.shape)}, expected {dtype} {tuple(shape)}")
        return t


def _dequantize_fp8_blocks(w: torch.Tensor, scale_inv: torch.Tensor, name: str, block: tuple[int, int]) -> torch.Tensor:
    """DeepSeek's fp8 checkpoints: one fp32 scale (`weight_scale_inv`) per block of 128 x 128, the last
    block of a dimension possibly partial (kv_a_proj_with_mqa has 576 rows: 5 blocks)."""
    n, k = w.shape
    bn, bk = block
    if tuple(scale_inv.shape) != (-(-n // bn), -(-k // bk)):
        raise ValueError(
            f"{name}_scale_inv has shape {tuple(scale_inv.shape)}; {bn} x {bk} blocks of {name} {tuple(w.shape)} "
            f"need {(-(-n // bn), -(-k // bk))}"
        )
    full = scale_inv.float().repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    return w.float() * full


def load_weight_source(model: str, seed: int = 0, **overrides) -> WeightSource:
    """`synthetic:<config>` (or a bare built-in config name) or a checkpoint directory path."""
    from .config import builtin_names, get_config

    name = model.removeprefix("synthetic:")
    if name in builtin_names():
        return SyntheticWeights(get_config(name, **overrides), seed)
    path = Path(model)
    if path.is_dir():
        if overrides:
            raise ValueError(f"config overrides {sorted(overrides)} apply to synthetic models only, not to checkpoint {path}")
        return CheckpointWeights(path)
    raise ValueError(
        f"model {model!r} is neither a built-in config ({', '.join('synthetic:' + n for n in builtin_names())}) "
        "nor an existing checkpoint directory"
    )
