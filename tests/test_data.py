"""Synthetic data: shapes, distributions, reproducibility, learnability, and errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from flowscope.core.errors import FlowscopeError
from flowscope.study.data import DATA, Batch, make_data

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
SMALL = {"n": 32, "classes": 3}


def _gen(seed: int, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def test_registry_holds_the_documented_entries() -> None:
    assert DATA.names() == ["gaussian", "images", "teacher"]


@pytest.mark.parametrize("name", DATA.names())
def test_every_entry_draws_a_well_formed_classification_batch(name) -> None:
    batch = make_data(name, **SMALL, generator=_gen(0))
    assert isinstance(batch, Batch) and batch.task == "classification"
    assert batch.x.dtype == torch.float32 and batch.y.dtype == torch.int64
    assert batch.x.shape[0] == 32 and batch.y.shape == (32,)
    assert torch.isfinite(batch.x).all()
    assert batch.y.min() >= 0 and batch.y.max() < 3


@pytest.mark.parametrize("name", DATA.names())
def test_every_entry_is_reproducible_from_its_seed(name) -> None:
    a, b = make_data(name, generator=_gen(5)), make_data(name, generator=_gen(5))
    c = make_data(name, generator=_gen(6))
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not torch.equal(a.x, c.x)
    # No generator: a fresh one seeded 0, so the batch does not depend on global state.
    torch.manual_seed(123)
    d = make_data(name)
    torch.manual_seed(456)
    assert torch.equal(d.x, make_data(name).x)
    assert torch.equal(d.x, make_data(name, generator=_gen(0)).x)


def test_gaussian_is_standard_normal_with_uniform_labels() -> None:
    batch = make_data("gaussian", n=2000, dim=500, classes=10, generator=_gen(0))
    assert batch.x.shape == (2000, 500)
    assert abs(batch.x.mean().item()) < 0.005
    assert batch.x.std().item() == pytest.approx(1.0, rel=0.005)
    counts = torch.bincount(batch.y, minlength=10)
    assert counts.min() > 150 and counts.max() < 250  # 200 expected per class


def test_images_shape() -> None:
    batch = make_data("images", n=5, channels=2, size=7, classes=4, generator=_gen(0))
    assert batch.x.shape == (5, 2, 7, 7) and batch.y.shape == (5,)


def test_linear_teacher_labels_are_the_argmax_of_a_teacher_drawn_first() -> None:
    batch = make_data("teacher", n=100, dim=12, classes=4, generator=_gen(9))
    gen = _gen(9)
    w = torch.randn(4, 12, generator=gen) / math.sqrt(12)
    x = torch.randn(100, 12, generator=gen)
    assert torch.equal(batch.x, x)
    assert torch.equal(batch.y, (x @ w.T).argmax(1))


def test_teacher_classes_are_roughly_balanced() -> None:
    for kind in ["linear", "tanh"]:
        batch = make_data("teacher", n=4000, dim=50, classes=4, kind=kind, generator=_gen(1))
        counts = torch.bincount(batch.y, minlength=4)
        assert counts.min() > 300, (kind, counts.tolist())  # 1000 if perfectly balanced


def _held_out_accuracy(batch: Batch, hidden: int | None, steps: int = 200) -> float:
    """Train a student on the first 2/3 of the batch; its accuracy on the last third."""
    torch.manual_seed(0)
    dim, classes, cut = batch.x.shape[1], int(batch.y.max()) + 1, 2 * len(batch.y) // 3
    if hidden is None:
        student: nn.Module = nn.Linear(dim, classes)
    else:
        student = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, classes))
    opt = torch.optim.Adam(student.parameters(), lr=0.02)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(student(batch.x[:cut]), batch.y[:cut]).backward()
        opt.step()
    with torch.no_grad():
        return (student(batch.x[cut:]).argmax(1) == batch.y[cut:]).float().mean().item()


def test_teacher_task_is_learnable_and_gaussian_labels_are_not() -> None:
    kwargs = {"n": 3000, "dim": 20, "classes": 4, "generator": _gen(0)}
    assert _held_out_accuracy(make_data("teacher", **kwargs), hidden=None) > 0.9
    assert _held_out_accuracy(make_data("gaussian", **kwargs), hidden=None) < 0.35


def test_tanh_teacher_is_learnable_by_a_small_tanh_student() -> None:
    kwargs = {"n": 3000, "dim": 10, "classes": 3, "hidden": 8, "generator": _gen(0)}
    batch = make_data("teacher", kind="tanh", **kwargs)
    assert _held_out_accuracy(batch, hidden=32) > 0.8


def test_device_defaults_to_the_generators() -> None:
    batch = make_data("gaussian", n=2, device="cpu", generator=_gen(0))
    assert batch.x.device.type == "cpu" and batch.y.device.type == "cpu"


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("gaussian", {"n": 0}, r"data 'gaussian': n must be an integer >= 1, got 0"),
        ("gaussian", {"dim": -1}, r"dim must be an integer >= 1, got -1"),
        ("gaussian", {"classes": 1}, r"classes must be an integer >= 2, got 1"),
        ("gaussian", {"n": 3.0}, r"n must be an integer >= 1, got 3.0"),
        ("teacher", {"kind": "relu"}, r"teacher kind 'relu' in data 'teacher'.*linear, tanh"),
        ("teacher", {"hidden": 0}, r"data 'teacher': hidden must be an integer >= 1, got 0"),
        ("images", {"size": 0}, r"data 'images': size must be an integer >= 1, got 0"),
        ("images", {"channels": 0}, r"channels must be an integer >= 1, got 0"),
        ("images", {"colour": 3}, r"data 'images' argument 'colour'"),
        ("gausian", {}, r"unknown data 'gausian': did you mean 'gaussian'\?"),
        ("gaussian", {"device": "gpu0"}, r"device='gpu0' is not a torch device"),
        ("gaussian", {"device": "meta", "generator": torch.Generator()}, r"generator is on cpu"),
    ],
)
def test_bad_argument(name, kwargs, message) -> None:
    with pytest.raises(FlowscopeError, match=message):
        make_data(name, **kwargs)


@CUDA
@pytest.mark.parametrize("name", DATA.names())
def test_batches_are_drawn_on_the_generators_cuda_device(name) -> None:
    batch = make_data(name, generator=_gen(0, "cuda"))
    assert batch.x.device.type == "cuda" and batch.y.device.type == "cuda"
