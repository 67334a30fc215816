"""The fused head under FSDP2, DDP and DeepSpeed ZeRO-2/3 on 2 gloo ranks (CPU), against one process.

Each group of checks runs once under ``torchrun --nproc-per-node 2`` (tests/_distributed.py,
which documents the comparison); the tests here read its per-check differences. Every
scenario is fp32 and compared with ONE process computing the same DPO objective on the whole
batch from the model's plain logits: loss of both steps, every gathered gradient, every
parameter after 2 SGD steps, within 1e-5 relative. Packed scenarios (``packing=
"shared_prompt_packed"``) are compared with one process running the same packed layouts
(loss, gradients, parameters) and with the plain logits of the padded batch (loss, gradients).
"""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5


def _run_group(group, tmp_path_factory, timeout=420):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    out = tmp_path_factory.mktemp(group) / "results.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
           "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "tests._distributed", group, str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"{group}: the 2-rank run did not finish in {timeout}s (a hang?)\n{log[-4000:]}")
    assert proc.returncode == 0, f"{group}: the 2-rank run failed\n{log[-6000:]}"
    with open(out) as f:
        return {r["name"]: r for r in json.load(f)}


@pytest.fixture(scope="module")
def fsdp2(tmp_path_factory):
    return _run_group("fsdp2", tmp_path_factory)


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    return _run_group("ddp", tmp_path_factory)


@pytest.fixture(scope="module")
def deepspeed(tmp_path_factory):
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install deepspeed)")
    return _run_group("deepspeed", tmp_path_factory)


def _assert_matches(result):
    assert result["n_params"] >= 20
    for key in ("loss", "grad", "param"):
        assert result[key] <= TOL, (f"{result['name']}: {key} differs from one process by {result[key]:.3g} "
                                    f"relative (worst: {result.get(key + '_worst', '-')})")


FSDP2_SCENARIOS = ["fsdp2_head_in_root", "fsdp2_head_own_unit", "fsdp2_tied", "fsdp2_root_only",
                   "fsdp2_tied_root_only", "fsdp2_packed_head_own_unit", "fsdp2_packed_tied", "fsdp2_hsdp_head_own_unit", "fsdp2_trl_patch_head_own_unit",
                   "fsdp2_grad_accum_no_sync", "fsdp2_standard_trainer"]


@pytest.mark.parametrize("name", FSDP2_SCENARIOS)
def test_fsdp2_matches_one_process(fsdp2, name):
    _assert_matches(fsdp2[name])


@pytest.mark.parametrize("group, name", [("fsdp2", "fsdp2_standard_trainer"), ("ddp", "ddp_standard_trainer")])
def test_standard_trainer_metrics_over_ranks(request, group, name):
    r = request.getfixturevalue(group)[name]
    assert r["metrics"] <= 1e-4, r    # every logged metric, gathered over both ranks
    assert r["pairs"] == [8, 8]       # 2 micro-batches of 4 pairs, 2 per rank


@pytest.mark.parametrize("group, name", [("fsdp2", "fsdp2_packed_head_own_unit"), ("fsdp2", "fsdp2_packed_tied"),
                                         ("deepspeed", "deepspeed_zero3_packed")])
def test_packing_matches_plain_logits(request, group, name):
    # packing="shared_prompt_packed" under FSDP2 / ZeRO-3 (each rank's 2 shared-prompt pairs in one row)
    # against one process on the padded batch's plain logits: the loss and every gathered gradient.
    # (The parameters after 2 steps at LR 0.5 differ by fp32 layout rounding alone, ~1e-5, in one
    # process too; the *_matches_one_process tests check them against the same layouts in one process.)
    plain = request.getfixturevalue(group)[name]["vs_plain"]
    assert plain["n_params"] >= 20
    for key in ("loss", "grad"):
        assert plain[key] <= TOL, (name, key, plain[key], plain.get(key + "_worst"))


def test_fsdp2_pre_backward_hooks_fire(fsdp2):
    # The head's output carries its unit's pre-backward hook; the root's fires through the model output.
    assert fsdp2["fsdp2_head_own_unit"]["pre_backward_calls"] == {"lm_head": 2, "root": 2}
    assert fsdp2["fsdp2_packed_head_own_unit"]["pre_backward_calls"] == {"lm_head": 2, "root": 2}
    assert fsdp2["fsdp2_head_in_root"]["pre_backward_calls"] == {"root": 2}
    assert fsdp2["fsdp2_root_only"]["pre_backward_calls"] == {"root": 2}


def test_fsdp2_mixed_precision(fsdp2):
    r = fsdp2["fsdp2_mixed_precision_bf16_fp32"]
    # the fused head ran on FSDP's bf16 compute copy, like the model's own lm_head
    assert r["head_weight_dtype_in_forward"] == {"fused": "torch.bfloat16", "plain": "torch.bfloat16"}
    fused, plain = r["fused_vs_truth"], r["plain_vs_truth"]
    # 16-bit rule against float64 one-process truth: no worse than plain bf16 logits under the same
    # policy (10% slack for bf16 rounding noise); a lost or unreduced gradient would be off by ~1.
    for key in ("loss", "grad"):
        assert fused[key] <= 1.1 * plain[key] + 1e-3, (key, fused[key], plain[key])
    assert r["fused_vs_plain"]["grad"] < 0.05


def test_fsdp2_precompute_reference_pass(fsdp2):
    r = fsdp2["fsdp2_precompute_compute_entries"]
    assert r["logps"] <= TOL and r["vs_impl_reference"] <= TOL
    assert r["check_lm_head_spec_worst"] <= 1e-4


@pytest.mark.parametrize("name", ["ddp", "ddp_tied", "ddp_standard_trainer"])
def test_ddp_matches_one_process(ddp, name):
    _assert_matches(ddp[name])
    if "rank_spread" in ddp[name]:
        assert ddp[name]["rank_spread"] == 0.0, "parameters diverged across DDP ranks"


@pytest.mark.parametrize("name", ["deepspeed_zero2", "deepspeed_zero2_tied", "deepspeed_zero3",
                                  "deepspeed_zero3_tied", "deepspeed_zero3_tied_trl_patch",
                                  "deepspeed_zero3_rank_without_tokens", "deepspeed_zero3_packed"])
def test_deepspeed_matches_one_process(deepspeed, name):
    _assert_matches(deepspeed[name])


def test_deepspeed_zero3_precompute_reference_pass(deepspeed):
    r = deepspeed["deepspeed_zero3_tied_precompute_compute_entries"]
    assert r["logps"] <= TOL and r["check_lm_head_spec_worst"] <= 1e-4
