"""Hugging Face checkpoints of DeepSeek-V3-family models written by the tests themselves: DeepSeek-V3's
tensor names, config.json as DeepSeek ships it, experts in fp32, bf16 or ModelOpt's NVFP4 layout."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from dwdp_bench.kernels.nvfp4 import NVFP4Weights, dequantize
from dwdp_bench.runtime.config import ModelConfig
from dwdp_bench.runtime.weights import DenseWeights, SyntheticWeights

CPU = torch.device("cpu")

def flatten(d: DenseWeights) -> dict[str, torch.Tensor | None]:
    """Every tensor of a DenseWeights by a path such as `1.attention.kv_b_proj` (None where absent)."""
    out: dict[str, torch.Tensor | None] = {"embed": d.embed, "final_norm": d.final_norm, "lm_head": d.lm_head}
    for i, layer in enumerate(d.layers):
        out[f"{i}.input_norm"] = layer.input_norm
        out[f"{i}.post_attention_norm"] = layer.post_attention_norm
        for part in ("attention", "mlp", "router"):
            obj = getattr(layer, part)
            if obj is None:
                out[f"{i}.{part}"] = None
                continue
            for f in dataclasses.fields(obj):
                out[f"{i}.{part}.{f.name}"] = getattr(obj, f.name)
    return out


_ATTN_NAMES = {
    "kv_a_proj": "kv_a_proj_with_mqa",
    "kv_a_norm": "kv_a_layernorm",
    "kv_b_proj": "kv_b_proj",
    "o_proj": "o_proj",
    "q_proj": "q_proj",
    "q_a_proj": "q_a_proj",
    "q_a_norm": "q_a_layernorm",
    "q_b_proj": "q_b_proj",
}


def hf_names(cfg: ModelConfig, key: str) -> list[str]:
    """The Hugging Face tensor name(s) of a `flatten` path (gate_up is two tensors: gate, then up)."""
    top = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight", "lm_head": "lm_head.weight"}
    if key in top:
        return [top[key]]
    i, part, *rest = key.split(".")
    p = f"model.layers.{i}"
    if part == "input_norm":
        return [f"{p}.input_layernorm.weight"]
    if part == "post_attention_norm":
        return [f"{p}.post_attention_layernorm.weight"]
    if part == "attention":
        return [f"{p}.self_attn.{_ATTN_NAMES[rest[0]]}.weight"]
    if part == "router":
        return [f"{p}.mlp.gate.weight" if rest[0] == "weight" else f"{p}.mlp.gate.e_score_correction_bias"]
    mlp = f"{p}.mlp.shared_experts" if cfg.is_moe_layer(int(i)) else f"{p}.mlp"
    if rest[0] == "gate_up":
        return [f"{mlp}.gate_proj.weight", f"{mlp}.up_proj.weight"]
    return [f"{mlp}.down_proj.weight"]


def hf_config_dict(cfg: ModelConfig) -> dict:
    """config.json of a ModelConfig, as DeepSeek ships it (rope_scaling with "type": "yarn")."""
    d = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "moe_layer_freq": 1,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
    }
    for f in dataclasses.fields(cfg):
        if f.name not in ("name", "rope_scaling"):
            d[f.name] = getattr(cfg, f.name)
    d["rope_scaling"] = None if cfg.rope_scaling is None else {"type": "yarn", **dataclasses.asdict(cfg.rope_scaling)}
    return d


def expert_names(layer: int, e: int) -> tuple[str, str, str]:
    p = f"model.layers.{layer}.mlp.experts.{e}"
    return f"{p}.gate_proj", f"{p}.up_proj", f"{p}.down_proj"


def nvfp4_tensors(prefix: str, q: NVFP4Weights, e: int, rows: slice) -> dict[str, torch.Tensor]:
    """Expert `e`, rows `rows` of our NVFP4 stack in ModelOpt's layout: w = e2m1 x weight_scale x weight_scale_2."""
    return {
        f"{prefix}.weight": q.packed[e, rows].clone(),
        f"{prefix}.weight_scale": q.block_scale[e, rows].clone(),
        f"{prefix}.weight_scale_2": (1.0 / q.global_scale[e]).reshape(()).clone(),
    }


def synthetic_checkpoint(source: SyntheticWeights, experts: str = "fp32", dtype: torch.dtype = torch.float32, norm_seed: int = 0) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face checkpoint holding `source`'s model.

    Dense weights in `dtype` (router in fp32), norms perturbed away from 1 so that mixing two of them
    up shows. Routed experts: "fp32" / "bf16" hold the dequantised synthetic NVFP4 experts, "nvfp4"
    the synthetic NVFP4 bytes themselves in ModelOpt's layout (gate and up share weight_scale_2).
    """
    cfg = source.config
    gen = torch.Generator().manual_seed(norm_seed)
    out: dict[str, torch.Tensor] = {}
    for key, t in flatten(source.dense(CPU, torch.float32)).items():
        if t is None or (key == "lm_head" and cfg.tie_word_embeddings):
            continue
        if "norm" in key:
            t = 1.0 + 0.1 * torch.randn(t.shape, generator=gen)
        names = hf_names(cfg, key)
        router = ".router." in key
        for name, part in zip(names, t.chunk(len(names))):
            out[name] = part.contiguous().to(torch.float32 if router else dtype)
    i = cfg.moe_intermediate_size
    for layer in range(cfg.first_k_dense_replace, cfg.num_hidden_layers):
        w13, w2 = source.experts(layer, 0, cfg.n_routed_experts, CPU)
        f13, f2 = dequantize(w13), dequantize(w2)
        for e in range(cfg.n_routed_experts):
            gate, up, down = expert_names(layer, e)
            if experts == "nvfp4":
                out |= nvfp4_tensors(gate, w13, e, slice(0, i)) | nvfp4_tensors(up, w13, e, slice(i, 2 * i))
                out |= nvfp4_tensors(down, w2, e, slice(None))
            else:
                edtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[experts]
                out[f"{gate}.weight"] = f13[e, :i].to(edtype).contiguous()
                out[f"{up}.weight"] = f13[e, i:].to(edtype).contiguous()
                out[f"{down}.weight"] = f2[e].to(edtype).contiguous()
    return out


def write_checkpoint(path: Path, cfg: ModelConfig | dict, tensors: dict[str, torch.Tensor], shards: int = 1) -> Path:
    """config.json + `shards` safetensors files (tensors dealt round robin) in `path`."""
    path.mkdir(parents=True, exist_ok=True)
    config = cfg if isinstance(cfg, dict) else hf_config_dict(cfg)
    (path / "config.json").write_text(json.dumps(config, indent=1))
    names = sorted(tensors)
    for s in range(shards):
        part = {n: tensors[n].contiguous() for n in names[s::shards]}
        file = "model.safetensors" if shards == 1 else f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, str(path / file), metadata={"format": "pt"})
    return path
