"""The tuned (mu, alpha) in primal-averaging form (``momentum_form="primal_average"``, docs/algorithm.md §11): it
reproduces the research prototype (benchmarks/tuner_screen.py's PrimalAveragingForm), its two flavours agree, its
trajectory does not depend on the loss scale, ``averaged()`` hands out the average it keeps without keeping it,
a skipped step changes nothing, and it refuses what it does not support. It is the default wherever it runs; where the
default meets what it does not run in (staleness, the asynchronous systems, sparse gradients), the tuner runs heavy
ball instead. (That its step reads nothing on the host
and that a checkpoint resumes it are tested with the other forms, in tests/test_scale_free.py.)"""

import copy
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from yellowfin import YellowFin
from yellowfin.state import outlier_trigger
from yellowfin.tuning import AVERAGE_POWER
from helpers import TUNER_BUFFERS, complex_and_real_twin, flat_state, run_with_holes
from test_scale_free import fresh_compile_cache, flat, mlp_problem, relative_difference, train  # noqa: F401

FLAVOURS = {"single_tensor": dict(foreach=False), "multi_tensor": dict(foreach=True), "compiled": dict(fused=True)}
# The metrics the form runs in: the plain one, and Adam's (z steps along M^-1 g, its signal read along z - xbar).
METRICS = {"plain": {}, "adam": dict(precondition="adam")}


def primal_average(flavour="multi_tensor", **options):
    # (handing out the form's own average xbar, which these tests write out; the average of the gradient points, the
    # default's, is tested with the other averages, in tests/test_average.py)
    options = {"average": False, **options}
    return lambda params: YellowFin(params, momentum_form="primal_average", **FLAVOURS[flavour], **options)


def averaged_flat(model, opt):
    with opt.averaged():
        return flat(model).clone()


@pytest.mark.parametrize("flavour", ["single_tensor", "multi_tensor"])
def test_it_runs_the_prototypes_numbers(flavour):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from tuner_screen import PrimalAveragingForm

    # (the prototype's clip acts above 10 times the running RMS, heavy ball's trigger, as the form was measured)
    library, model, opt = train(primal_average(flavour, clip_trigger=outlier_trigger(0.99)))
    prototype, _, flat_form = train(PrimalAveragingForm)
    # The prototype keeps z and xbar and forms y from them; the library keeps y and w = z - xbar: the same
    # recursions, rounded differently.
    assert relative_difference(library, prototype) < 1e-12
    assert relative_difference(averaged_flat(model, opt), flat_form.average) < 1e-12
    assert opt.stats()["mu"] == pytest.approx(flat_form.trace["mu"][-1], rel=1e-9)


def test_the_prototype_with_the_clip_at_its_level_runs_the_defaults_numbers():
    # (the screens of docs/tuner.md §20.1 are measured against this prototype variant: today's default)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from tuner_screen import PRIMAL_AVERAGING_VARIANTS, PrimalAveragingForm

    library, model, opt = train(lambda params: YellowFin(params, foreach=False, average=False))
    variant = PRIMAL_AVERAGING_VARIANTS["primal_averaging_trigger_2"]
    prototype, _, flat_form = train(lambda params: PrimalAveragingForm(params, **variant))
    assert relative_difference(library, prototype) < 1e-12
    assert relative_difference(averaged_flat(model, opt), flat_form.average) < 1e-12


@pytest.mark.parametrize("flavour", ["single_tensor", "multi_tensor"])
def test_in_adams_metric_it_runs_the_prototypes_numbers(flavour):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from tuner_screen import PRIMAL_AVERAGING_VARIANTS, PreconditionedPrimalAveragingForm

    # (the default in Adam's metric: the clip at its level, 2, and the signal read along the lead)
    library, model, opt = train(primal_average(flavour, precondition="adam"))
    options = {k: v for k, v in PRIMAL_AVERAGING_VARIANTS["adam_metric_primal_averaging_lead_trigger_2"].items()
               if k != "precondition"}
    prototype, _, flat_form = train(lambda params: PreconditionedPrimalAveragingForm(params, **options))
    assert relative_difference(library, prototype) < 1e-12
    assert relative_difference(averaged_flat(model, opt), flat_form.average) < 1e-12
    assert opt.stats()["mu"] == pytest.approx(flat_form.trace["mu"][-1], rel=1e-9)
    assert 0.0 < opt.stats()["mu"] < 1.0


@pytest.mark.parametrize("options", [dict(precondition="adam"), dict(precondition="adam", step_rule="dog"),
                                     dict(step_rule="dowg"),
                                     *(dict(weight_decay=0.1, decoupled_weight_decay=True, **metric)
                                       for metric in METRICS.values())], ids=str)
@pytest.mark.parametrize("flavour", ["multi_tensor", "compiled"])
def test_the_flavours_agree_on_holes_two_learning_rates_and_a_skipped_step(flavour, options):
    # A frozen layer, a 0-dim parameter, two groups with different lr, gradients missing on some steps, a NaN step.
    params_ref, opt_ref = run_with_holes(steps=25, nan_at=4, momentum_form="primal_average", foreach=False,
                                         **options)
    params, opt = run_with_holes(steps=25, nan_at=4, momentum_form="primal_average", **FLAVOURS[flavour], **options)
    assert opt.stats()["skipped_steps"] == 1 and opt.stats()["step"] == 24
    for a, b in zip([*params_ref, *flat_state(opt_ref)], [*params, *flat_state(opt)]):
        ulps = 4 * torch.finfo(a.dtype).eps * float(a.detach().abs().max()) if a.is_floating_point() else 0.0
        torch.testing.assert_close(b, a, rtol=1e-10, atol=ulps)


def test_in_adams_metric_the_signal_weighs_each_groups_lead_by_its_lr():
    # The lead w moves by lr times z's steps: divided by each group's lr, <g, w> is in the units of the steps the
    # tuner sums, so that a group's lr changes its moves, not the momentum the tuner reads.
    def run(lr):
        model, x, y = mlp_problem()
        groups = [{"params": list(model[0].parameters())}, {"params": list(model[2].parameters()), "lr": lr}]
        opt = YellowFin(groups, precondition="adam", foreach=False)
        for step in range(40):
            rows = (torch.arange(16) + 16 * step) % 64
            opt.zero_grad()
            ((model(x[rows]) - y[rows]) ** 2).mean().backward()
            opt.step()
        return opt.stats()

    one, half = run(1.0), run(0.5)
    assert half["step"] == one["step"] == 40
    assert 0.0 < half["mu"] < 1.0 and half["mu"] != one["mu"]
    assert run(0.0)["mu"] < 1.0  # (a group that stands still adds nothing to the signal)


def test_the_gradients_are_taken_between_the_sgd_sequence_and_its_average():
    # Written out from the form's definition on the optimizer's own tuned values: z moves by the effective step,
    # xbar is z's polynomial average, and the parameters are (1 - m) z + m xbar.
    iterates, z, xbar = [], None, None

    def after_step(opt):
        nonlocal z, xbar
        stats = opt.stats()
        grads = torch.cat([p.grad.reshape(-1) for p in opt.param_groups[0]["params"]])
        if z is None:
            z = torch.cat([s["initial_param"].reshape(-1) for s in opt.state.values()])
        z = z - stats["alpha"] / (1.0 - stats["applied_momentum"]) * grads  # (no clip acts on this problem)
        weight = (AVERAGE_POWER + 1.0) / (stats["step"] + AVERAGE_POWER)
        xbar = z.clone() if xbar is None else xbar + weight * (z - xbar)
        iterates.append((flat_of(opt), (1.0 - stats["applied_momentum"]) * z + stats["applied_momentum"] * xbar))

    _, model, opt = train(primal_average("single_tensor"), steps=30, after_step=after_step)
    for y, expected in iterates:
        torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(averaged_flat(model, opt), xbar, rtol=1e-12, atol=1e-14)


def test_decoupled_decay_joins_zs_step_at_the_point_the_gradient_was_taken():
    # Written out as the form's definition with Schedule-Free AdamW's decay: z <- z - eta (g + lambda rho y), y the
    # parameters the gradient was taken at, rho the gradient's RMS per coordinate (the plain metric's unit, which
    # keeps lambda free of the loss scale: sqrt of the running mean of ||g||^2 over the element count); xbar z's
    # polynomial average; the parameters (1 - m) z + m xbar.
    decay, iterates, z, xbar, y, grad_sq_avg = 0.05, [], None, None, None, 0.0

    def after_step(opt):
        nonlocal z, xbar, y, grad_sq_avg
        stats, beta = opt.stats(), opt.param_groups[0]["beta"]
        grads = torch.cat([p.grad.reshape(-1) for p in opt.param_groups[0]["params"]])
        if z is None:
            z = torch.cat([s["initial_param"].reshape(-1) for s in opt.state.values()])
            y = z.clone()
        grad_sq_avg = beta * grad_sq_avg + (1.0 - beta) * float(grads.square().sum())
        rms = math.sqrt(grad_sq_avg / (1.0 - beta ** stats["step"]) / grads.numel())
        z = z - stats["alpha"] / (1.0 - stats["applied_momentum"]) * (grads + decay * rms * y)  # (no clip acts here)
        weight = (AVERAGE_POWER + 1.0) / (stats["step"] + AVERAGE_POWER)
        xbar = z.clone() if xbar is None else xbar + weight * (z - xbar)
        y = (1.0 - stats["applied_momentum"]) * z + stats["applied_momentum"] * xbar
        iterates.append((flat_of(opt), y))

    _, model, opt = train(primal_average("single_tensor", weight_decay=decay, decoupled_weight_decay=True), steps=30,
                          after_step=after_step)
    for parameters, expected in iterates:
        torch.testing.assert_close(parameters, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(averaged_flat(model, opt), xbar, rtol=1e-12, atol=1e-14)
    undecayed, _, _ = train(primal_average("single_tensor"), steps=30)
    assert relative_difference(iterates[-1][0], undecayed) > 1e-4  # (the decay moved it)


def flat_of(opt):
    return torch.cat([p.detach().reshape(-1).clone() for group in opt.param_groups for p in group["params"]])


# (the rules differ only in the scalar step that every flavour shares: the compiled kernels on the default's rule)
@pytest.mark.parametrize("step_rule, flavour", [("dowg", "multi_tensor"), ("dog", "multi_tensor"),
                                                ("dowg_neutral", "multi_tensor"), ("dowg", "compiled")])
def test_the_flavours_agree(step_rule, flavour):
    single, _, _ = train(primal_average("single_tensor", step_rule=step_rule))
    other, model, opt = train(primal_average(flavour, step_rule=step_rule))
    assert relative_difference(other, single) < 1e-13
    if flavour == "compiled":  # (and its average, which it hands out the same way)
        _, single_model, single_opt = train(primal_average("single_tensor", step_rule=step_rule), steps=300)
        assert relative_difference(averaged_flat(model, opt), averaged_flat(single_model, single_opt)) < 1e-13


@pytest.mark.parametrize("metric", sorted(METRICS))
@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_the_trajectory_does_not_depend_on_the_loss_scale(flavour, metric):
    unscaled, _, _ = train(primal_average(flavour, **METRICS[metric]))
    for loss_scale in (1e-4, 1e-2, 1e2, 1e4):
        scaled, _, _ = train(primal_average(flavour, **METRICS[metric]), loss_scale=loss_scale)
        assert relative_difference(scaled, unscaled) < 1e-6, loss_scale


@pytest.mark.parametrize("metric, buffers", [("plain", "scale_free"), ("adam", "preconditioned")])
def test_it_keeps_heavy_balls_buffers(metric, buffers):
    _, model, opt = train(primal_average(**METRICS[metric]), steps=5)
    for p in model.parameters():
        assert set(opt.state[p]) == TUNER_BUFFERS[buffers]


def test_it_moves_differently_from_heavy_ball():
    heavy_ball, _, _ = train(lambda params: YellowFin(params, momentum_form="heavy_ball"), steps=100)
    primal, _, _ = train(primal_average(), steps=100)
    assert relative_difference(primal, heavy_ball) > 1e-3


@pytest.mark.parametrize("metric", sorted(METRICS))
@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_complex_parameters_move_as_their_real_twins(flavour, metric):
    (z, opt), (twin, twin_opt) = complex_and_real_twin(steps=30, momentum_form="primal_average", **FLAVOURS[flavour],
                                                       **METRICS[metric])
    torch.testing.assert_close(torch.view_as_real(z.detach()), twin.detach(), rtol=1e-12, atol=1e-14)
    with opt.averaged(), twin_opt.averaged():
        torch.testing.assert_close(torch.view_as_real(z.detach()), twin.detach(), rtol=1e-12, atol=1e-14)


def test_maximize_ascends_the_negated_loss_exactly():
    descended, _, _ = train(primal_average())
    ascended, _, _ = train(primal_average(maximize=True), loss_scale=-1.0)
    assert torch.equal(ascended, descended)


@pytest.mark.parametrize("metric", sorted(METRICS))
def test_averaged_swaps_the_average_in_and_the_iterate_back_exactly(metric):
    iterate, model, opt = train(primal_average(**METRICS[metric]), steps=50)
    average = averaged_flat(model, opt)
    assert torch.equal(flat(model), iterate)
    assert relative_difference(average, iterate) > 1e-6  # (a different point)
    with pytest.raises(RuntimeError, match="inside optimizer.averaged"):
        with opt.averaged():
            opt.step()
    assert torch.equal(flat(model), iterate)


def test_the_first_step_is_dogs_move_and_the_average_starts_there():
    iterate, model, opt = train(primal_average(), steps=1)
    assert torch.equal(averaged_flat(model, opt), iterate)


@pytest.mark.parametrize("metric", sorted(METRICS))
def test_a_skipped_step_changes_nothing(metric):
    model, x, y = mlp_problem()
    opt = primal_average(**METRICS[metric])(model.parameters())
    for step in range(20):
        opt.zero_grad()
        ((model(x[:16]) - y[:16]) ** 2).mean().backward()
        opt.step()
    before, buffers, tuner = flat(model), {p: {k: v.clone() for k, v in opt.state[p].items()}
                                           for p in model.parameters()}, opt.stats()
    for p in model.parameters():
        p.grad = torch.full_like(p, math.nan)
    opt.step()
    assert torch.equal(flat(model), before)
    for p in model.parameters():
        for name, value in buffers[p].items():
            assert torch.equal(opt.state[p][name], value), name
    assert opt.stats()["skipped_steps"] == 1 and opt.stats()["mu"] == tuner["mu"]


@pytest.mark.parametrize("metric", sorted(METRICS))
def test_a_parameter_without_a_gradient_stands_still(metric):
    model, x, y = mlp_problem()
    frozen = model[2].bias
    opt = primal_average(**METRICS[metric])(model.parameters())
    for step in range(20):
        opt.zero_grad()
        ((model(x[:16]) - y[:16]) ** 2).mean().backward()
        if step >= 10:
            frozen.grad = None
        opt.step()
        if step == 9:
            held = frozen.detach().clone()
    assert not torch.equal(held, torch.zeros_like(held))
    assert torch.equal(frozen.detach(), held)


@pytest.mark.parametrize("options, message", [
    (dict(tuner="reference"), "tuner='scale_free'"),
    (dict(step_rule="secant"), "step_rule"),
    (dict(nesterov=True), "nesterov"),
    (dict(momentum_form="primal"), "momentum_form"),
])
def test_what_it_does_not_support_is_refused(options, message):
    model, _, _ = mlp_problem()
    with pytest.raises(ValueError, match=message):
        YellowFin(model.parameters(), **{"momentum_form": "primal_average", **options})


def test_staleness_and_asynchronous_systems_are_refused():
    from yellowfin.tuned import refuse_under_asynchrony

    model, _, _ = mlp_problem()
    opt = primal_average()(model.parameters())
    with pytest.raises(ValueError, match="synchronous training only"):
        opt.set_staleness(2.0)
    opt.set_staleness(0.0)  # (synchronous: accepted)
    for workers, heavy_ball in ((4, False), (1, True)):
        with pytest.raises(ValueError, match="synchronous training only"):
            refuse_under_asynchrony(opt, workers, closed_loop=True, workers_apply_heavy_ball=heavy_ball)


# (the plain metric's form keeps the average of its gradient points by default, heavy ball and Adam's metric none:
# docs/tuner.md §24)
@pytest.mark.parametrize("options, form, trigger, average", [
    ({}, "primal_average", 2.0, True),  # (the clip acting on every gradient above its level, docs/tuner.md §19)
    (dict(relative_clip=3.0), "primal_average", 3.0, True),
    (dict(step_rule="dog"), "primal_average", 2.0, True),
    (dict(step_rule="dowg_neutral"), "primal_average", 2.0, True),
    (dict(step_rule="secant"), "heavy_ball", 10.0, False),
    (dict(average=True), "primal_average", 2.0, True),
    (dict(average=False), "primal_average", 2.0, False),
    (dict(step_rule="secant", average=True), "heavy_ball", 10.0, True),
    (dict(weight_decay=1e-2, decoupled_weight_decay=True), "primal_average", 2.0, True),  # (docs/tuner.md §23)
    (dict(precondition="adam"), "primal_average", 2.0, False),  # (in the metric's norms, docs/tuner.md §21; its
    # state held to three buffers, the form's own average handed out)
    (dict(precondition="adam", average=True), "primal_average", 2.0, True),
    (dict(precondition="adam", weight_decay=1e-2, decoupled_weight_decay=True), "primal_average", 2.0, False),
    (dict(precondition="adam", momentum_form="heavy_ball"), "heavy_ball", math.inf, False),
    (dict(tuner="reference"), "heavy_ball", None, False),
    (dict(momentum_form="heavy_ball"), "heavy_ball", 10.0, False),
], ids=str)
def test_it_is_the_default_wherever_it_runs(options, form, trigger, average):
    model, _, _ = mlp_problem()
    group = YellowFin(model.parameters(), **options).param_groups[0]
    assert group["momentum_form"] == form
    assert group["clip_trigger"] == (trigger if trigger is None else pytest.approx(trigger))
    assert group["average"] is average


def test_a_group_in_heavy_ball_runs_beside_the_default_form():
    model, _, _ = mlp_problem()
    first, second = list(model[0].parameters()), list(model[2].parameters())
    groups = [{"params": first}, {"params": second, "momentum_form": "heavy_ball"}]
    opt = YellowFin(groups, per_group_tuning=True)
    assert [group["momentum_form"] for group in opt.param_groups] == ["primal_average", "heavy_ball"]
    assert [group["average"] for group in opt.param_groups] == [True, False]
    # Under one shared tuner the two forms cannot meet: the error names what differs.
    with pytest.raises(ValueError, match=r"momentum_form \('primal_average' against 'heavy_ball'\).*"
                                         r"per_group_tuning=True"):
        YellowFin(groups)
    # A group with decoupled decay runs the form in either metric, as the others there: one tuner serves both.
    decayed = [{"params": first}, {"params": second, "weight_decay": 1e-1, "decoupled_weight_decay": True}]
    for metric in ({}, {"precondition": "adam"}):
        opt = YellowFin(decayed, **metric)
        assert [group["momentum_form"] for group in opt.param_groups] == ["primal_average", "primal_average"]


def test_under_staleness_the_default_runs_heavy_ball_and_the_named_form_is_refused():
    def run(form, told_before=True):
        def after_step(opt):
            opt.set_staleness(2.0)

        def make(params):
            opt = YellowFin(params, **form)
            if told_before:
                opt.set_staleness(2.0)  # (before the first step, as the asynchronous systems report it)
            return opt

        return train(make, steps=20, after_step=after_step)

    moved, _, opt = run({})
    heavy_ball, _, named = run(dict(momentum_form="heavy_ball"))
    options = [{name: value for name, value in group.items() if name != "params"}
               for group in (opt.param_groups[0], named.param_groups[0])]
    assert options[0] == options[1]  # (its form and its clip's trigger, 10, are heavy ball's)
    assert torch.equal(moved, heavy_ball) and opt.stats() == named.stats()
    with pytest.raises(ValueError, match="synchronous training only.*already stepped"):
        run({}, told_before=False)  # (its buffers hold z - xbar after a step: not heavy ball's)
    with pytest.raises(ValueError, match="synchronous training only"):
        run(dict(momentum_form="primal_average"))


def test_the_asynchronous_systems_run_the_default_in_heavy_ball():
    from yellowfin.tuned import refuse_under_asynchrony

    for workers, heavy_ball in ((4, False), (1, True)):
        model, _, _ = mlp_problem()
        opt = YellowFin(model.parameters())
        refuse_under_asynchrony(opt, workers, closed_loop=True, workers_apply_heavy_ball=heavy_ball)
        assert opt.param_groups[0]["momentum_form"] == "heavy_ball"
        assert opt.param_groups[0]["clip_trigger"] == pytest.approx(10.0)
    # In Adam's metric heavy ball's clip is off: the level the form took by default goes with it, a named one stays.
    model, _, _ = mlp_problem()
    for options, clip in (({}, math.inf), (dict(relative_clip=3.0), 3.0)):
        opt = YellowFin(model.parameters(), precondition="adam", **options)
        refuse_under_asynchrony(opt, 4, closed_loop=True)
        named = YellowFin(model.parameters(), precondition="adam", momentum_form="heavy_ball", **options)
        assert opt.param_groups[0] == named.param_groups[0]
        assert opt.param_groups[0]["relative_clip"] == clip
    model, _, _ = mlp_problem()
    opt = YellowFin(model.parameters())
    refuse_under_asynchrony(opt, 1, closed_loop=True)  # (one worker is synchronous training: the form stays)
    assert opt.param_groups[0]["momentum_form"] == "primal_average"
    # The average the form keeps by default goes with it (heavy ball hands out its iterate); one asked for stays.
    for options, kept in (({}, False), (dict(average=True), True)):
        opt = YellowFin(model.parameters(), **options)
        refuse_under_asynchrony(opt, 4, closed_loop=True)
        assert opt.param_groups[0]["average"] is kept


def test_a_checkpoint_of_the_form_without_the_average_resumes_handing_out_xbar():
    # (saved before the form kept the average of its gradient points by default: it resumes as it ran)
    expected, expected_model, expected_opt = train(primal_average(), steps=40)
    model, x, y = mlp_problem()
    opt = primal_average()(model.parameters())
    for step in range(40):
        if step == 20:
            saved = copy.deepcopy(opt.state_dict())
            opt = YellowFin(model.parameters())  # (today's default keeps the average)
            opt.load_state_dict(saved)
            assert opt.param_groups[0]["average"] is False
        rows = (torch.arange(16) + 16 * step) % 64
        opt.zero_grad()
        ((model(x[rows]) - y[rows]) ** 2).mean().backward()
        opt.step()
    assert torch.equal(flat(model), expected)
    assert not any("averaged_param" in state for state in opt.state.values())
    assert torch.equal(averaged_flat(model, opt), averaged_flat(expected_model, expected_opt))


def test_a_loaded_checkpoint_keeps_its_form_under_staleness():
    # (a resumed run holds what its checkpoint ran; the optimizer it loads into took no form of its own)
    _, model, opt = train(lambda params: YellowFin(params), steps=3)
    restored = YellowFin(model.parameters())
    restored.load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match="synchronous training only"):
        restored.set_staleness(1.0)


def test_sparse_gradients_are_refused():
    embedding = nn.Embedding(10, 3, sparse=True)
    opt = YellowFin(embedding.parameters(), momentum_form="primal_average")
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="sparse"):
        opt.step()


def test_on_the_noisy_quadratic_its_iterate_ends_far_closer_to_the_optimum_than_heavy_balls():
    # The gradients' point y sits near the run's average, so the iterate itself carries much of the average's gain
    # (docs/tuner.md §18); heavy ball's iterate is averaged over 1 / (1 - mu) steps only. The suite's task (generated
    # data), a third of its budget; its exact excess loss over the last 200 steps.
    from yellowfin.bench.tasks import get_task

    def excess(make, steps=1000, last=200):
        task = get_task("quadratic")
        model = task.make_model(0)
        opt, batches, losses = make(model.parameters()), task.train_batches(0), []
        for step in range(steps):
            opt.zero_grad()
            task.loss(model, next(batches)).backward()
            opt.step()
            if step >= steps - last:
                losses.append(task.exact_loss(model))
        return sum(losses) / last

    assert excess(primal_average()) < 0.5 * excess(lambda params: YellowFin(params, momentum_form="heavy_ball"))


def test_per_group_tuning_runs_each_group_as_its_own_optimizer_would():
    def run(make):
        model, x, y = mlp_problem()
        optimizers = make(model)
        for step in range(40):
            rows = (torch.arange(16) + 16 * step) % 64
            for opt in optimizers:
                opt.zero_grad()
            ((model(x[rows]) - y[rows]) ** 2).mean().backward()
            for opt in optimizers:
                opt.step()
        averaged = []
        for opt in optimizers:
            with opt.averaged():
                averaged.append(torch.cat([p.detach().reshape(-1).clone() for g in opt.param_groups
                                           for p in g["params"]]))
        return flat(model), torch.cat(averaged)

    def layers(model):
        return [list(model[0].parameters()), list(model[2].parameters())]

    together = run(lambda model: [YellowFin([{"params": p} for p in layers(model)], per_group_tuning=True,
                                            momentum_form="primal_average")])
    apart = run(lambda model: [YellowFin(p, momentum_form="primal_average") for p in layers(model)])
    for a, b in zip(together, apart):
        assert torch.equal(a, b)
