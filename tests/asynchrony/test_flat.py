"""Flat views (yellowfin/asynchrony/flat.py): the one way every asynchronous system turns a model's
parameters and gradients into a vector and back."""

import torch
from torch import nn

from yellowfin.asynchrony.flat import flat_gradients, flat_parameters, load_gradients, load_parameters


def _params():
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(3, 4).t())  # non-contiguous: parameters_to_vector would refuse it
    return [weight, nn.Parameter(torch.randn(5))]


def test_a_flat_vector_round_trips_into_the_parameters_in_place():
    params = _params()
    flat = flat_parameters(params)
    assert flat.shape == (17,) and torch.equal(flat[:12], params[0].detach().reshape(-1))
    storages = [p.data_ptr() for p in params]
    load_parameters(params, torch.arange(17.0))
    assert [p.data_ptr() for p in params] == storages  # copied in: shared memory stays shared
    assert torch.equal(flat_parameters(params), torch.arange(17.0))
    assert all(p.grad is None for p in params)  # loading values is not a step autograd records


def test_gradients_round_trip_and_a_missing_gradient_reads_as_zeros():
    params = _params()
    params[1].grad = torch.ones(5)
    assert torch.equal(flat_gradients(params), torch.cat([torch.zeros(12), torch.ones(5)]))
    flat_grad = torch.arange(17.0)
    load_gradients(params, flat_grad)
    assert torch.equal(flat_gradients(params), flat_grad)
    flat_grad.zero_()  # the parameters own copies, not views of the vector they were given
    assert torch.equal(flat_gradients(params), torch.arange(17.0))
