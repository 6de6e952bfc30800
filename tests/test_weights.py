"""Weights: the synthetic generator, model configs, and the Hugging Face checkpoint loader.

Checkpoints are written by the tests themselves (safetensors + config.json with DeepSeek-V3's tensor
names) in the formats the loader accepts: bf16/fp32 experts, DeepSeek's fp8 with 128 x 128 block
scales, and ModelOpt's NVFP4. The last tests load a checkpoint that `transformers` saved from its own
DeepseekV3ForCausalLM and compare logits with it (skipped when transformers lacks DeepSeek-V3).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dwdp_bench.kernels.nvfp4 import NVFP4Weights, dequantize, quantize
from dwdp_bench.runtime.config import ModelConfig, RopeScaling, builtin_names, get_config
from dwdp_bench.runtime.weights import CheckpointWeights, DenseWeights, SyntheticWeights, load_weight_source
from checkpoints import CPU, expert_names, flatten, hf_config_dict, hf_names, nvfp4_tensors, synthetic_checkpoint, write_checkpoint

TINY = get_config("tiny")
# q_lora, YaRN, tied embeddings, two shared experts: the other branches of config and loader.
TINY_QLORA = get_config(
    "tiny",
    q_lora_rank=24,
    rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=8, beta_fast=4, beta_slow=1, mscale=1.0, mscale_all_dim=0.7),
    tie_word_embeddings=True,
    n_shared_experts=2,
    rope_theta=50000.0,
)
CONFIGS = {"tiny": TINY, "tiny-qlora": TINY_QLORA}


# ---- helpers ------------------------------------------------------------------------------------


def bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor's raw bits, so that fp8 tensors compare with torch.equal and -0.0 != 0.0."""
    return t.view(torch.uint8) if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else t


def assert_nvfp4_identical(got: NVFP4Weights, want: NVFP4Weights) -> None:
    assert got.shape == want.shape
    for name, g, w in zip(("packed", "block_scale", "global_scale"), got.tensors(), want.tensors()):
        assert g.dtype == w.dtype, name
        assert torch.equal(bits(g), bits(w)), f"{name} differs"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def expected_dense(cfg: ModelConfig, tensors: dict[str, torch.Tensor], like: DenseWeights) -> dict[str, torch.Tensor | None]:
    """What loading `tensors` must give, in float32, path by path (`like` supplies the paths)."""
    want: dict[str, torch.Tensor | None] = {}
    for key, t in flatten(like).items():
        if t is None:
            want[key] = None
        elif key == "lm_head" and cfg.tie_word_embeddings:
            want[key] = tensors["model.embed_tokens.weight"].float()
        else:
            want[key] = torch.cat([tensors[n].float() for n in hf_names(cfg, key)])
    return want


def assert_dense_equal(got: DenseWeights, want: dict[str, torch.Tensor | None]) -> None:
    flat = flatten(got)
    assert flat.keys() == want.keys()
    for key, w in want.items():
        g = flat[key]
        if w is None:
            assert g is None, key
            continue
        assert g is not None and g.dtype == torch.float32 and g.shape == w.shape, key
        assert torch.equal(g, w), f"{key} differs from the checkpoint"


def fp8_blocks(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DeepSeek's fp8 format: e4m3 weight and one fp32 `scale_inv` per block x block tile (ceil-divided).
    Returns (weight, scale_inv, the weight the pair represents in fp32)."""
    n, k = w.shape
    nb, kb = -(-n // block), -(-k // block)
    padded = torch.zeros(nb * block, kb * block)
    padded[:n, :k] = w.float()
    scale = (padded.view(nb, block, kb, block).abs().amax(dim=(1, 3)) / 448.0).clamp(min=1e-12)
    full = scale.repeat_interleave(block, 0)[:n].repeat_interleave(block, 1)[:, :k]
    q = (w.float() / full).to(torch.float8_e4m3fn)
    return q, scale, q.float() * full


def block_varying(shape: tuple[int, int], seed: int) -> torch.Tensor:
    """Random weights whose magnitude changes by 4x from one 128 x 128 tile to the next, so that a
    scale applied to the wrong rows or columns shows."""
    n, k = shape
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    rows, cols = torch.arange(n) // 128, torch.arange(k) // 128
    return w * 4.0 ** (rows[:, None] + 2 * cols[None, :]).float() * 0.01


def build_model(cfg: ModelConfig, source, dtype: torch.dtype = torch.float32):
    """A single-rank model (replicated strategy) over any weight source (see conftest.build_model)."""
    from dwdp_bench.kernels import get_kernels
    from dwdp_bench.runtime.comm import RankContext
    from dwdp_bench.runtime.model import Model
    from dwdp_bench.runtime.strategies import Replicated, StrategyOptions
    from dwdp_bench.runtime.timeline import Timeline

    ctx = RankContext(0, 1, 0, CPU)
    timeline = Timeline(CPU, enabled=False)
    experts = Replicated(ctx, source, get_kernels("torch", CPU), StrategyOptions(), timeline)
    return Model(cfg, source.dense(CPU, dtype), experts, timeline=timeline), experts


# ---- 1. synthetic weights -------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_synthetic_same_seed_same_weights_other_seed_other_weights(name):
    cfg = CONFIGS[name]
    a, b, c = SyntheticWeights(cfg, 3), SyntheticWeights(cfg, 3), SyntheticWeights(cfg, 4)
    da, db, dc = (flatten(s.dense(CPU, torch.float32)) for s in (a, b, c))
    assert da.keys() == db.keys() == dc.keys()
    for key, t in da.items():
        if t is None:
            assert db[key] is None
            continue
        assert torch.equal(t, db[key]), key
        if t.numel() > 1 and "norm" not in key:  # norms are ones whatever the seed
            assert not torch.equal(t, dc[key]), f"{key} does not depend on the seed"
    for layer in range(cfg.first_k_dense_replace, cfg.num_hidden_layers):
        for wa, wb, wc in zip(*(s.experts(layer, 0, cfg.n_routed_experts, CPU) for s in (a, b, c))):
            assert_nvfp4_identical(wa, wb)
            assert not torch.equal(wa.packed, wc.packed)
    # distinct tensors are distinct draws: the same expert in two layers, two experts of one layer
    l0, l1 = cfg.first_k_dense_replace, cfg.first_k_dense_replace + 1
    assert not torch.equal(a.experts(l0, 0, 1, CPU)[0].packed, a.experts(l1, 0, 1, CPU)[0].packed)
    assert not torch.equal(a.experts(l0, 0, 1, CPU)[0].packed, a.experts(l0, 1, 2, CPU)[0].packed)


def test_synthetic_dense_shapes_dtype_and_tied_head():
    for cfg in CONFIGS.values():
        d = SyntheticWeights(cfg).dense(CPU, torch.bfloat16)
        h = cfg.hidden_size
        assert d.embed.shape == (cfg.vocab_size, h) and d.embed.dtype == torch.bfloat16
        assert (d.lm_head is d.embed) == cfg.tie_word_embeddings
        for i, layer in enumerate(d.layers):
            assert (layer.router is not None) == cfg.is_moe_layer(i)
            if layer.router is not None:
                assert layer.router.weight.dtype == torch.float32 and layer.router.weight.shape == (cfg.n_routed_experts, h)
                assert layer.router.bias.abs().max() > 0  # the correction bias path is exercised
            inter = cfg.moe_intermediate_size * cfg.n_shared_experts if cfg.is_moe_layer(i) else cfg.intermediate_size
            assert layer.mlp.gate_up.shape == (2 * inter, h) and layer.mlp.down.shape == (h, inter)
            assert (layer.attention.q_proj is None) == (cfg.q_lora_rank is not None)
        assert d.nbytes() > 0


def test_synthetic_expert_slices_equal_rows_of_the_full_stack():
    cfg = get_config("tiny", layers=2, n_routed_experts=12, n_group=3, topk_group=2)
    source = SyntheticWeights(cfg, seed=7)
    h, i = cfg.hidden_size, cfg.moe_intermediate_size
    full13, full2 = source.experts(1, 0, 12, CPU)
    assert full13.shape == (12, 2 * i, h) and full2.shape == (12, h, i)
    for a, b in [(0, 1), (0, 5), (3, 9), (5, 12), (11, 12), (0, 12)]:
        w13, w2 = source.experts(1, a, b, CPU)
        assert w13.num_experts == w2.num_experts == b - a
        assert_nvfp4_identical(w13, full13.experts(a, b))
        assert_nvfp4_identical(w2, full2.experts(a, b))


def test_synthetic_bad_expert_requests():
    cfg = TINY  # 3 layers, layer 0 dense, 8 experts
    source = SyntheticWeights(cfg)
    with pytest.raises(ValueError, match=r"layer 0 of tiny is not a MoE layer \(MoE layers: 1\.\.2\)"):
        source.experts(0, 0, 2, CPU)
    with pytest.raises(ValueError, match="layer 3 of tiny is not a MoE layer"):
        source.experts(3, 0, 2, CPU)
    for a, b in [(0, 9), (3, 2), (-1, 2), (8, 9)]:
        with pytest.raises(ValueError, match=re.escape(f"expert slice [{a}, {b}) is outside [0, 8)")):
            source.experts(1, a, b, CPU)
    for a in (0, 4, 8):
        w13, w2 = source.experts(2, a, a, CPU)
        assert w13.shape == (0, 2 * cfg.moe_intermediate_size, cfg.hidden_size)
        assert w2.shape == (0, cfg.hidden_size, cfg.moe_intermediate_size)
    with pytest.raises(ValueError, match="hidden_size=72 must be a multiple of 16"):
        SyntheticWeights(dataclasses.replace(cfg, hidden_size=72))


# ---- 2. configs -------------------------------------------------------------------------------------


def test_builtin_configs_and_overrides():
    assert builtin_names() == ["deepseek-v3-lite", "deepseek-v3", "tiny"]
    for name in builtin_names():
        cfg = get_config(name)
        cfg.validate()
        assert cfg.name == name
    v3 = get_config("deepseek-v3")
    assert (v3.hidden_size, v3.num_hidden_layers, v3.n_routed_experts, v3.q_lora_rank) == (7168, 61, 256, 1536)
    assert v3.rope_scaling == RopeScaling(factor=40.0, mscale=1.0, mscale_all_dim=1.0)
    short = get_config("deepseek-v3", layers=5)
    assert short.num_hidden_layers == 5 and short.num_moe_layers == 2
    assert dataclasses.replace(short, num_hidden_layers=61) == v3  # nothing else changed
    assert get_config("tiny", num_hidden_layers=4, n_routed_experts=16).n_routed_experts == 16
    assert get_config("tiny", layers=None) == TINY  # None: not overridden
    assert get_config("tiny").num_hidden_layers == 3  # overrides never change the built-in
    with pytest.raises(ValueError, match="num_hidden_layers=0 must be >= 1"):
        get_config("tiny", layers=0)


def test_unknown_config_name_and_field():
    with pytest.raises(ValueError, match=r"unknown model config 'nope'; built-in configs: deepseek-v3-lite, deepseek-v3, tiny"):
        get_config("nope")
    with pytest.raises(ValueError, match=r"unknown model config field\(s\) \['bogus', 'hidden'\]"):
        get_config("tiny", hidden=64, bogus=1)


def test_unknown_config_field_lists_the_valid_fields():
    with pytest.raises(ValueError) as info:
        get_config("tiny", hidden=64)
    assert "hidden_size" in str(info.value) and "num_hidden_layers" in str(info.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"hidden_size": 72}, "hidden_size=72 must be a multiple of 16"),
        ({"moe_intermediate_size": 40}, "moe_intermediate_size=40 must be a multiple of 16"),
        ({"topk_group": 3}, r"topk_group=3 must lie in \[1, n_group=2\]"),
        ({"topk_group": 0}, r"topk_group=0 must lie in \[1, n_group=2\]"),
        ({"qk_rope_head_dim": 7}, "qk_rope_head_dim=7 must be even"),
        ({"n_routed_experts": 9}, "n_routed_experts=9 is not divisible by n_group=2"),
        ({"n_group": 8}, "need >= 2 experts per group"),
        ({"num_experts_per_tok": 5}, r"num_experts_per_tok=5 must lie in \[1, topk_group x experts per group = 4\]"),
        ({"first_k_dense_replace": 4}, r"first_k_dense_replace=4 must lie in \[0, num_hidden_layers=3\]"),
    ],
)
def test_validate_rejects(overrides, message):
    with pytest.raises(ValueError, match=r"invalid model config 'tiny': .*" + message):
        get_config("tiny", **overrides)
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(TINY, **overrides).validate()


def test_validate_lists_every_problem_at_once():
    with pytest.raises(ValueError) as info:
        get_config("tiny", hidden_size=72, qk_rope_head_dim=7, topk_group=3)
    msg = str(info.value)
    assert "hidden_size=72" in msg and "qk_rope_head_dim=7" in msg and "topk_group=3" in msg


def test_validate_rejects_zero_groups_with_a_value_error():
    with pytest.raises(ValueError, match="n_group"):
        dataclasses.replace(TINY, n_group=0, topk_group=0).validate()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_from_hf_config_round_trip(tmp_path, name):
    cfg = CONFIGS[name]
    (tmp_path / "config.json").write_text(json.dumps(hf_config_dict(cfg)))
    got = ModelConfig.from_hf_config(tmp_path)
    assert got == dataclasses.replace(cfg, name=str(tmp_path))
    assert ModelConfig.from_hf_config(tmp_path / "config.json") == dataclasses.replace(got, name=str(tmp_path / "config.json"))
    # "rope_type" (the newer spelling) is read as well as "type"; null or absent fields take defaults
    d = hf_config_dict(cfg)
    if d["rope_scaling"]:
        d["rope_scaling"]["rope_type"] = d["rope_scaling"].pop("type")
    for key in ("n_group", "topk_group", "n_shared_experts"):
        d[key] = None
    del d["first_k_dense_replace"], d["rms_norm_eps"]
    d["num_experts_per_tok"] = 1
    (tmp_path / "config.json").write_text(json.dumps(d))
    got = ModelConfig.from_hf_config(tmp_path)
    assert got.rope_scaling == cfg.rope_scaling
    assert (got.n_group, got.topk_group, got.n_shared_experts, got.first_k_dense_replace, got.rms_norm_eps) == (1, 1, 0, 0, 1e-6)


@pytest.mark.parametrize(
    "change, error, message",
    [
        ({"model_type": "llama"}, ValueError, r"model_type 'llama' is not a DeepSeek-V3-family model \(expected 'deepseek_v3'\)"),
        ({"model_type": None}, ValueError, "model_type None is not a DeepSeek-V3-family model"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, ValueError, "rope_scaling type 'linear' is not supported \\(only 'yarn'\\)"),
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, ValueError, "rope_scaling type 'dynamic' is not supported"),
        ({"moe_layer_freq": 2}, ValueError, "moe_layer_freq=2 is not supported"),
        ({"scoring_func": "softmax"}, ValueError, "only sigmoid scoring with noaux_tc"),
        ({"topk_method": "greedy"}, ValueError, "only sigmoid scoring with noaux_tc"),
        ({"hidden_size": 72}, ValueError, "hidden_size=72 must be a multiple of 16"),
    ],
)
def test_from_hf_config_rejects(tmp_path, change, error, message):
    d = hf_config_dict(TINY) | change
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(error, match=message):
        ModelConfig.from_hf_config(tmp_path)


def test_from_hf_config_without_a_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json at"):
        ModelConfig.from_hf_config(tmp_path)


def test_from_hf_config_reads_a_config_saved_by_transformers_5(tmp_path):
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "DeepseekV3Config"):
        pytest.skip("transformers has no DeepseekV3Config")
    hf = transformers.DeepseekV3Config(
        **hf_transformers_kwargs(dataclasses.replace(TINY_QLORA, max_position_embeddings=32)),
        rope_parameters={"rope_type": "yarn", "rope_theta": 50000.0, "factor": 4.0, "original_max_position_embeddings": 8,
                         "beta_fast": 4.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.7},
    )
    hf.save_pretrained(tmp_path)
    got = ModelConfig.from_hf_config(tmp_path)
    assert got.rope_theta == 50000.0
    assert got.rope_scaling == TINY_QLORA.rope_scaling


# ---- 3. the checkpoint loader ---------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_checkpoint_with_float_experts(tmp_path, name, dtype):
    cfg = CONFIGS[name]
    source = SyntheticWeights(cfg, seed=1)
    tensors = synthetic_checkpoint(source, experts="bf16" if dtype == torch.bfloat16 else "fp32", dtype=dtype)
    ckpt = CheckpointWeights(write_checkpoint(tmp_path / "ckpt", cfg, tensors))
    assert ckpt.config == dataclasses.replace(cfg, name=str(tmp_path / "ckpt"))
    dense = ckpt.dense(CPU, torch.float32)
    assert_dense_equal(dense, expected_dense(cfg, tensors, dense))
    if cfg.tie_word_embeddings:
        assert dense.lm_head is dense.embed and "lm_head.weight" not in tensors
    assert ckpt.dense(CPU, torch.bfloat16).layers[0].attention.kv_b_proj.dtype == torch.bfloat16
    assert ckpt.dense(CPU, torch.bfloat16).layers[-1].router.weight.dtype == torch.float32
    i = cfg.moe_intermediate_size
    for layer in range(cfg.first_k_dense_replace, cfg.num_hidden_layers):
        w13, w2 = ckpt.experts(layer, 0, cfg.n_routed_experts, CPU)
        want13 = quantize(torch.stack([torch.cat([tensors[f"{g}.weight"], tensors[f"{u}.weight"]]) for g, u, _ in (expert_names(layer, e) for e in range(cfg.n_routed_experts))]))
        want2 = quantize(torch.stack([tensors[f"{expert_names(layer, e)[2]}.weight"] for e in range(cfg.n_routed_experts)]))
        assert_nvfp4_identical(w13, want13)
        assert_nvfp4_identical(w2, want2)
        assert w13.shape == (cfg.n_routed_experts, 2 * i, cfg.hidden_size)
        # a slice loads the same experts as the full stack; an empty one loads none
        s13, s2 = ckpt.experts(layer, 2, 5, CPU)
        assert_nvfp4_identical(s13, want13.experts(2, 5))
        assert_nvfp4_identical(s2, want2.experts(2, 5))
        assert ckpt.experts(layer, 3, 3, CPU)[0].num_experts == 0
    with pytest.raises(ValueError, match="is not a MoE layer"):
        ckpt.experts(0, 0, 1, CPU)
    with pytest.raises(ValueError, match=re.escape("expert slice [0, 9) is outside [0, 8)")):
        ckpt.experts(1, 0, 9, CPU)


def test_checkpoint_of_fp32_experts_requantises_to_nearly_the_same_nvfp4(tmp_path):
    """Dequantised NVFP4 experts written as fp32 load back to the same codes and block scales (the global
    scale may move by an ulp), so a model over that checkpoint matches the synthetic model."""
    cfg = TINY
    source = SyntheticWeights(cfg, seed=2)
    tensors = synthetic_checkpoint(source, experts="fp32")
    ckpt = CheckpointWeights(write_checkpoint(tmp_path, cfg, tensors))
    for layer in (1, 2):
        for got, want in zip(ckpt.experts(layer, 0, 8, CPU), source.experts(layer, 0, 8, CPU)):
            assert torch.equal(got.packed, want.packed)
            assert torch.equal(bits(got.block_scale), bits(want.block_scale))
            torch.testing.assert_close(got.global_scale, want.global_scale, rtol=2e-7, atol=0)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_checkpoint_with_nvfp4_experts_loads_bytes_as_they_are(tmp_path, name):
    cfg = CONFIGS[name]
    source = SyntheticWeights(cfg, seed=3)
    tensors = synthetic_checkpoint(source, experts="nvfp4")
    ckpt = CheckpointWeights(write_checkpoint(tmp_path, cfg, tensors))
    for layer in range(cfg.first_k_dense_replace, cfg.num_hidden_layers):
        got13, got2 = ckpt.experts(layer, 0, cfg.n_routed_experts, CPU)
        want13, want2 = source.experts(layer, 0, cfg.n_routed_experts, CPU)
        for got, want, prefix in ((got13, want13, 0), (got2, want2, 2)):
            assert torch.equal(got.packed, want.packed)
            assert torch.equal(bits(got.block_scale), bits(want.block_scale))
            scale_2 = torch.stack([tensors[f"{expert_names(layer, e)[prefix]}.weight_scale_2"] for e in range(cfg.n_routed_experts)])
            assert torch.equal(got.global_scale, 1.0 / scale_2)
            torch.testing.assert_close(got.global_scale, want.global_scale, rtol=2e-7, atol=0)
        # slices of an NVFP4 checkpoint
        assert_nvfp4_identical(ckpt.experts(layer, 5, 8, CPU)[0], got13.experts(5, 8))
    # the whole model over the checkpoint computes what the synthetic model computes
    ref_model, _ = build_model(cfg, source)
    model, _ = build_model(cfg, ckpt)
    tokens = torch.randint(0, cfg.vocab_size, (9,), generator=torch.Generator().manual_seed(0))
    # the synthetic model has unit norms; give it the checkpoint's
    for key, t in flatten(ref_model.w).items():
        if t is not None and "norm" in key:
            t.copy_(tensors[hf_names(cfg, key)[0]])
    got, want = model.forward(tokens, [9], logits="all"), ref_model.forward(tokens, [9], logits="all")
    assert rel_err(got, want) < 1e-6


def test_checkpoint_nvfp4_one_element_scale_2_and_extra_tensors(tmp_path):
    """weight_scale_2 of shape [1] reads like a scalar; tensors the loader has no use for (ModelOpt's
    input_scale, DeepSeek-V3's multi-token-prediction layer after the last one) are ignored."""
    cfg = TINY
    tensors = synthetic_checkpoint(SyntheticWeights(cfg), experts="nvfp4")
    ref = CheckpointWeights(write_checkpoint(tmp_path / "a", cfg, tensors))
    for k in [k for k in tensors if k.endswith("weight_scale_2")]:
        tensors[k] = tensors[k].reshape(1)
        tensors[k.replace("weight_scale_2", "input_scale")] = torch.ones(())
    tensors["model.layers.3.eh_proj.weight"] = torch.zeros(64, 128)
    tensors["model.layers.3.mlp.experts.0.gate_proj.weight"] = torch.zeros(32, 64)
    got = CheckpointWeights(write_checkpoint(tmp_path / "b", cfg, tensors))
    for layer in (1, 2):
        for g, r in zip(got.experts(layer, 0, 8, CPU), ref.experts(layer, 0, 8, CPU)):
            assert_nvfp4_identical(g, r)
    d1, d2 = flatten(got.dense(CPU, torch.float32)), flatten(ref.dense(CPU, torch.float32))
    assert all((d1[k] is None and d2[k] is None) or torch.equal(d1[k], d2[k]) for k in d1)


def test_checkpoint_nvfp4_gate_and_up_with_different_weight_scale_2(tmp_path):
    cfg = TINY
    tensors = synthetic_checkpoint(SyntheticWeights(cfg), experts="nvfp4")
    gen = torch.Generator().manual_seed(5)
    h, i = cfg.hidden_size, cfg.moe_intermediate_size
    layer = 1
    originals = {}
    for e in range(cfg.n_routed_experts):
        gate_name, up_name, _ = expert_names(layer, e)
        gate = torch.randn(i, h, generator=gen) * 0.1
        up = torch.randn(i, h, generator=gen) * (0.02 if e % 2 else 0.5)  # up's scale differs from gate's
        qg, qu = quantize(gate[None]), quantize(up[None])
        tensors |= nvfp4_tensors(gate_name, qg, 0, slice(None)) | nvfp4_tensors(up_name, qu, 0, slice(None))
        originals[e] = (gate, up, qg, qu)
    ckpt = CheckpointWeights(write_checkpoint(tmp_path, cfg, tensors))
    with pytest.warns(UserWarning, match="weight_scale_2 differ; re-rounding block scales to one global scale"):
        w13, w2 = ckpt.experts(layer, 0, cfg.n_routed_experts, CPU)
    assert w13.shape == (cfg.n_routed_experts, 2 * i, h)
    deq = dequantize(w13)
    for e, (gate, up, qg, qu) in originals.items():
        exact = torch.cat([dequantize(qg)[0], dequantize(qu)[0]])  # what the checkpoint holds
        # within NVFP4 rounding of the original weights (NVFP4 alone is ~0.095 on Gaussian weights) ...
        assert rel_err(deq[e], torch.cat([gate, up])) < 0.1
        # ... and per projection (the smaller one is not flushed away): re-rounding the block scales to
        # e4m3 costs at most 2^-4 per block on top of what the checkpoint holds
        for rows, orig in ((slice(0, i), gate), (slice(i, 2 * i), up)):
            assert rel_err(deq[e, rows], exact[rows]) < 0.05
            assert rel_err(deq[e, rows], orig) < rel_err(exact[rows], orig) + 0.02
        # the projection with the larger weight_scale_2 keeps its scales bit for bit, and the codes never change
        larger, rows = (qg, slice(0, i)) if qg.global_scale[0] < qu.global_scale[0] else (qu, slice(i, 2 * i))
        assert torch.equal(bits(w13.block_scale[e, rows]), bits(larger.block_scale[0]))
        assert torch.equal(w13.global_scale[e], 1.0 / (1.0 / larger.global_scale[0]))
        assert torch.equal(w13.packed[e], torch.cat([qg.packed[0], qu.packed[0]]))
    # W2 (one projection) and the other layer are untouched: no warning there
    ref = SyntheticWeights(cfg).experts(layer, 0, cfg.n_routed_experts, CPU)[1]
    assert torch.equal(w2.packed, ref.packed)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ckpt.experts(2, 0, cfg.n_routed_experts, CPU)


def fp8_checkpoint(cfg: ModelConfig, seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A checkpoint whose linear layers (attention, dense MLP, shared and routed experts) are fp8 with
    128 x 128 block scales, as DeepSeek ships them. Returns (tensors, the fp32 weight each fp8 pair means)."""
    tensors = synthetic_checkpoint(SyntheticWeights(cfg, seed), experts="fp32")
    meant = {}
    for k, (name, t) in enumerate(sorted(tensors.items())):
        if t.dim() == 2 and "embed" not in name and "lm_head" not in name and ".mlp.gate." not in name:
            q, scale_inv, deq = fp8_blocks(block_varying(tuple(t.shape), seed * 1000 + k))
            tensors[name], tensors[name + "_scale_inv"] = q, scale_inv
            meant[name] = deq
    return tensors, meant


def check_fp8_checkpoint(path: Path, cfg: ModelConfig, tensors, meant) -> None:
    ckpt = CheckpointWeights(write_checkpoint(path, cfg, tensors))
    dense = ckpt.dense(CPU, torch.float32)
    full = {n: meant.get(n, t.float()) for n, t in tensors.items()}
    assert_dense_equal(dense, expected_dense(cfg, full, dense))
    for layer in range(cfg.first_k_dense_replace, cfg.num_hidden_layers):
        w13, w2 = ckpt.experts(layer, 0, cfg.n_routed_experts, CPU)
        names = [expert_names(layer, e) for e in range(cfg.n_routed_experts)]
        assert_nvfp4_identical(w13, quantize(torch.stack([torch.cat([meant[g + ".weight"], meant[u + ".weight"]]) for g, u, _ in names])))
        assert_nvfp4_identical(w2, quantize(torch.stack([meant[d + ".weight"] for _, _, d in names])))


def test_checkpoint_fp8_block_scaled(tmp_path):
    # dense MLP [256, 64] / [64, 256]: two tiles along one dim; everything else one partial tile
    cfg = get_config("tiny", intermediate_size=256, q_lora_rank=40)
    tensors, meant = fp8_checkpoint(cfg, seed=1)
    assert tensors["model.layers.0.mlp.gate_proj.weight_scale_inv"].shape == (2, 1)
    assert tensors["model.layers.0.mlp.down_proj.weight_scale_inv"].shape == (1, 2)
    assert tensors["model.layers.1.mlp.experts.0.gate_proj.weight"].dtype == torch.float8_e4m3fn
    check_fp8_checkpoint(tmp_path, cfg, tensors, meant)


def test_checkpoint_fp8_block_scaled_dims_not_multiple_of_128(tmp_path):
    # dense MLP [200, 64] / [64, 200], experts [2 x 144, 64] / [64, 144]
    cfg = get_config("tiny", intermediate_size=200, moe_intermediate_size=144, layers=2)
    tensors, meant = fp8_checkpoint(cfg, seed=2)
    assert tensors["model.layers.0.mlp.gate_proj.weight_scale_inv"].shape == (2, 1)
    assert tensors["model.layers.1.mlp.experts.0.down_proj.weight_scale_inv"].shape == (1, 2)
    check_fp8_checkpoint(tmp_path, cfg, tensors, meant)


def test_sharded_checkpoint_loads_like_one_file(tmp_path):
    cfg = TINY_QLORA
    tensors = synthetic_checkpoint(SyntheticWeights(cfg, seed=4), experts="bf16", dtype=torch.bfloat16)
    one = CheckpointWeights(write_checkpoint(tmp_path / "one", cfg, tensors))
    two = CheckpointWeights(write_checkpoint(tmp_path / "two", cfg, tensors, shards=2))
    files = sorted(p.name for p in (tmp_path / "two").glob("*.safetensors"))
    assert files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    # both shards hold dense tensors and experts of every MoE layer
    for f in (tmp_path / "two").glob("*.safetensors"):
        with safe_open(f, framework="pt") as st:
            keys = list(st.keys())
        assert any(".self_attn." in k for k in keys)
        assert all(any(f"layers.{layer}.mlp.experts." in k for k in keys) for layer in (1, 2))
    d1, d2 = flatten(one.dense(CPU, torch.float32)), flatten(two.dense(CPU, torch.float32))
    assert d1.keys() == d2.keys()
    for k in d1:
        assert (d1[k] is None and d2[k] is None) or torch.equal(d1[k], d2[k]), k
    for layer in (1, 2):
        for a, b in zip(one.experts(layer, 0, 8, CPU), two.experts(layer, 0, 8, CPU)):
            assert_nvfp4_identical(a, b)


# ---- 3d. loader errors ----------------------------------------------------------------------------


def test_missing_tensor_raises_key_error_naming_it(tmp_path):
    tensors = synthetic_checkpoint(SyntheticWeights(TINY), experts="bf16")
    for name, call in [
        ("model.layers.2.self_attn.kv_b_proj.weight", lambda c: c.dense(CPU, torch.float32)),
        ("lm_head.weight", lambda c: c.dense(CPU, torch.float32)),
        ("model.layers.1.mlp.gate.e_score_correction_bias", lambda c: c.dense(CPU, torch.float32)),
        ("model.layers.2.mlp.experts.6.up_proj.weight", lambda c: c.experts(2, 4, 8, CPU)),
    ]:
        path = write_checkpoint(tmp_path / name, TINY, {k: v for k, v in tensors.items() if k != name})
        with pytest.raises(KeyError, match=re.escape(f"tensor {name!r} is missing from checkpoint {path}")):
            call(CheckpointWeights(path))
    # a missing expert outside the requested slice does not matter
    CheckpointWeights(tmp_path / "model.layers.2.mlp.experts.6.up_proj.weight").experts(2, 0, 6, CPU)
    # NVFP4 experts: a missing scale
    tensors = synthetic_checkpoint(SyntheticWeights(TINY), experts="nvfp4")
    name = "model.layers.1.mlp.experts.3.down_proj.weight_scale"
    path = write_checkpoint(tmp_path / "nvfp4", TINY, {k: v for k, v in tensors.items() if k != name})
    with pytest.raises(KeyError, match=re.escape(repr(name))):
        CheckpointWeights(path).experts(1, 0, 8, CPU)
    # fp8 without its scale_inv
    tensors = synthetic_checkpoint(SyntheticWeights(TINY), experts="bf16")
    tensors["model.layers.0.self_attn.o_proj.weight"] = tensors["model.layers.0.self_attn.o_proj.weight"].to(torch.float8_e4m3fn)
    path = write_checkpoint(tmp_path / "fp8", TINY, tensors)
    with pytest.raises(KeyError, match=re.escape("'model.layers.0.self_attn.o_proj.weight_scale_inv'")):
        CheckpointWeights(path).dense(CPU, torch.float32)


def test_wrong_shape_raises_value_error_naming_tensor_and_shapes(tmp_path):
    tensors = synthetic_checkpoint(SyntheticWeights(TINY), experts="bf16")
    name = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"  # [kv_lora + rope, H] = [40, 64]
    path = write_checkpoint(tmp_path / "a", TINY, tensors | {name: tensors[name].T.contiguous()})
    with pytest.raises(ValueError, match=re.escape(f"tensor {name!r} in {path} has shape (64, 40), expected (40, 64)")):
        CheckpointWeights(path).dense(CPU, torch.float32)
    name = "model.layers.2.mlp.experts.0.down_proj.weight"  # [H, I] = [64, 32]
    path = write_checkpoint(tmp_path / "b", TINY, tensors | {name: tensors[name][:, :16].contiguous()})
    with pytest.raises(ValueError, match=re.escape(f"tensor {name!r} in {path} has shape (64, 16), expected (64, 32)")):
        CheckpointWeights(path).experts(2, 0, 1, CPU)
    # a config that disagrees with the tensors (hidden 80 in config.json, 64 in the tensors)
    path = write_checkpoint(tmp_path / "c", dataclasses.replace(TINY, hidden_size=80), tensors)
    with pytest.raises(ValueError, match=re.escape("'model.layers.0.self_attn.kv_a_proj_with_mqa.weight'") + ".*" + re.escape("(40, 64), expected (40, 80)")):
        CheckpointWeights(path).dense(CPU, torch.float32)
    # NVFP4: wrong packed shape, wrong scale dtype
    tensors = synthetic_checkpoint(SyntheticWeights(TINY), experts="nvfp4")
    name = "model.layers.1.mlp.experts.2.gate_proj.weight"
    path = write_checkpoint(tmp_path / "d", TINY, tensors | {name: tensors[name][:, :16].contiguous()})
    with pytest.raises(ValueError, match=re.escape(f"tensor {name!r} in {path} is torch.uint8 (32, 16), expected torch.uint8 (32, 32)")):
        CheckpointWeights(path).experts(1, 0, 8, CPU)
    name = "model.layers.1.mlp.experts.2.up_proj.weight_scale"
    path = write_checkpoint(tmp_path / "e", TINY, tensors | {name: tensors[name].float()})
    with pytest.raises(ValueError, match=re.escape(f"{name!r}") + ".*is torch.float32 .*expected torch.float8_e4m3fn"):
        CheckpointWeights(path).experts(1, 0, 8, CPU)
    # NVFP4-packed bytes where a dense weight belongs
    path = write_checkpoint(tmp_path / "f", TINY, synthetic_checkpoint(SyntheticWeights(TINY)) | {"model.norm.weight": torch.zeros(64, dtype=torch.uint8)})
    with pytest.raises(ValueError, match="'model.norm.weight' is NVFP4-packed"):
        CheckpointWeights(path).dense(CPU, torch.float32)


def test_bad_checkpoint_directories(tmp_path):
    tensors = synthetic_checkpoint(SyntheticWeights(TINY))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CheckpointWeights(tmp_path / "nowhere")
    no_config = tmp_path / "no_config"
    write_checkpoint(no_config, TINY, tensors)
    (no_config / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json at"):
        CheckpointWeights(no_config)
    no_tensors = tmp_path / "no_tensors"
    no_tensors.mkdir()
    (no_tensors / "config.json").write_text(json.dumps(hf_config_dict(TINY)))
    with pytest.raises(FileNotFoundError, match=r"holds no \*\.safetensors files"):
        CheckpointWeights(no_tensors)
    llama = write_checkpoint(tmp_path / "llama", hf_config_dict(TINY) | {"model_type": "llama"}, tensors)
    with pytest.raises(ValueError, match="model_type 'llama' is not a DeepSeek-V3-family model"):
        CheckpointWeights(llama)
    with pytest.raises(ValueError, match="model_type 'llama'"):
        load_weight_source(str(llama))


def test_load_weight_source(tmp_path):
    for model in ("tiny", "synthetic:tiny"):
        s = load_weight_source(model, seed=5, layers=2)
        assert isinstance(s, SyntheticWeights) and s.seed == 5 and s.config == get_config("tiny", layers=2)
    with pytest.raises(ValueError) as info:
        load_weight_source("not-a-model")
    msg = str(info.value)
    assert "'not-a-model' is neither a built-in config" in msg and "nor an existing checkpoint directory" in msg
    for name in builtin_names():
        assert "synthetic:" + name in msg
    with pytest.raises(ValueError, match="neither a built-in config"):
        load_weight_source("synthetic:nope")
    with pytest.raises(ValueError, match="unknown model config field"):
        load_weight_source("tiny", bogus=1)
    path = write_checkpoint(tmp_path / "ckpt", TINY, synthetic_checkpoint(SyntheticWeights(TINY)))
    s = load_weight_source(str(path))
    assert isinstance(s, CheckpointWeights) and s.config.hidden_size == 64
    with pytest.raises(ValueError, match=r"config overrides \['num_hidden_layers'\] apply to synthetic models only"):
        load_weight_source(str(path), num_hidden_layers=2)
    with pytest.raises(ValueError, match=r"config overrides \['layers'\] apply to synthetic models only"):
        load_weight_source(str(path), layers=2)


# ---- 4. end to end against transformers' DeepseekV3ForCausalLM ---------------------------------------


def _transformers():
    transformers = pytest.importorskip("transformers")
    if not (hasattr(transformers, "DeepseekV3Config") and hasattr(transformers, "DeepseekV3ForCausalLM")):
        pytest.skip(f"transformers {transformers.__version__} has no DeepseekV3ForCausalLM")
    return transformers


def hf_transformers_kwargs(cfg: ModelConfig) -> dict:
    """DeepseekV3Config arguments for a ModelConfig (rope settings left to the caller)."""
    return dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        moe_intermediate_size=cfg.moe_intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads,
        n_shared_experts=cfg.n_shared_experts,
        n_routed_experts=cfg.n_routed_experts,
        routed_scaling_factor=cfg.routed_scaling_factor,
        kv_lora_rank=cfg.kv_lora_rank,
        q_lora_rank=cfg.q_lora_rank,
        qk_rope_head_dim=cfg.qk_rope_head_dim,
        v_head_dim=cfg.v_head_dim,
        qk_nope_head_dim=cfg.qk_nope_head_dim,
        n_group=cfg.n_group,
        topk_group=cfg.topk_group,
        num_experts_per_tok=cfg.num_experts_per_tok,
        first_k_dense_replace=cfg.first_k_dense_replace,
        norm_topk_prob=cfg.norm_topk_prob,
        rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        rope_interleave=True,  # DeepSeek's rope rotates adjacent pairs
        num_mtp_layers=0,
    )


E2E = {
    # fp32 experts as save_pretrained writes them, default rope
    "fp32-experts": get_config("tiny", routed_scaling_factor=1.7, max_position_embeddings=64),
    # ModelOpt NVFP4 experts, q_lora, YaRN that matters at these positions, rope_theta, 3 groups of which
    # 2 are kept, no dense layer, unnormalised top-k weights, two shared experts
    "nvfp4-experts-yarn": get_config(
        "tiny",
        q_lora_rank=24,
        rope_theta=50000.0,
        rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=8, beta_fast=4, beta_slow=1, mscale=1.0, mscale_all_dim=0.7),
        max_position_embeddings=32,
        n_routed_experts=12,
        n_group=3,
        topk_group=2,
        num_experts_per_tok=3,
        n_shared_experts=2,
        first_k_dense_replace=0,
        num_hidden_layers=2,
        norm_topk_prob=False,
    ),
}


@pytest.mark.parametrize("variant", list(E2E))
def test_logits_match_transformers_deepseek_v3(tmp_path, variant):
    transformers = _transformers()
    cfg = E2E[variant]
    if cfg.rope_scaling is None:
        rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    else:
        rope = {"rope_type": "yarn", "rope_theta": cfg.rope_theta, **dataclasses.asdict(cfg.rope_scaling)}
    hf_cfg = transformers.DeepseekV3Config(
        **hf_transformers_kwargs(cfg), rope_parameters=rope, attn_implementation="eager", experts_implementation="eager"
    )
    torch.manual_seed(0)
    hf = transformers.DeepseekV3ForCausalLM(hf_cfg).float().eval()
    assert hf.config._attn_implementation == "eager"
    # Re-draw every weight at a scale where attention, rope, routing and its bias all matter (the HF
    # init, std 0.02 and zero bias, leaves attention nearly uniform and the bias unused).
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)
        for layer in hf.model.layers[cfg.first_k_dense_replace :]:
            layer.mlp.gate.e_score_correction_bias.copy_(0.1 * torch.randn(cfg.n_routed_experts, generator=gen))
            experts = layer.mlp.experts
            # our loader holds experts in NVFP4: start from weights that NVFP4 represents
            experts.gate_up_proj.copy_(dequantize(quantize(experts.gate_up_proj)))
            experts.down_proj.copy_(dequantize(quantize(experts.down_proj)))
    hf.save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    with safe_open(file, framework="pt") as st:
        saved = {k: st.get_tensor(k) for k in st.keys()}
    i = cfg.moe_intermediate_size
    # what save_pretrained writes: per-expert gate/up/down (the in-memory fused [E, 2I, H] is gate rows, then up)
    first = cfg.first_k_dense_replace
    experts = hf.model.layers[first].mlp.experts
    gate, up, down = expert_names(first, 1)
    assert torch.equal(saved[gate + ".weight"], experts.gate_up_proj[1, :i])
    assert torch.equal(saved[up + ".weight"], experts.gate_up_proj[1, i:])
    assert torch.equal(saved[down + ".weight"], experts.down_proj[1])
    assert f"model.layers.{first}.mlp.gate.e_score_correction_bias" in saved

    if variant.startswith("nvfp4"):
        # ModelOpt NVFP4 experts in place of the fp32 ones: the loaded NVFP4 is then exactly these bytes
        for layer in range(first, cfg.num_hidden_layers):
            for e in range(cfg.n_routed_experts):
                gate, up, down = expert_names(layer, e)
                q13 = quantize(torch.cat([saved.pop(gate + ".weight"), saved.pop(up + ".weight")])[None])
                q2 = quantize(saved.pop(down + ".weight")[None])
                saved |= nvfp4_tensors(gate, q13, 0, slice(0, i)) | nvfp4_tensors(up, q13, 0, slice(i, 2 * i))
                saved |= nvfp4_tensors(down, q2, 0, slice(None))
        save_file(saved, str(file), metadata={"format": "pt"})

    source = CheckpointWeights(tmp_path)
    assert source.config == dataclasses.replace(cfg, name=str(tmp_path))
    model, replicated = build_model(cfg, source)
    # The HF model computes with exactly the experts we loaded.
    with torch.no_grad():
        for m, view in enumerate(replicated.views):
            (w13,), (w2,) = view.w13.segments, view.w2.segments
            experts = hf.model.layers[m + first].mlp.experts
            if variant.startswith("nvfp4"):
                with safe_open(file, framework="pt") as st:
                    gate = expert_names(m + first, 3)[0]
                    assert torch.equal(w13.packed[3, :i], st.get_tensor(gate + ".weight"))
            else:
                # fp32 NVFP4-representable experts re-quantise losslessly up to an ulp of the global scale
                assert rel_err(dequantize(w13), experts.gate_up_proj) < 1e-6
                assert rel_err(dequantize(w2), experts.down_proj) < 1e-6
            experts.gate_up_proj.copy_(dequantize(w13))
            experts.down_proj.copy_(dequantize(w2))

    n = 13
    tokens = torch.randint(0, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(2))
    got = model.forward(tokens, [n], logits="all")
    with torch.no_grad():
        want = hf(input_ids=tokens[None]).logits[0].float()
    assert got.shape == want.shape == (n, cfg.vocab_size)
    assert torch.isfinite(want).all() and want.std() > 0.1
    assert rel_err(got, want) < 1e-4
    # and the test can tell: a model without YaRN / with other experts is far off
    if cfg.rope_scaling is not None:
        plain = dataclasses.replace(cfg, rope_scaling=None)
        other, _ = build_model(plain, source)
        assert rel_err(other.forward(tokens, [n], logits="all"), want) > 1e-2
