"""Activations: each entry's module and function against the formula written out here."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from flowscope.core.activations import ACTIVATIONS, activation_type, alive_units, saturation_of
from flowscope.core.errors import FlowscopeError

X = torch.linspace(-8, 8, 2001, dtype=torch.float64)

# The definitions of DD2424 lecture 4 (Leaky ReLU slope 0.01, ELU alpha 1), plain math.
FORMULAS = {
    "tanh": lambda x: (torch.exp(x) - torch.exp(-x)) / (torch.exp(x) + torch.exp(-x)),
    "relu": lambda x: torch.where(x > 0, x, torch.zeros_like(x)),
    "sigmoid": lambda x: 1 / (1 + torch.exp(-x)),
    "leaky_relu": lambda x: torch.where(x > 0, x, 0.01 * x),
    "elu": lambda x: torch.where(x > 0, x, torch.exp(x) - 1),
    "gelu": lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2))),
    "linear": lambda x: x,
}


def test_registry_holds_exactly_the_documented_activations() -> None:
    assert ACTIVATIONS.names() == sorted(FORMULAS)


@pytest.mark.parametrize("name", ACTIVATIONS.names())
def test_entry_is_named_by_its_key_and_module_is_fresh(name) -> None:
    act = ACTIVATIONS.get(name)
    assert act.name == name
    first, second = act.module(), act.module()
    assert isinstance(first, nn.Module) and first is not second


@pytest.mark.parametrize("name", ACTIVATIONS.names())
def test_module_and_fn_compute_the_formula(name) -> None:
    act = ACTIVATIONS.get(name)
    expected = FORMULAS[name](X)
    torch.testing.assert_close(act.fn(X), expected, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(act.module()(X), expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("name", ACTIVATIONS.names())
def test_zero_output_flag_matches_the_fraction_of_exact_zeros(name) -> None:
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(0))
    zero_fraction = (ACTIVATIONS.get(name).fn(x) == 0).double().mean().item()
    assert (zero_fraction > 0.3) == ACTIVATIONS.get(name).zero_output


def test_saturation_intervals() -> None:
    saturating = {n: ACTIVATIONS.get(n).saturation for n in ACTIVATIONS.names()}
    assert saturating.pop("tanh") == (-0.99, 0.99)
    assert saturating.pop("sigmoid") == (0.01, 0.99)
    assert set(saturating.values()) == {None}


@pytest.mark.parametrize("name", ["tanh", "sigmoid"])
def test_saturation_interval_splits_flat_tails_from_the_middle(name) -> None:
    # DD2424: the derivative is tiny for |s| > 5; there the output lies outside the interval.
    act = ACTIVATIONS.get(name)
    assert act.saturation is not None
    low, high = act.saturation
    ends = act.fn(torch.tensor([-6.0, 6.0]))
    assert ends[0] <= low and ends[1] >= high
    assert low < act.fn(torch.tensor(0.0)).item() < high


def test_entries_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        ACTIVATIONS.get("relu").fn = torch.tanh  # type: ignore[misc]


@pytest.mark.parametrize("name", ACTIVATIONS.names())
def test_every_study_activation_is_in_the_module_catalogue(name) -> None:
    # one table: the registry's properties are those of its module type
    act = ACTIVATIONS.get(name)
    known = activation_type(act.module())
    assert known is not None and (known.zero_output, known.saturation) == (
        act.zero_output,
        act.saturation,
    )


def test_catalogue_families_and_other_libraries_names() -> None:
    assert activation_type("Softsign").xavier_like and activation_type("LogSigmoid").xavier_like
    assert activation_type("SELU").family == activation_type("QuickGELUActivation").family
    assert activation_type("MySwish").family == "relu"  # another library's, by its name
    assert activation_type("MyTanhAct").family == "tanh"
    assert activation_type("Linear") is None and activation_type("LayerNorm") is None
    assert saturation_of(torch.nn.ReLU6()) == (0.0, 6.0)

    class Scaled(torch.nn.Tanh):  # a subclass saturates as its base
        pass

    assert saturation_of(Scaled()) == (-0.99, 0.99)


def test_dead_units_are_all_zero_over_batch_and_positions() -> None:
    # one definition for the recorder's probes and the doctor: channels of conv maps
    x = torch.zeros(4, 3, 5, 5)
    x[2, 1, 4, 4] = 0.5  # channel 1 alive at one position of one sample
    x[0, 2] = float("nan")  # NaN is broken, not dead
    assert (~alive_units(x)).tolist() == [True, False, False]
    assert (~alive_units(torch.tensor([[0.0, -1.0], [0.0, 0.0]]))).tolist() == [True, False]


def test_unknown_activation() -> None:
    with pytest.raises(FlowscopeError, match=r"unknown activation 'tahn': did you mean 'tanh'\?"):
        ACTIVATIONS.get("tahn")
