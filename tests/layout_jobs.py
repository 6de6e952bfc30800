"""A job for tests/test_e2e_cpu.py, run on every rank as "layout_jobs:<name>" (tests/ is on PYTHONPATH):
every strategy with a kernel set that stores expert bytes in its own order, as the fused kernels do."""

import torch

from dwdp_bench.kernels import WeightView
from dwdp_bench.kernels.nvfp4 import ROWS, NVFP4Weights, check_layout
from dwdp_bench.kernels.reference import TorchReferenceKernels
from dwdp_bench.runtime.engine import Engine
from dwdp_bench.runtime.strategies import StrategyOptions
from dwdp_bench.runtime.weights import load_weight_source
from dwdp_bench.runtime.workload import Workload, WorkloadSpec

FLIPPED = "test-flipped"


def _flip(w: NVFP4Weights, layout: str) -> NVFP4Weights:
    """Each expert's rows in reverse order (its own inverse), labelled `layout`."""
    return NVFP4Weights(w.packed.flip(1), w.block_scale.flip(1), w.global_scale, layout)


class FlippedKernels(TorchReferenceKernels):
    """The reference kernels, reading expert weights whose rows are stored in reverse."""

    layouts = (FLIPPED, FLIPPED)

    def prepare_experts(self, w13, w2):
        return _flip(w13, FLIPPED), _flip(w2, FLIPPED)

    def _rows(self, view: WeightView) -> WeightView:
        check_layout(view, FLIPPED, "FlippedKernels")
        return WeightView([_flip(s, ROWS) for s in view.segments])

    def fc1(self, x, plan, w13):
        return super().fc1(x, plan, self._rows(w13))

    def fc2(self, h, plan, w2):
        return super().fc2(h, plan, self._rows(w2))


def flipped_weights_give_the_same_logits(ctx, args):
    source = load_weight_source("synthetic:tiny", 0)
    dense = source.dense(ctx.device, torch.float32)
    workload = Workload.generate(WorkloadSpec(requests_per_rank=2, mean_len=48, cv=0.2, max_tokens=160), ctx.world_size)
    for name in ("replicated", "dwdp", "ep"):
        logits = []
        for kernels in (TorchReferenceKernels(), FlippedKernels()):
            engine = Engine(ctx, source, dense, kernels)
            model = engine.model(name, StrategyOptions())
            logits.append(engine.run(name, model, workload, keep_logits=True).last_logits)
            model.experts.close()
        assert logits[0] and all(torch.equal(a, b) for a, b in zip(*logits)), f"{name}: logits differ when the kernels reorder expert bytes"
        ctx.progress(f"{name}: identical")
    ctx.barrier()
