"""pytest-benchmark view of ``bench_rms_norm``: ``pytest benchmarks/ --benchmark-only`` times the
providers that run on CPU (our cpu backend, eager, torch.compile) at one small shape, fwd and fwd+bwd.

It lives under benchmarks/, so the test suite (``pytest tests/``) never collects it; providers that
cannot run here are reported as skips with their reason.
"""

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from benchmarks import bench_rms_norm as bench  # noqa: E402
from benchmarks.common import Unsupported  # noqa: E402

DEVICE = torch.device("cpu")
PROVIDERS = {p.name: p for p in bench.providers(DEVICE)}


@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("name", list(PROVIDERS))
def test_rms_norm(benchmark, name, pass_):
    provider = PROVIDERS[name]
    if provider.skip_reason:
        pytest.skip(provider.skip_reason)
    case = bench.Case(n=256, d=4096, dtype=torch.float32, residual=False, pass_=pass_)
    try:
        fn = provider.build(case)
    except Unsupported as exc:
        pytest.skip(str(exc))
    inp = bench.make_inputs(case, 1, DEVICE)[0]
    fn(inp)  # warm-up: torch.compile compiles here, outside the timed rounds
    benchmark.group = f"rms_norm {case.label} fp32 {pass_}"
    benchmark.extra_info["bytes"] = bench.traffic(case)[0]
    benchmark(fn, inp)
