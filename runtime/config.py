"""Model configurations of the DeepSeek-V3 family, as dataclasses.

Field names follow the Hugging Face `config.json` of DeepSeek-V3 where one exists, so a checkpoint's
config maps onto `ModelConfig` one to one (`from_hf_config`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RopeScaling:
    """YaRN scaling of the rotary embedding (DeepSeek-V3 ships factor 40 over 4096 positions)."""

    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0


@dataclass(frozen=True)
class ModelConfig:
    name: str
    hidden_size: int
    num_hidden_layers: int
    first_k_dense_replace: int
    num_attention_heads: int
    q_lora_rank: int | None  # None: a plain q_proj (DeepSeek-V3-Lite); else q_a -> norm -> q_b
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    intermediate_size: int  # dense SwiGLU layers
    moe_intermediate_size: int  # one routed expert; shared experts are n_shared x this, fused
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    routed_scaling_factor: float
    norm_topk_prob: bool
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 163840
    tie_word_embeddings: bool = False

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace

    def moe_index(self, layer: int) -> int:
        """Index of a MoE layer among the MoE layers (0 for the first MoE layer)."""
        return layer - self.first_k_dense_replace

    def validate(self) -> None:
        problems = []
        if self.num_hidden_layers < 1:
            problems.append(f"num_hidden_layers={self.num_hidden_layers} must be >= 1")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            problems.append(
                f"first_k_dense_replace={self.first_k_dense_replace} must lie in [0, num_hidden_layers={self.num_hidden_layers}]"
            )
        if self.n_group < 1:
            problems.append(f"n_group={self.n_group} must be >= 1")
        elif self.n_routed_experts % self.n_group:
            problems.append(f"n_routed_experts={self.n_routed_experts} is not divisible by n_group={self.n_group}")
        if not 1 <= self.topk_group <= self.n_group:
            problems.append(f"topk_group={self.topk_group} must lie in [1, n_group={self.n_group}]")
        per_group = self.n_routed_experts // max(self.n_group, 1)
        if self.n_group > 1 and per_group < 2:
            problems.append("group-limited routing scores a group by its top-2 experts: need >= 2 experts per group")
        if not 1 <= self.num_experts_per_tok <= self.topk_group * per_group:
            problems.append(
                f"num_experts_per_tok={self.num_experts_per_tok} must lie in [1, topk_group x experts per group "
                f"= {self.topk_group * per_group}]"
            )
        if self.qk_rope_head_dim % 2:
            problems.append(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even")
        # NVFP4 packs 16 values per scale along K: both K dims of the expert GEMMs must be multiples of 16.
        for name in ("hidden_size", "moe_intermediate_size"):
            if getattr(self, name) % 16:
                problems.append(f"{name}={getattr(self, name)} must be a multiple of 16 for NVFP4 expert weights")
        if problems:
            raise ValueError(f"invalid model config {self.name!r}: " + "; ".join(problems))

    def with_overrides(self, **overrides: Any) -> ModelConfig:
        """A copy with fields replaced; `layers=` is short for num_hidden_layers."""
        if "layers" in overrides:
            overrides["num_hidden_layers"] = overrides.pop("layers")
        known = [f.name for f in dataclasses.fields(self)]
        unknown = set(overrides) - set(known)
        if unknown:
            raise ValueError(f"unknown model config field(s) {sorted(unknown)}; the fields are: {', '.join(known)}")
        cfg = dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})
        cfg.validate()
        return cfg

    @classmethod
    def from_hf_config(cls, path: str | Path) -> ModelConfig:
        """Read a DeepSeek-V3-family `config.json` (a file or the checkpoint directory holding it)."""
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no config.json at {file}: a checkpoint directory needs config.json + *.safetensors")
        hf = json.loads(file.read_text())
        arch = hf.get("model_type", "")
        if arch not in ("deepseek_v3", "deepseek_v2", "kimi_k2"):
            raise ValueError(
                f"{file}: model_type {arch!r} is not a DeepSeek-V3-family model "
                "(expected 'deepseek_v3'); dwdp-bench implements that architecture only"
            )
        if hf.get("moe_layer_freq", 1) != 1:
            raise ValueError(f"{file}: moe_layer_freq={hf['moe_layer_freq']} is not supported (every layer after the dense ones is MoE)")
        if hf.get("topk_method", "noaux_tc") != "noaux_tc" or hf.get("scoring_func", "sigmoid") != "sigmoid":
            raise ValueError(f"{file}: only sigmoid scoring with noaux_tc top-k routing (DeepSeek-V3) is implemented")
        scaling = None
        # DeepSeek's config.json has rope_theta and rope_scaling at the top level; transformers 5 writes
        # both inside rope_parameters (with rope_type "default" when there is no scaling).
        rope = hf.get("rope_parameters") or {}
        rope_theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
        rs = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if rs:
            kind = rs.get("type", rs.get("rope_type"))
            if kind != "yarn":
                raise ValueError(f"{file}: rope_scaling type {kind!r} is not supported (only 'yarn')")
            scaling = RopeScaling(
                factor=float(rs["factor"]),
                original_max_position_embeddings=int(rs.get("original_max_position_embeddings", 4096)),
                beta_fast=float(rs.get("beta_fast", 32)),
                beta_slow=float(rs.get("beta_slow", 1)),
                mscale=float(rs.get("mscale", 1)),
                mscale_all_dim=float(rs.get("mscale_all_dim", 0)),
            )
        cfg = cls(
            name=str(path),
            hidden_size=hf["hidden_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            first_k_dense_replace=hf.get("first_k_dense_replace", 0),
            num_attention_heads=hf["num_attention_heads"],
            q_lora_rank=hf.get("q_lora_rank"),
            kv_lora_rank=hf["kv_lora_rank"],
            qk_nope_head_dim=hf["qk_nope_head_dim"],
            qk_rope_head_dim=hf["qk_rope_head_dim"],
            v_head_dim=hf["v_head_dim"],
            intermediate_size=hf["intermediate_size"],
            moe_intermediate_size=hf["moe_intermediate_size"],
            n_routed_experts=hf["n_routed_experts"],
            n_shared_experts=hf.get("n_shared_experts") or 0,
            num_experts_per_tok=hf["num_experts_per_tok"],
            n_group=hf.get("n_group") or 1,
            topk_group=hf.get("topk_group") or 1,
            routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
            norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
            vocab_size=hf["vocab_size"],
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            max_position_embeddings=int(hf.get("max_position_embeddings", 163840)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        )
        cfg.validate()
        return cfg


_BUILTIN: dict[str, ModelConfig] = {
    # The size the published DWDP context-phase numbers use for their small model. Depth is not
    # published: 27 layers (1 dense) by default, `--layers` to change it.
    "deepseek-v3-lite": ModelConfig(
        name="deepseek-v3-lite",
        hidden_size=2560,
        num_hidden_layers=27,
        first_k_dense_replace=1,
        num_attention_heads=32,
        q_lora_rank=None,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        intermediate_size=12288,
        moe_intermediate_size=1536,
        n_routed_experts=72,
        n_shared_experts=2,
        num_experts_per_tok=6,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        vocab_size=129280,
    ),
    "deepseek-v3": ModelConfig(
        name="deepseek-v3",
        hidden_size=7168,
        num_hidden_layers=61,
        first_k_dense_replace=3,
        num_attention_heads=128,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        intermediate_size=18432,
        moe_intermediate_size=2048,
        n_routed_experts=256,
        n_shared_experts=1,
        num_experts_per_tok=8,
        n_group=8,
        topk_group=4,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        vocab_size=129280,
        rope_scaling=RopeScaling(factor=40.0, mscale=1.0, mscale_all_dim=1.0),
    ),
    # For tests and CPU runs: every feature of the architecture (dense + MoE layers, shared experts,
    # group-limited routing, YaRN) at a size that runs in milliseconds.
    "tiny": ModelConfig(
        name="tiny",
        hidden_size=64,
        num_hidden_layers=3,
        first_k_dense_replace=1,
        num_attention_heads=4,
        q_lora_rank=None,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        intermediate_size=128,
        moe_intermediate_size=32,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        vocab_size=256,
    ),
}


def builtin_names() -> list[str]:
    return list(_BUILTIN)


def get_config(name: str, **overrides: Any) -> ModelConfig:
    """A built-in config by name, with optional field overrides (`layers=4`, `n_routed_experts=16`, ...)."""
    if name not in _BUILTIN:
        raise ValueError(f"unknown model config {name!r}; built-in configs: {', '.join(_BUILTIN)}")
    return _BUILTIN[name].with_overrides(**overrides)
