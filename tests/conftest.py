import os
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))
# Worker processes started by the launcher import test jobs (tests/launcher_jobs.py) from here.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
# Without a Hopper GPU, CuTe DSL compiles for one (tests/test_cute_kernels.py); it reads this once, at first use.
if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
    os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def build_model(cfg, dtype=torch.float32, seed=0, device="cpu", kernels="torch"):
    """A single-rank model with every expert local (the replicated strategy)."""
    from dwdp_bench.kernels import get_kernels
    from dwdp_bench.runtime.comm import RankContext
    from dwdp_bench.runtime.model import Model
    from dwdp_bench.runtime.strategies import Replicated, StrategyOptions
    from dwdp_bench.runtime.timeline import Timeline
    from dwdp_bench.runtime.weights import SyntheticWeights

    source = SyntheticWeights(cfg, seed)
    dev = torch.device(device)
    ctx = RankContext(0, 1, 0, dev)
    timeline = Timeline(dev, enabled=False)
    experts = Replicated(ctx, source, get_kernels(kernels, dev), StrategyOptions(), timeline)
    return Model(cfg, source.dense(dev, dtype), experts, timeline=timeline), source, experts
