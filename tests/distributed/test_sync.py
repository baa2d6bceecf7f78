"""Synchronous data parallel and sharded YellowFin on 2 ranks (gloo on loopback, launched by torchrun).

One torchrun launch runs every scenario (distributed_scenarios.py); each test compares what the ranks
wrote with one unsharded process stepping YellowFin on the combined batch. The launch is bounded
(LAUNCH_TIMEOUT_S, then torchrun and both ranks are killed as one process group).
"""

import os
import signal
import subprocess
import sys

import pytest
import torch

import distributed_scenarios as scenarios
from yellowfin.distributed import FullyShardedYellowFin, zero_redundancy_yellowfin

pytestmark = pytest.mark.timeout(240)

LAUNCH_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    """Launch every scenario once on 2 ranks; return {scenario: [rank0 result, rank1 result]}."""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    out_dir = tmp_path_factory.mktemp("ranks")
    names = ["ddp", "zero", "zero_idle_shard", "fsdp", "zero_per_group", "zero_scale_free", "fsdp_scale_free",
             "zero_adam", "fsdp_adam", "zero_adam_fused", "zero_average", "fsdp_average", "zero_primal_average",
             "fsdp_primal_average", "zero_adam_primal_average", "fsdp_adam_primal_average", "refusals"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", PYTHONPATH=os.pathsep.join(
        [os.path.dirname(__file__)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               scenarios.__file__, str(out_dir), *names]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # torchrun and both ranks
        output, _ = process.communicate()
        pytest.fail(f"torchrun did not finish in {LAUNCH_TIMEOUT_S}s:\n{output[-3000:]}")
    assert process.returncode == 0, output[-3000:]
    results = {}
    for name in names:
        results[name] = [torch.load(out_dir / f"{name}_rank{rank}.pt", weights_only=False) for rank in range(2)]
    return results


def _ok(results, name):
    for rank, result in enumerate(results[name]):
        assert "error" not in result, f"rank {rank} of {name}: {result['error']}"
    return results[name]


def assert_matches_reference(name, ranks):
    reference = scenarios.reference_run(name)
    for rank, result in enumerate(ranks):
        for param_name, expected in reference["params"].items():
            torch.testing.assert_close(result["params"][param_name], expected, rtol=1e-7, atol=1e-10,
                                       msg=lambda m: f"rank {rank}, {param_name}: {m}")
        stats, expected_stats = result["stats"], reference["stats"]
        if isinstance(expected_stats, dict):  # one tuner; per_group_tuning gives one record per group
            stats, expected_stats = [stats], [expected_stats]
        assert len(stats) == len(expected_stats)
        for got, expected in zip(stats, expected_stats):
            for key in ("mu", "lr", "h_min", "h_max", "grad_var", "dist", "distance", "secant_curvature", "signal"):
                if key in expected:
                    assert got[key] == pytest.approx(expected[key], rel=1e-7, abs=1e-12), key
            assert got["step"] == scenarios.STEPS


def test_ddp_ranks_identical_and_equal_to_combined_batch(rank_results):
    ranks = _ok(rank_results, "ddp")
    for name, p0 in ranks[0]["params"].items():
        assert torch.equal(p0, ranks[1]["params"][name]), f"{name} differs between ranks"
    assert ranks[0]["stats"] == ranks[1]["stats"]  # the same mu, alpha and estimates, bit for bit
    assert_matches_reference("ddp", ranks)


def test_ddp_step_communicates_nothing(rank_results):
    # DDP all-reduces in backward; YellowFin's step then works on the full gradient every rank holds.
    for result in _ok(rank_results, "ddp"):
        assert result["all_reduce_calls"] == [0] * scenarios.STEPS


def test_zero_redundancy_matches_unsharded_with_sparsity_correction(rank_results):
    ranks = _ok(rank_results, "zero")
    assert_matches_reference("zero", ranks)
    assert ranks[0]["stats"] == ranks[1]["stats"]


@pytest.mark.parametrize("name", ["zero", "fsdp", "zero_scale_free", "fsdp_scale_free", "zero_adam", "fsdp_adam",
                                  "zero_adam_fused", "zero_average", "fsdp_average", "zero_primal_average",
                                  "fsdp_primal_average", "zero_adam_primal_average", "fsdp_adam_primal_average"])
def test_sharded_state_dict_reloads_per_rank(rank_results, name):
    for result in _ok(rank_results, name):
        assert result["reloaded_stats"] == result["stats"]


@pytest.mark.parametrize("name", ["zero", "zero_idle_shard", "fsdp", "zero_per_group", "zero_scale_free",
                                  "fsdp_scale_free", "zero_adam", "fsdp_adam", "zero_adam_fused", "zero_average",
                                  "fsdp_average", "zero_primal_average", "fsdp_primal_average",
                                  "zero_adam_primal_average", "fsdp_adam_primal_average"])
def test_sharded_step_makes_one_all_reduce(rank_results, name):
    for result in _ok(rank_results, name):
        assert result["all_reduce_calls"] == [1] * scenarios.STEPS


def test_zero_rank_without_gradients_still_tunes_globally(rank_results):
    ranks = _ok(rank_results, "zero_idle_shard")
    # One rank's partition is the unused parameter alone: it steps nothing yet enters every all-reduce.
    assert sorted(r["local_params_with_grad"] for r in ranks) == [0, 2]
    assert_matches_reference("zero_idle_shard", ranks)
    assert ranks[0]["stats"] == ranks[1]["stats"]


def test_zero_per_group_tuning_matches_unsharded(rank_results):
    ranks = _ok(rank_results, "zero_per_group")
    assert all(len(result["stats"]) == 2 for result in ranks)  # one tuner per group, each on its whole group
    assert_matches_reference("zero_per_group", ranks)
    assert ranks[0]["stats"] == ranks[1]["stats"]


@pytest.mark.parametrize("name", ["zero_scale_free", "fsdp_scale_free", "zero_adam", "fsdp_adam", "zero_adam_fused"])
def test_the_scale_free_tuner_sharded_matches_unsharded(rank_results, name):
    ranks = _ok(rank_results, name)
    assert_matches_reference(name, ranks)
    assert ranks[0]["stats"] == ranks[1]["stats"] and ranks[0]["stats"]["distance"] > 0.0


@pytest.mark.parametrize("name", ["zero_average", "fsdp_average", "zero_primal_average", "fsdp_primal_average",
                                  "zero_adam_primal_average", "fsdp_adam_primal_average"])
def test_the_iterate_average_sharded_matches_unsharded(rank_results, name):
    ranks = _ok(rank_results, name)
    assert_matches_reference(name, ranks)
    expected = scenarios.reference_run(name)["averaged"]
    covered = set()
    for result in ranks:  # ZeRO: each rank the parameters it owns; FSDP: every rank the gathered model
        for param_name, value in result["averaged"].items():
            torch.testing.assert_close(value, expected[param_name], rtol=1e-7, atol=1e-10)
            covered.add(param_name)
    assert covered == set(expected) and not torch.equal(expected["0.weight"], ranks[0]["params"]["0.weight"])


def test_fully_sharded_matches_unsharded(rank_results):
    ranks = _ok(rank_results, "fsdp")
    assert_matches_reference("fsdp", ranks)
    assert ranks[0]["stats"] == ranks[1]["stats"]


@pytest.mark.parametrize("name", ["zero", "fsdp"])
def test_each_rank_steps_only_its_shard(rank_results, name):
    # The comparisons above mean something only if no rank holds the whole model.
    total = sum(p.numel() for p in scenarios.reference_run(name)["params"].values())
    local = [result["local_numel"] for result in _ok(rank_results, name)]
    assert sum(local) == total and max(local) < total, local


# ---------------------------------------------------------------------------- refusals
def test_sharded_layouts_that_cannot_tune_globally_raise(rank_results):
    for result in _ok(rank_results, "refusals"):
        errors = result["errors"]
        assert "needs Shard placements on a 1-D mesh" in (errors["fsdp_replicated"] or "no error")
        assert "plain tensor, not a DTensor" in (errors["fsdp_mixed_plain"] or "no error")
        assert "shards them twice" in (errors["zero_over_dtensor"] or "no error")


def test_fully_sharded_refuses_plain_tensor():
    with pytest.raises(ValueError, match="plain tensor, not a DTensor"):
        FullyShardedYellowFin([torch.zeros(3, requires_grad=True)])


def test_zero_refuses_overlap_with_ddp():
    with pytest.raises(ValueError, match="functional optimizer"):
        zero_redundancy_yellowfin([torch.zeros(3, requires_grad=True)], overlap_with_ddp=True)


def test_zero_refuses_foreign_shard_group():
    with pytest.raises(ValueError, match="shard_group is set from process_group"):
        zero_redundancy_yellowfin([torch.zeros(3, requires_grad=True)], shard_group=None)
