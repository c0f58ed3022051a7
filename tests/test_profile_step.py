"""benchmarks/profile_step.py on the CPU (the dry run of the GPU profile gpu_check.sh writes)."""

import json

import pytest

from benchmarks import profile_step


def test_categorize_by_phase_and_name():
    c = profile_step.categorize
    assert c("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n", "forward", "none") == "GEMM"
    assert c("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT", "backward", "none") == "GEMM"
    assert c("_attn_fwd", "forward", "none") == "attention"
    assert c("_attn_fwd", "backward", "full") == "recompute"  # checkpointed layers redo the forward
    assert c("_attn_bwd_dkdv", "backward", "full") == "attention"
    assert c("void baichuan::rms_norm_bwd_kernel<c10::BFloat16, 8>", "backward", "op") == "norms/activations"
    assert c("void baichuan::rms_norm_fwd_kernel<c10::BFloat16, 8>", "backward", "op") == "recompute"
    assert c("rms_norm_fwd_kernel", "backward", "none") == "norms/activations"
    assert c("sm90_xmma_gemm", "loss", "none") == "loss"
    assert c("multi_tensor_apply_kernel", "optimizer", "none") == "optimizer"
    assert c("elementwise_kernel", "forward", "none") == "other"


def test_union_length_counts_overlap_once():
    assert profile_step.union_length([(0, 2), (1, 3), (5, 6), (5.5, 5.7)]) == pytest.approx(4.0)
    assert profile_step.union_length([]) == 0.0


@pytest.mark.parametrize("ac", ["none", "op"])
def test_profile_one_step_on_cpu(tmp_path, ac):
    assert profile_step.main(["--device", "cpu", "--seq", "16", "--layers", "1", "--ac", ac, "--top", "5",
                              "--out", str(tmp_path), "--json"]) == 0
    md = (tmp_path / "profile_step.md").read_text()
    res = json.loads((tmp_path / "profile_step.json").read_text())
    assert "| GEMM |" in md and "Top 5 by time" in md and len(res["top"]) == 5
    assert set(res["phases_ms"]) == {"forward", "loss", "backward", "optimizer"}
    b = res["breakdown_ms"]
    assert b["GEMM"] > 0 and b["loss"] > 0 and b["optimizer"] > 0 and b["attention"] > 0
    # the categories partition the phase windows (idle is the rest)
    assert sum(b.values()) == pytest.approx(res["window_ms"], rel=0.02)
