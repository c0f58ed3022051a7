"""minitrain bench-model on the CPU: the reported numbers, the formula, compile + checkpointing flags."""

import dataclasses
import json

import pytest

from minitrain.__main__ import main
from minitrain.config import get_config
from minitrain.train import flops_per_token


@pytest.mark.parametrize("extra", [[], ["--compile", "--ac", "op"]], ids=["eager", "compiled-op"])
def test_bench_model_reports_throughput_mfu_and_matmul_peak(tmp_path, capsys, extra):
    out = tmp_path / "bench.json"
    assert main(["bench-model", "--preset", "7b", "--seq", "16", "--layers", "1", "--steps", "1", "--device", "cpu",
                 "--json", str(out), *extra]) == 0
    text = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert "tokens/s" in text and "measured matmul" in text
    assert res["model"] == "tiny-rope" and res["layers"] == 1 and res["compile"] == bool(extra)
    assert res["mfu"] is None and res["peak_tflops"] is None  # no dense-bf16 peak for a CPU
    assert res["matmul_tflops"] > 0 and res["of_matmul"] == pytest.approx(res["tflops"] / res["matmul_tflops"])
    cfg = get_config("tiny-rope")
    assert res["flops_per_token"] == flops_per_token(dataclasses.replace(cfg, num_layers=1), 16)
    assert res["tflops"] == pytest.approx(res["tokens_per_s"] * res["flops_per_token"] / 1e12)
    assert "6*N + 12*L*D*T" in res["mfu_formula"]


def test_mfu_uses_the_dense_bf16_peak(monkeypatch):
    from minitrain.bench import MFU_FORMULA
    from minitrain.train import peak_flops
    import torch

    monkeypatch.setenv("MINITRAIN_PEAK_TFLOPS", "989")
    assert peak_flops(torch.device("cpu")) == 989e12
    assert "input embedding" in MFU_FORMULA
