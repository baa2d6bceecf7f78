"""The scale-free tuner (``tuner="scale_free"``, docs/algorithm.md §8): its trajectory does not depend on the
loss scale, its three flavours agree, it reproduces the research prototype (benchmarks/tuner_screen.py's
FlatTuner, variant "ds_memory_0.99"), and it saves, loads and skips like the reference."""

import io
import sys
from pathlib import Path

import pytest
import torch
import torch._dynamo
from torch import nn

from yellowfin import YellowFin
from yellowfin.state import SCALE_FREE_FIELDS
from helpers import flat_state, host_reads_forbidden, run_with_holes

FLAVOURS = {"single_tensor": dict(foreach=False), "multi_tensor": {}, "compiled": dict(fused=True)}


@pytest.fixture(autouse=True)
def fresh_compile_cache():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def mlp_problem(seed=0):
    """A 5-16-1 tanh MLP in float64 and fixed regression data (64 rows, read 16 at a time in turn)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 1)).double()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(64, 5, dtype=torch.float64, generator=generator)
    y = torch.sin(x[:, :1]) + 0.1 * torch.randn(64, 1, dtype=torch.float64, generator=generator)
    return model, x, y


def train(make_optimizer, steps=300, loss_scale=1.0, after_step=None):
    """The MLP trained with its loss multiplied by ``loss_scale``; returns (flat parameters, model, optimizer).
    ``after_step(opt)`` is called after every step."""
    model, x, y = mlp_problem()
    opt = make_optimizer(model.parameters())
    for step in range(steps):
        rows = (torch.arange(16) + 16 * step) % 64
        opt.zero_grad()
        (loss_scale * ((model(x[rows]) - y[rows]) ** 2).mean()).backward()
        opt.step()
        if after_step is not None:
            after_step(opt)
    return flat(model), model, opt


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def relative_difference(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_the_trajectory_does_not_depend_on_the_loss_scale(flavour):
    def scale_free(params):
        return YellowFin(params, tuner="scale_free", **FLAVOURS[flavour])

    secant_steps = []

    def record(opt):
        secant_steps.append(opt.stats()["secant_curvature"] > 0.0)

    unscaled, _, opt = train(scale_free, after_step=record)
    # Both steps were in play: the secant measured (steps ~15-70 here), then only the distance step.
    assert opt.stats()["step"] == 300 and 10 < sum(secant_steps) < 290
    for loss_scale in (1e-4, 1e-2, 1e2, 1e4):
        scaled, _, _ = train(scale_free, loss_scale=loss_scale)
        assert relative_difference(scaled, unscaled) < 1e-6, loss_scale


def test_the_reference_trajectory_does_depend_on_the_loss_scale():
    # (what the test above would catch: the reference's units are the loss's)
    unscaled, _, _ = train(YellowFin.reference_variant, steps=50)
    scaled, _, _ = train(YellowFin.reference_variant, steps=50, loss_scale=1e2)
    assert relative_difference(scaled, unscaled) > 1e-3


@pytest.mark.parametrize("flavour", ["multi_tensor", "compiled"])
def test_the_flavours_give_the_single_tensor_numbers(flavour):
    # Frozen layer, a 0-dim parameter, two groups with different lr, gradients missing on some steps, a NaN step.
    params_ref, opt_ref = run_with_holes(steps=25, nan_at=4, foreach=False, tuner="scale_free")
    params, opt = run_with_holes(steps=25, nan_at=4, tuner="scale_free", **FLAVOURS[flavour])
    assert opt.stats()["skipped_steps"] == 1 and opt.stats()["step"] == 24
    for a, b in zip(params_ref, params):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=0.0)
    for a, b in zip(flat_state(opt_ref), flat_state(opt)):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-13)


def test_matches_the_flat_prototype():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from tuner_screen import VARIANTS, FlatTuner

    library, _, opt = train(lambda params: YellowFin(params, tuner="scale_free", foreach=False))
    # (the library's default memory for this tuner is 0.99: the prototype's distance_secant at that memory)
    prototype, _, flat_tuner = train(lambda params: FlatTuner(params, **VARIANTS["ds_memory_0.99"]))
    # The same algorithm; the library computes the secant from scalars (P - <g, lr v>) where the prototype
    # differences vectors, so rounding differs in the last digits and grows a little along the trajectory.
    assert relative_difference(library, prototype) < 1e-7
    assert opt.stats()["alpha"] == pytest.approx(flat_tuner.trace["alpha"][-1], rel=1e-6)
    assert opt.stats()["mu"] == pytest.approx(flat_tuner.trace["mu"][-1], rel=1e-6)


def test_the_adam_metric_prototype_does_not_depend_on_the_loss_scale_either():
    # Issue 13's first screen (docs/tuner.md §7): the same rule in Adam's metric keeps every estimate in
    # units that cancel, including Adam's epsilon (relative to the metric's mean) and DoG's start.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from tuner_screen import AdamMetricTuner

    unscaled, _, _ = train(AdamMetricTuner)
    for loss_scale in (1e-4, 1e-2, 1e2, 1e4):
        scaled, _, _ = train(AdamMetricTuner, loss_scale=loss_scale)
        assert relative_difference(scaled, unscaled) < 1e-6, loss_scale


def test_the_first_step_moves_dogs_initial_distance_without_momentum():
    model, x, y = mlp_problem()
    before = flat(model)
    opt = YellowFin(model.parameters(), tuner="scale_free")
    ((model(x) - y) ** 2).mean().backward()
    opt.step()
    moved = float((flat(model) - before).norm())
    assert moved == pytest.approx(1e-6 * (1.0 + float(before.norm())), rel=1e-12)
    assert opt.stats()["mu"] == 0.0 and opt.stats()["distance"] == pytest.approx(moved, rel=1e-12)


def test_stats_report_the_distance_and_the_secant_curvature():
    _, _, opt = train(lambda params: YellowFin(params, tuner="scale_free"), steps=40)
    stats = opt.stats()
    assert stats["distance"] > 0.0 and stats["secant_curvature"] > 0.0
    _, _, reference = train(YellowFin, steps=2)
    assert "distance" not in reference.stats() and "secant_curvature" not in reference.stats()


def test_only_the_scale_free_tuner_keeps_the_initial_parameters():
    _, model, opt = train(lambda params: YellowFin(params, tuner="scale_free"), steps=3)
    _, reference_model, reference = train(YellowFin, steps=3)
    assert all("initial_param" in opt.state[p] for p in model.parameters())
    assert not any("initial_param" in reference.state[p] for p in reference_model.parameters())


@pytest.mark.parametrize("flavour", ["single_tensor", "multi_tensor"])
def test_a_step_never_reads_tensors_on_the_host(flavour):
    model, x, y = mlp_problem()
    opt = YellowFin(model.parameters(), tuner="scale_free", **FLAVOURS[flavour])
    for _ in range(3):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        with host_reads_forbidden():
            opt.step()


def test_a_state_dict_round_trip_continues_identically():
    def scale_free(params):
        return YellowFin(params, tuner="scale_free")

    expected, _, _ = train(scale_free, steps=80)

    model, x, y = mlp_problem()
    opt = scale_free(model.parameters())
    for step in range(80):
        rows = (torch.arange(16) + 16 * step) % 64
        if step == 40:
            buffer = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
            buffer.seek(0)
            checkpoint = torch.load(buffer, weights_only=True)
            model, _, _ = mlp_problem(seed=7)  # other weights, overwritten by the checkpoint
            model.load_state_dict(checkpoint["model"])
            opt = scale_free(model.parameters())
            opt.load_state_dict(checkpoint["opt"])
        opt.zero_grad()
        ((model(x[rows]) - y[rows]) ** 2).mean().backward()
        opt.step()
    assert torch.equal(flat(model), expected)


def test_a_checkpoint_from_before_the_scale_free_tuner_loads():
    _, model, opt = train(YellowFin, steps=5)
    old = opt.state_dict()
    for tuner in old["tuners"]:
        for name in SCALE_FREE_FIELDS:
            del tuner[name]
    for group in old["param_groups"]:
        del group["tuner"]
    restored = YellowFin(model.parameters())
    restored.load_state_dict(old)
    for a, b in zip(flat_state(opt), flat_state(restored)):
        assert torch.equal(a, b)


def test_a_non_finite_gradient_changes_nothing():
    model, x, y = mlp_problem()
    opt = YellowFin(model.parameters(), tuner="scale_free")
    for step in range(10):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()

    def everything_but_the_skip_count():
        tuner = opt.tuner_state().replace(skipped_steps=torch.zeros((), dtype=torch.float64))
        tensors = (*tuner.as_dict().values(), *(t for p in model.parameters() for t in opt.state[p].values()))
        return [t.clone() for t in tensors]

    before_state, before_params = everything_but_the_skip_count(), flat(model)
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    model[0].weight.grad[0, 0] = float("nan")
    opt.step()
    assert opt.stats()["skipped_steps"] == 1
    assert torch.equal(flat(model), before_params)
    for a, b in zip(before_state, everything_but_the_skip_count()):
        assert torch.equal(a, b)


def test_per_group_tuning_tunes_each_group_in_its_own_units():
    def per_group(params):
        params = list(params)
        return YellowFin([{"params": params[:2]}, {"params": params[2:], "lr": 0.5}], tuner="scale_free",
                         per_group_tuning=True)

    unscaled, _, opt = train(per_group, steps=100)
    scaled, _, _ = train(per_group, steps=100, loss_scale=1e3)
    assert relative_difference(scaled, unscaled) < 1e-6
    records = opt.stats()
    assert len(records) == 2 and all(r["distance"] > 0.0 for r in records)
    assert records[0]["distance"] != records[1]["distance"]


def test_groups_may_choose_their_tuner_only_with_per_group_tuning():
    model, _, _ = mlp_problem()
    params = list(model.parameters())
    groups = [{"params": params[:2], "tuner": "scale_free"}, {"params": params[2:]}]
    opt = YellowFin(groups, per_group_tuning=True)
    assert "distance" in opt.stats(0) and "distance" not in opt.stats(1)
    with pytest.raises(ValueError, match="share its settings"):
        YellowFin(groups)


@pytest.mark.parametrize("options", [
    dict(nesterov=True), dict(update_first=True), dict(smooth_tuned=True), dict(curvature_smoothing="linear"),
])
def test_options_of_the_reference_alone_are_refused(options):
    model, _, _ = mlp_problem()
    with pytest.raises(ValueError, match="scale_free"):
        YellowFin(model.parameters(), tuner="scale_free", **options)


def test_nesterov_is_refused_in_an_added_group_too():
    model, _, _ = mlp_problem()
    params = list(model.parameters())
    opt = YellowFin(params[:2], tuner="scale_free")
    with pytest.raises(ValueError, match="nesterov"):
        opt.add_param_group({"params": params[2:], "nesterov": True})


def test_an_unknown_tuner_is_refused():
    model, _, _ = mlp_problem()
    with pytest.raises(ValueError, match="tuner"):
        YellowFin(model.parameters(), tuner="scale-free")


def test_each_tuner_has_its_own_memory_unless_beta_is_given():
    p, q = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    assert YellowFin._settings(YellowFin([p]).param_groups[0]).beta == 0.999
    assert YellowFin._settings(YellowFin([p], tuner="scale_free").param_groups[0]).beta == 0.99
    assert YellowFin._settings(YellowFin([p], tuner="scale_free", beta=0.9).param_groups[0]).beta == 0.9
    opt = YellowFin([p], per_group_tuning=True)
    opt.add_param_group({"params": [q], "tuner": "scale_free"})  # a group that picks the other tuner later
    assert [YellowFin._settings(group).beta for group in opt.param_groups] == [0.999, 0.99]


def test_reference_variant_pins_the_reference_tuner():
    model, _, _ = mlp_problem()
    assert YellowFin.reference_variant(model.parameters()).param_groups[0]["tuner"] == "reference"
