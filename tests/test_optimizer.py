"""The properties PyTorch's own optimizer suite checks for every optimizer, and YellowFin's own."""

import copy
import io

import pytest
import torch
from torch import nn

from yellowfin import YellowFin
from helpers import complex_and_real_twin, flat_state, loss_of, make_data, make_model, run_with_holes, train

CONFIGS = [
    {},
    {"foreach": False},
    {"nesterov": True},
    {"weight_decay": 1e-3},
    {"weight_decay": 1e-3, "decoupled_weight_decay": True},
    {"clip_norm": 1.0},
    {"per_group_tuning": True},
    {"sparsity_correction": True},
    {"adaptive_clipping": False, "slow_start": False},
    {"curvature_smoothing": "linear"},
]


def _make(config, model):
    return YellowFin(model.parameters(), **config)


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_goes_the_right_direction(config):
    model, data = make_model(), make_data()
    before = float(loss_of(model, data).detach())
    train(model, _make(config, model), data, steps=300)
    assert float(loss_of(model, data)) < 0.5 * before


def test_paper_variant_goes_the_right_direction():
    model, data = make_model(), make_data()
    before = float(loss_of(model, data))
    train(model, YellowFin.paper_variant(model.parameters(), initial_lr=0.01), data, steps=300)
    assert float(loss_of(model, data)) < 0.5 * before


def test_maximize_climbs():
    model, data = make_model(), make_data()
    opt = YellowFin(model.parameters(), maximize=True, initial_lr=0.01)
    before = float(loss_of(model, data))
    for _ in range(5):
        opt.zero_grad()
        loss_of(model, data).backward()
        opt.step()
    assert float(loss_of(model, data)) > before


def test_first_step_uses_initial_values():
    p = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    opt = YellowFin([p], initial_lr=0.1, initial_momentum=0.5)
    p.grad = torch.tensor([0.5, 1.0], dtype=torch.float64)
    opt.step()
    assert torch.equal(p.detach(), torch.tensor([1.0 - 0.05, -2.0 - 0.1], dtype=torch.float64))
    assert torch.equal(opt.state[p]["momentum_buffer"], torch.tensor([0.5, 1.0], dtype=torch.float64))


@pytest.mark.parametrize("nesterov", [False, True])
def test_update_rule_matches_torch_sgd_when_values_are_fixed(nesterov):
    start = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    grad = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)
    ours, theirs = start.clone().requires_grad_(), start.clone().requires_grad_()
    opt = YellowFin([ours], initial_lr=0.1, initial_momentum=0.5, nesterov=nesterov)
    sgd = torch.optim.SGD([theirs], lr=0.1, momentum=0.5, nesterov=nesterov)
    ours.grad, theirs.grad = grad.clone(), grad.clone()
    opt.step()
    sgd.step()
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-15)


def test_decoupled_weight_decay_shrinks_by_lr_times_decay():
    p = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
    opt = YellowFin([p], initial_lr=0.1, weight_decay=0.5, decoupled_weight_decay=True)
    p.grad = torch.tensor([1.0], dtype=torch.float64)
    opt.step()
    assert float(p) == pytest.approx(2.0 * (1 - 0.1 * 0.5) - 0.1 * 1.0)


def test_coupled_weight_decay_enters_statistics():
    p = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
    opt = YellowFin([p], weight_decay=0.5)
    p.grad = torch.tensor([1.0], dtype=torch.float64)
    opt.step()
    assert opt.stats()["h_max"] == pytest.approx((1.0 + 0.5 * 2.0) ** 2 + 1e-6)


def test_clip_norm_bounds_the_gradient():
    p = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = YellowFin([p], initial_lr=1.0, clip_norm=1.0)
    p.grad = torch.tensor([30.0, 40.0], dtype=torch.float64)
    opt.step()
    assert torch.allclose(p.detach(), torch.tensor([-0.6, -0.8], dtype=torch.float64))
    assert opt.stats()["h_max"] == pytest.approx(1.0 + 1e-6)


def test_clip_norm_and_adaptive_clipping_together_clip_the_statistics_to_the_adaptive_threshold():
    # After a first gradient of norm 0.1, h_max ~ 0.01: the statistics may see norm sqrt(100 h_max) ~ 1.
    p = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = YellowFin([p], clip_norm=10.0)
    for value in (0.1, 1000.0):
        p.grad = torch.full((1,), value, dtype=torch.float64)
        opt.step()
    assert float(opt.tuner_state().curvatures[1]) == pytest.approx(1.0, rel=1e-3)  # the clipped ||g||^2


def test_group_with_tiny_multiplier_does_not_move():
    model = make_model(dtype=torch.float32)
    data = make_data(dtype=torch.float32)
    first, second = model[0], model[2]
    opt = YellowFin([{"params": first.parameters()}, {"params": second.parameters(), "lr": 1e-28}])
    frozen = [p.detach().clone() for p in second.parameters()]
    moving = [p.detach().clone() for p in first.parameters()]
    train(model, opt, data, steps=20)
    assert all(torch.equal(a, b) for a, b in zip(frozen, second.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(moving, first.parameters()))


def test_no_gradients_is_a_no_op():
    model = make_model()
    opt = YellowFin(model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert opt.stats()["step"] == 0 and len(opt.state) == 0


def test_state_is_two_buffers_per_parameter_after_a_step():
    model, data = make_model(), make_data()
    opt = YellowFin(model.parameters())
    train(model, opt, data, steps=1)
    for p in model.parameters():
        assert set(opt.state[p]) == {"grad_avg", "momentum_buffer"}
        assert opt.state[p]["momentum_buffer"].shape == p.shape


def test_closure_is_called_once_and_its_loss_returned():
    model, data = make_model(), make_data()
    opt = YellowFin(model.parameters())
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = loss_of(model, data)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert len(calls) == 1 and torch.is_tensor(loss)


def _checkpoint_roundtrip(opt):
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_state_dict_reloads_with_weights_only_and_resumes_bit_identically():
    data = make_data()
    model = make_model()
    opt = YellowFin(model.parameters())
    train(model, opt, data, steps=15, seed=3)
    model_state = copy.deepcopy(model.state_dict())
    saved = _checkpoint_roundtrip(opt)
    train(model, opt, data, steps=15, seed=4)

    resumed_model = make_model(seed=99)
    resumed_model.load_state_dict(model_state)
    resumed = YellowFin(resumed_model.parameters())
    resumed.load_state_dict(saved)
    train(resumed_model, resumed, data, steps=15, seed=4)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed_model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(flat_state(opt), flat_state(resumed)))
    assert resumed.stats() == opt.stats()


def test_state_dict_is_deterministic():
    data = make_data()
    states = []
    for _ in range(2):
        model = make_model()
        opt = YellowFin(model.parameters())
        train(model, opt, data, steps=10)
        states.append(flat_state(opt))
    assert all(torch.equal(a, b) for a, b in zip(*states))


def test_per_group_tuning_state_dict_roundtrip():
    model, data = make_model(), make_data()
    opt = YellowFin([{"params": model[0].parameters()}, {"params": model[2].parameters()}], per_group_tuning=True)
    train(model, opt, data, steps=5)
    fresh = YellowFin([{"params": model[0].parameters()}, {"params": model[2].parameters()}], per_group_tuning=True)
    fresh.load_state_dict(_checkpoint_roundtrip(opt))
    assert fresh.stats() == opt.stats()


@pytest.mark.parametrize("break_it", ["shape", "count", "tuner", "groups", "missing", "window"])
def test_mismatched_state_dict_fails_clearly_and_changes_nothing(break_it):
    model, data = make_model(), make_data()
    opt = YellowFin(model.parameters())
    train(model, opt, data, steps=3)
    other_model = make_model()
    other = YellowFin(other_model.parameters())
    train(other_model, other, data, steps=5)
    saved = other.state_dict()
    if break_it == "shape":
        saved["state"][0]["momentum_buffer"] = torch.zeros(3, 3)
    elif break_it == "count":
        saved["param_groups"][0]["params"] = saved["param_groups"][0]["params"][:-1]
    elif break_it == "tuner":
        del saved["tuners"][0]["mu"]
    elif break_it == "groups":
        saved["param_groups"] = saved["param_groups"] * 2
    elif break_it == "missing":
        del saved["tuners"]
    elif break_it == "window":
        saved["param_groups"][0]["curvature_window"] = 7
    before = [t.clone() for t in flat_state(opt)]
    stats_before = opt.stats()
    with pytest.raises(ValueError):
        opt.load_state_dict(saved)
    assert all(torch.equal(a, b) for a, b in zip(before, flat_state(opt)))
    assert opt.stats() == stats_before
    assert opt.param_groups[0]["curvature_window"] == 20


def test_deepcopy_continues_identically():
    data = make_data()
    model = make_model()
    opt = YellowFin(model.parameters())
    train(model, opt, data, steps=5)
    model_copy = copy.deepcopy(model)
    opt_copy = YellowFin(model_copy.parameters())
    opt_copy.load_state_dict(copy.deepcopy(opt.state_dict()))
    whole_copy = copy.deepcopy(opt)
    assert whole_copy.stats() == opt.stats()
    assert all(torch.equal(a, b) for a, b in zip(flat_state(whole_copy), flat_state(opt)))
    train(model, opt, data, steps=5, seed=7)
    train(model_copy, opt_copy, data, steps=5, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model_copy.parameters()))


def test_tensor_and_float_multipliers_agree():
    data = make_data()
    results = []
    for lr in (0.5, torch.tensor(0.5)):
        model = make_model()
        train(model, YellowFin(model.parameters(), lr=lr), data, steps=10)
        results.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_lr_scheduler_moves_the_multiplier():
    p = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = YellowFin([p], initial_lr=0.1, adaptive_clipping=False)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    assert opt.param_groups[0]["lr"] == 1.0
    p.grad = torch.ones(1, dtype=torch.float64)
    opt.step()
    scheduler.step()
    assert opt.param_groups[0]["lr"] == 0.5
    assert float(p) == pytest.approx(-0.1)  # first step: alpha_0 times the multiplier 1
    before = float(p)
    velocity = opt.state[p]["momentum_buffer"].clone()
    p.grad = torch.ones(1, dtype=torch.float64)
    opt.step()
    new_mu, new_alpha = opt.stats()["mu"], opt.stats()["alpha"]
    assert float(p) == pytest.approx(before - 0.5 * new_alpha * float(new_mu * velocity + 1.0))


def test_stats_has_every_field_as_python_numbers():
    model, data = make_model(), make_data()
    opt = YellowFin(model.parameters())
    train(model, opt, data, steps=3)
    stats = opt.stats()
    for key in ("step", "mu", "alpha", "lr", "h_min", "h_max", "grad_var", "dist", "skipped_steps"):
        assert isinstance(stats[key], (int, float)), key
    assert stats["step"] == 3 and stats["skipped_steps"] == 0


def test_stats_lr_is_a_deprecated_alias_of_alpha():
    model, data = make_model(), make_data()
    opt = YellowFin(model.parameters(), lr=0.5)
    train(model, opt, data, steps=3)
    assert opt.stats()["lr"] == opt.stats()["alpha"] == float(opt.tuner_state().alpha)
    assert opt.stats()["alpha"] != 0.5  # the tuned step, not the group's multiplier


def test_stats_of_one_scope_is_always_that_tuners_record():
    model, data = make_model(), make_data()
    opt = YellowFin(model.parameters())
    grouped = YellowFin([{"params": model[0].parameters()}, {"params": model[2].parameters()}], per_group_tuning=True)
    train(model, opt, data, steps=3)
    train(model, grouped, data, steps=4)
    assert opt.stats(0) == opt.stats()
    assert [grouped.stats(i) for i in range(2)] == grouped.stats()
    assert grouped.stats(1)["step"] == 4
    for bad in (1, -1, True, "0"):
        with pytest.raises(ValueError, match=r"scope.*allowed are None or a tuner index in \[0, 1\)"):
            opt.stats(bad)


def test_options_after_lr_are_keyword_only():
    with pytest.raises(TypeError, match="positional"):
        YellowFin(make_model().parameters(), 1.0, 0.9)
    assert YellowFin(make_model().parameters(), 0.5).param_groups[0]["lr"] == 0.5


def test_checkpoint_whose_tuner_holds_lr_loads_it_as_alpha():
    # Checkpoints written before the tuned step was named alpha hold it as "lr".
    model, data = make_model(), make_data()
    opt = YellowFin(model.parameters())
    train(model, opt, data, steps=5)
    saved = _checkpoint_roundtrip(opt)
    saved["tuners"] = [{("lr" if name == "alpha" else name): value for name, value in tuner.items()}
                       for tuner in saved["tuners"]]
    resumed = YellowFin(model.parameters())
    resumed.load_state_dict(saved)
    assert resumed.stats() == opt.stats()
    assert "alpha" in resumed.state_dict()["tuners"][0] and "lr" not in resumed.state_dict()["tuners"][0]


def test_per_group_tuning_measures_each_group_alone():
    a, b = (torch.zeros(3, dtype=torch.float64, requires_grad=True) for _ in range(2))
    a_alone = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    grouped = YellowFin([{"params": [a]}, {"params": [b]}], per_group_tuning=True)
    alone = YellowFin([a_alone])
    generator = torch.Generator().manual_seed(0)
    for _ in range(8):
        g = torch.randn(3, generator=generator, dtype=torch.float64)
        a.grad, a_alone.grad = g.clone(), g.clone()
        b.grad = 100.0 * torch.randn(3, generator=generator, dtype=torch.float64)
        grouped.step()
        alone.step()
    stats = grouped.stats()
    assert isinstance(stats, list) and len(stats) == 2
    assert stats[0] == alone.stats()
    assert torch.equal(a, a_alone)
    assert stats[1]["h_max"] > 100 * stats[0]["h_max"]


def test_global_tuning_requires_shared_settings_and_per_group_allows_them():
    model = make_model()
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "beta": 0.9}]
    with pytest.raises(ValueError, match="per_group_tuning"):
        YellowFin(groups)
    model = make_model()
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "beta": 0.9}]
    opt = YellowFin(groups, per_group_tuning=True)
    assert len(opt.stats()) == 2


def test_add_param_group_after_construction():
    model, data = make_model(), make_data()
    opt = YellowFin(model[0].parameters(), per_group_tuning=True)
    opt.add_param_group({"params": model[2].parameters()})
    train(model, opt, data, steps=3)
    assert [s["step"] for s in opt.stats()] == [3, 3]
    model = make_model()
    opt = YellowFin(model[0].parameters())
    opt.add_param_group({"params": model[2].parameters(), "lr": 0.5})
    train(model, opt, data, steps=3)
    assert opt.stats()["step"] == 3


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"beta": -0.1}, "beta"),
        ({"beta": 1.0}, "beta"),
        ({"curvature_window": 0}, "curvature_window"),
        ({"curvature_window": 2.5}, "curvature_window"),
        ({"eps": 0.0}, "eps"),
        ({"lr": -1.0}, "lr"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"clip_norm": 0.0}, "clip_norm"),
        ({"curvature_smoothing": "cubic"}, "curvature_smoothing"),
        ({"initial_momentum": 1.0}, "initial_momentum"),
        ({"bogus_option": 1}, "bogus_option"),
    ],
)
def test_invalid_settings_name_the_setting_and_range(kwargs, name):
    with pytest.raises(ValueError, match=name) as error:
        YellowFin(make_model().parameters(), **kwargs)
    assert "allowed" in str(error.value)


def test_unknown_option_in_a_param_group_is_refused():
    with pytest.raises(ValueError, match="betta"):
        YellowFin([{"params": make_model().parameters(), "betta": 0.9}])


def test_momentum_offset_is_added_to_the_tuned_momentum():
    p = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = YellowFin([p], initial_lr=0.1, initial_momentum=0.2)
    opt.set_momentum_offset(0.3)
    p.grad = torch.ones(1, dtype=torch.float64)
    opt.step()
    p.grad = torch.ones(1, dtype=torch.float64)
    before = opt.state[p]["momentum_buffer"].clone()
    opt.step()
    stats = opt.stats()
    assert stats["applied_momentum"] == pytest.approx(stats["mu"] + 0.3)
    expected = stats["applied_momentum"] * before + 1.0
    assert torch.allclose(opt.state[p]["momentum_buffer"], expected)
    opt.set_momentum_offset(torch.tensor(-5.0))  # clamped into (-1, 1)
    assert opt.stats()["applied_momentum"] > -1.0


def test_paper_variant_updates_before_tuning():
    p = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = YellowFin.paper_variant([p])
    p.grad = torch.tensor([0.1, 0.2], dtype=torch.float64)
    opt.step()  # alpha_0 = 1, mu_0 = 0: the first update is a plain gradient step
    assert torch.allclose(p.detach(), torch.tensor([-0.1, -0.2], dtype=torch.float64))


def test_sparse_embedding_matches_dense_embedding():
    results = []
    for sparse in (False, True):
        torch.manual_seed(0)
        embedding = nn.Embedding(20, 4, sparse=sparse).double()
        opt = YellowFin(embedding.parameters(), sparsity_correction=True)
        generator = torch.Generator().manual_seed(1)
        for _ in range(10):
            ids = torch.randint(0, 20, (6,), generator=generator)
            opt.zero_grad()
            (embedding(ids) ** 2).sum().backward()
            opt.step()
        results.append((embedding.weight.detach().clone(), opt.stats()))
    assert torch.allclose(results[0][0], results[1][0], rtol=1e-12, atol=1e-12)
    assert results[0][1]["h_max"] == pytest.approx(results[1][1]["h_max"], rel=1e-12)


def test_dtensor_parameters_are_refused_with_a_pointer_to_the_sharded_optimizer():
    dtensor = pytest.importorskip("torch.distributed.tensor")
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
        created = True
    else:
        created = False
    try:
        mesh = dtensor.DeviceMesh("cpu", [0])
        param = nn.Parameter(dtensor.distribute_tensor(torch.randn(4, 3), mesh, [dtensor.Shard(0)]))
        with pytest.raises(ValueError, match="FullyShardedYellowFin"):
            YellowFin([param])
    finally:
        if created:
            dist.destroy_process_group()


PATHS = [{"foreach": False}, {"foreach": True}, {"fused": True}]


@pytest.mark.parametrize("path", PATHS, ids=str)
@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        ({"beta": "0.9"}, TypeError, "beta"),
        ({"eps": None}, TypeError, "eps"),
        ({"curvature_window": True}, TypeError, "curvature_window"),
        ({"curvature_window": 10**9}, ValueError, "curvature_window"),
        ({"lr": torch.tensor(float("nan"))}, ValueError, "lr"),
        ({"lr": float("nan")}, ValueError, "lr"),
        ({"lr": "1"}, TypeError, "lr"),
        ({"per_group_tuning": "no"}, TypeError, "per_group_tuning"),
        ({"nesterov": "yes"}, TypeError, "nesterov"),
        ({"slow_start": 1}, TypeError, "slow_start"),
    ],
    ids=str,
)
def test_inputs_of_the_wrong_type_or_range_are_refused_clearly(path, kwargs, error, name):
    with pytest.raises(error, match=name) as raised:
        YellowFin(make_model().parameters(), **path, **kwargs)
    assert "allowed" in str(raised.value)


@pytest.mark.parametrize("path", PATHS, ids=str)
def test_the_same_tensor_twice_in_one_group_is_refused(path):
    p = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="more than once"):
        YellowFin([p, p], **path)
    opt = YellowFin([nn.Parameter(torch.zeros(2))], per_group_tuning=True, **path)
    with pytest.raises(ValueError, match="more than once"):
        opt.add_param_group({"params": [p, p]})


def _trained(steps=5, **options):
    model, data = make_model(), make_data()
    opt = YellowFin(model.parameters(), **options)
    train(model, opt, data, steps=steps)
    return model, opt


def _poison_tuner(field):
    def poison(saved):
        saved["tuners"][0][field] = saved["tuners"][0][field].clone()
        saved["tuners"][0][field].view(-1)[0] = float("nan")
    return poison


def _set_group(name, value):
    def change(saved):
        saved["param_groups"][0][name] = value
    return change


def _poison_buffer(saved):
    saved["state"][0]["momentum_buffer"][0, 0] = float("inf")


@pytest.mark.parametrize(
    "corrupt, error",
    [(_poison_tuner(field), ValueError) for field in YellowFin(make_model().parameters()).state_dict()["tuners"][0]]
    + [
        (_set_group("lr", float("nan")), ValueError),
        (_set_group("lr", torch.tensor(float("inf"))), ValueError),
        (_set_group("beta", 1.5), ValueError),
        (_set_group("beta", "0.9"), TypeError),
        (_set_group("nesterov", "yes"), TypeError),
        (_set_group("fused", True), ValueError),  # the saved group already says foreach=True
        (_set_group("betta", 0.9), ValueError),
        (_poison_buffer, ValueError),
    ],
)
def test_state_dict_with_invalid_values_is_refused_and_changes_nothing(corrupt, error):
    model, opt = _trained(foreach=True)
    saved = copy.deepcopy(_trained(steps=7, foreach=True)[1].state_dict())
    corrupt(saved)
    before, stats, groups = [t.clone() for t in flat_state(opt)], opt.stats(), copy.deepcopy(opt.param_groups)
    with pytest.raises(error):
        opt.load_state_dict(saved)
    assert all(torch.equal(a, b) for a, b in zip(before, flat_state(opt)))
    assert opt.stats() == stats
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == [
        {k: v for k, v in g.items() if k != "params"} for g in groups
    ]


@pytest.mark.parametrize("option", sorted(YellowFin(make_model().parameters()).defaults))
def test_state_dict_saved_before_an_option_existed_loads_with_its_default_and_steps(option):
    model, opt = _trained()
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        del group[option]
    resumed_model = copy.deepcopy(model)
    resumed = YellowFin(resumed_model.parameters())
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0][option] == YellowFin(make_model().parameters()).defaults[option]
    train(resumed_model, resumed, make_data(), steps=2)
    assert resumed.stats()["step"] == 7
    assert all(torch.isfinite(p).all() for p in resumed_model.parameters())


@pytest.mark.parametrize("options", [{"foreach": False}, {"foreach": True},
                                     {"foreach": True, "nesterov": True, "weight_decay": 0.1}], ids=str)
def test_complex_parameter_steps_like_its_real_view_twin(options):
    (z, opt), (twin, twin_opt) = complex_and_real_twin(**options)
    torch.testing.assert_close(torch.view_as_real(z.detach()), twin.detach(), rtol=1e-12, atol=1e-12)
    assert opt.stats() == pytest.approx(twin_opt.stats(), rel=1e-12)
    assert opt.state[z]["momentum_buffer"].dtype == torch.complex128


def test_complex_parameter_with_sparse_gradient_is_refused_clearly():
    p = torch.zeros(3, dtype=torch.complex128, requires_grad=True)
    p.grad = torch.zeros(3, dtype=torch.complex128).to_sparse()
    with pytest.raises(ValueError, match="complex parameters with sparse gradients"):
        YellowFin([p]).step()


def test_state_dict_whose_groups_disagree_on_a_shared_tuner_is_refused():
    model = make_model()
    opt = YellowFin([{"params": model[0].parameters()}, {"params": model[2].parameters()}])
    saved = opt.state_dict()
    saved["param_groups"][1]["beta"] = 0.9
    with pytest.raises(ValueError, match="shared tuner"):
        opt.load_state_dict(saved)
    assert opt.param_groups[1]["beta"] is None  # unchanged: the default, the tuner's own memory


def test_reference_variant_pins_the_authors_settings_and_takes_overrides():
    p = torch.zeros(2, requires_grad=True)
    group = YellowFin.reference_variant([p]).param_groups[0]
    pinned = dict(beta=0.999, curvature_window=20, eps=1e-6, initial_lr=1e-4, initial_momentum=0.0,
                  adaptive_clipping=True, slow_start=True, update_first=False, curvature_smoothing="log",
                  smooth_tuned=False)
    assert {name: group[name] for name in pinned} == pinned
    overridden = YellowFin.reference_variant([p], slow_start=False, nesterov=True).param_groups[0]
    assert overridden["slow_start"] is False and overridden["nesterov"] is True and overridden["beta"] == 0.999


def test_reference_variant_trains():
    model, data = make_model(), make_data()
    before = float(loss_of(model, data))
    train(model, YellowFin.reference_variant(model.parameters()), data, steps=300)
    assert float(loss_of(model, data)) < 0.5 * before
