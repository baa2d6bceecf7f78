"""Small models, training loops and guards shared by the optimizer tests."""

import contextlib

import torch
from torch import nn

from yellowfin import YellowFin

# The two tuners, for the tests of properties that both must have.
TUNERS = ("reference", "scale_free")
# The buffers a plain (not preconditioned, not averaged) parameter's state holds once a step has seen its gradient:
# the scale-free tuner keeps x_0, ``initial_param``, beside the reference's two.
TUNER_BUFFERS = {"reference": {"grad_avg", "momentum_buffer"},
                 "scale_free": {"grad_avg", "momentum_buffer", "initial_param"},
                 # precondition="adam": P, v, x_0 and P's count
                 "preconditioned": {"second_moment", "momentum_buffer", "initial_param", "step"}}


def expected_buffers(kind, opt):
    """TUNER_BUFFERS[kind], with the average handed out where the optimizer keeps one (by default, in the
    primal-average form)."""
    return TUNER_BUFFERS[kind] | ({"averaged_param"} if opt.param_groups[0]["average"] else set())


def created_buffer(name, param):
    """A per-parameter buffer as the first step that sees the parameter's gradient creates it, skipped or not:
    ``initial_param`` (x_0) and ``averaged_param`` (the average handed out, which starts at the first iterate) are the
    parameter as it stands then, ``step`` (the preconditioned tuner's count) a 0-dim float64 zero; every other buffer
    is zeros."""
    if name == "step":
        return torch.zeros((), dtype=torch.float64, device=param.device)
    return param.detach().clone() if name in ("initial_param", "averaged_param") else torch.zeros_like(param)


def make_model(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1)).to(dtype)


def make_data(seed=1, n=64, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=generator, dtype=dtype)
    y = x[:, :1] - 0.5 * x[:, 1:2] + 0.1 * torch.randn(n, 1, generator=generator, dtype=dtype)
    return x, y


def loss_of(model, data):
    x, y = data
    return ((model(x) - y) ** 2).mean()


def train(model, opt, data, steps, batch=16, seed=2):
    generator = torch.Generator().manual_seed(seed)
    x, y = data
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=generator)
        opt.zero_grad()
        loss = loss_of(model, (x[idx], y[idx]))
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def flat_state(opt):
    """Every tensor of an optimizer's state dict, in a fixed order."""
    sd = opt.state_dict()
    tensors = []
    for index in sorted(sd["state"]):
        for name in sorted(sd["state"][index]):
            tensors.append(sd["state"][index][name])
    for tuner in sd["tuners"]:
        tensors.extend(tuner[name] for name in sorted(tuner))
    return tensors


def run_with_holes(dtype=torch.float64, steps=25, nan_at=None, **options):
    """A model with a frozen layer, a 0-dim parameter, and parameters missing gradients on some steps
    (and a NaN gradient at step ``nan_at``), trained by YellowFin(**options)."""
    torch.manual_seed(0)
    layers = nn.ModuleList([nn.Linear(5, 7), nn.Linear(7, 3), nn.Linear(3, 1)]).to(dtype)
    scalar = nn.Parameter(torch.tensor(0.7, dtype=dtype))
    layers[1].requires_grad_(False)
    params = list(layers.parameters()) + [scalar]
    opt = YellowFin([{"params": params[:2]}, {"params": params[2:], "lr": 0.5}], **options)
    generator = torch.Generator().manual_seed(5)
    for step in range(steps):
        x = torch.randn(8, 5, generator=generator, dtype=dtype)
        hidden = layers[1](torch.tanh(layers[0](x)))
        out = layers[2](hidden).squeeze(-1) * scalar if step % 3 else hidden.sum(-1)
        opt.zero_grad(set_to_none=True)
        (out**2).mean().backward()
        if step == nan_at:
            layers[0].weight.grad[0, 0] = float("nan")
        opt.step()
    return params, opt


def train_with_scaled_loss(scale, steps=10, dtype=torch.float64, **options):
    """make_model trained on the full batch of make_data with its loss multiplied by ``scale``."""
    model, (x, y) = make_model(dtype=dtype), make_data(dtype=dtype)
    opt = YellowFin(model.parameters(), **options)
    for _ in range(steps):
        opt.zero_grad()
        (scale * ((model(x) - y) ** 2).mean()).backward()
        opt.step()
    return list(model.parameters()), opt


def train_after_zero_gradients(zero_steps, steps=40, **options):
    """make_model trained after ``zero_steps`` steps whose gradients are all zero."""
    model, data = make_model(), make_data()
    opt = YellowFin(model.parameters(), **options)
    for _ in range(zero_steps):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
    train(model, opt, data, steps=steps)
    return list(model.parameters()), opt


def complex_and_real_twin(steps=200, **options):
    """A complex128 parameter and its ``torch.view_as_real`` float64 twin, each stepped by
    YellowFin(**options) with the same random complex gradients (purely imaginary ones included)."""
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(2, 3, dtype=torch.complex128, generator=generator).requires_grad_()
    twin = torch.view_as_real(z.detach()).clone().requires_grad_()
    opt, twin_opt = YellowFin([z], **options), YellowFin([twin], **options)
    for step in range(steps):
        grad = torch.randn(2, 3, dtype=torch.complex128, generator=generator)
        if step % 5 == 0:
            grad = 1j * grad.imag
        z.grad, twin.grad = grad.clone(), torch.view_as_real(grad).clone()
        opt.step()
        twin_opt.step()
    return (z, opt), (twin, twin_opt)


@contextlib.contextmanager
def host_reads_forbidden():
    """Make every way of reading a tensor's value on the host raise."""

    def forbid(*args, **kwargs):
        raise AssertionError("host synchronisation inside step()")

    names = ("item", "__float__", "__int__", "__bool__", "__index__", "tolist", "numpy")
    saved = {name: getattr(torch.Tensor, name) for name in names}
    try:
        for name in names:
            setattr(torch.Tensor, name, forbid)
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)
