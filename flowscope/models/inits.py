"""Weight-initialization schemes as named registry entries.

The Gaussian schemes are the ones of the DD2424 lecture 4 init experiment (inputs N(0,1),
d=500, ten layers of 500 units): ``small`` N(0, 0.01²), ``large`` N(0, 1), ``xavier``
N(0, 1/n_in) as that lecture defines it, ``he`` N(0, 2/n_in); plus Glorot's fan-average
N(0, 2/(n_in+n_out)), a fixed-std ``normal``, and, for the symmetry experiments of the
CS/DS 541 notes, ``zeros``, ``constant`` and ``orthogonal`` (orthonormal rows); and
``meanfield``, N(0, σ_w²/n_in) weights with N(0, σ_b²) biases, the random nets of mean-field
theory, and ``meanfield_orthogonal``, the same σ_w² and σ_b² with orthogonal weights
(``orthogonal`` takes a ``sigma_b2`` too).

Every scheme fills a weight in place under ``torch.no_grad()`` with an optional
``torch.Generator`` that lives on the weight's device, so no data goes through the CPU.

Example:
    >>> import torch
    >>> w = torch.empty(500, 500)
    >>> _ = INITS.get("he")(w, generator=torch.Generator().manual_seed(0))
    >>> round(init_std("he", 500, 500), 4)
    0.0632
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from flowscope.core.errors import FlowscopeError, unknown
from flowscope.core.registry import Registry

__all__ = ["INITS", "INIT_TARGETS", "InitScheme", "Param", "apply_init", "fans", "init_std"]

# The layers apply_init touches. ConvTranspose keeps (in, out, *k) weights, so it is left out.
INIT_TARGETS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class Param:
    """One numeric keyword parameter of a scheme: its default (None = required) and rule."""

    default: float | None
    rule: Callable[[float], bool]
    allowed: str


@dataclass(frozen=True)
class InitScheme:
    """A named way of filling a weight tensor in place.

    Example:
        >>> import torch
        >>> w = torch.empty(3, 4)
        >>> INITS.get("constant")(w, value=0.5).unique().tolist()
        [0.5]
        >>> INITS.get("normal").std(4, 3, std=0.2)
        0.2

    ``std_rule(fan_in, fan_out, params)`` gives the standard deviation the scheme implies
    (None when the scheme is not an i.i.d. zero-mean Gaussian); ``fill(weight, std, params,
    generator)`` writes the values; ``bias_std(params)``, where given, the std of the biases
    :func:`apply_init` draws (the mean-field schemes' σ_b; the others set biases to 0).
    """

    name: str
    summary: str
    std_rule: Callable[[int, int, Mapping[str, float]], float | None]
    fill: Callable[[Tensor, float | None, Mapping[str, float], torch.Generator | None], None]
    params: Mapping[str, Param] = field(default_factory=dict)
    bias_std: Callable[[Mapping[str, float]], float] | None = None  # None: biases set to 0

    def resolve(self, params: Mapping[str, object]) -> dict[str, float]:
        """Check ``params`` against this scheme and fill in defaults; raise on anything off."""
        extra = [k for k in params if k not in self.params]
        if extra and not self.params:
            raise FlowscopeError(
                f"init {self.name!r} takes no parameters, got {extra[0]}={params[extra[0]]!r}; "
                "use init 'normal' with std=... for a fixed standard deviation"
            )
        if extra:
            raise unknown(f"init {self.name!r} parameter", extra[0], self.params)
        return {key: self._value(key, spec, params.get(key)) for key, spec in self.params.items()}

    def _value(self, key: str, spec: Param, value: object) -> float:
        """One parameter's checked value."""
        if value is None:
            if spec.default is None:
                raise FlowscopeError(
                    f"init {self.name!r} needs parameter {key!r} ({spec.allowed}), got none"
                )
            return spec.default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not spec.rule(value):
            raise FlowscopeError(
                f"init {self.name!r}: {key}={value!r} is not allowed; {key} must be {spec.allowed}"
            )
        return float(value)

    def std(self, fan_in: int, fan_out: int, **params: object) -> float | None:
        """The std this scheme implies at these fans (None if it is not Gaussian)."""
        return self.std_rule(fan_in, fan_out, self.resolve(params))

    def __call__(
        self, weight: Tensor, *, generator: torch.Generator | None = None, **params: object
    ) -> Tensor:
        """Fill ``weight`` in place (fans from its shape) and return it."""
        values = self.resolve(params)
        fan_in, fan_out = fans(weight)
        _check_generator(generator, weight, self.name)
        with torch.no_grad():
            self.fill(weight, self.std_rule(fan_in, fan_out, values), values, generator)
        return weight


INITS: Registry[InitScheme] = Registry("init")


def _finite(x: float) -> bool:
    return math.isfinite(x)


def _nonnegative(x: float) -> bool:
    return math.isfinite(x) and x >= 0


def _positive(x: float) -> bool:
    return math.isfinite(x) and x > 0


def _gaussian(
    weight: Tensor, std: float | None, params: Mapping[str, float], gen: torch.Generator | None
) -> None:
    """Fill with N(0, std²); std 0 writes exact zeros."""
    if not std:
        weight.zero_()
    else:
        weight.normal_(0.0, std, generator=gen)


def _constant(
    weight: Tensor, std: float | None, params: Mapping[str, float], gen: torch.Generator | None
) -> None:
    """Fill every entry with params['value']."""
    weight.fill_(params["value"])


def _orthogonal(
    weight: Tensor, std: float | None, params: Mapping[str, float], gen: torch.Generator | None
) -> None:
    """Fill with a (semi-)orthogonal matrix times params['gain']."""
    nn.init.orthogonal_(weight, gain=params["gain"], generator=gen)


def _orthogonal_sigma(
    weight: Tensor, std: float | None, params: Mapping[str, float], gen: torch.Generator | None
) -> None:
    """Fill with a (semi-)orthogonal matrix times √params['sigma_w2']."""
    nn.init.orthogonal_(weight, gain=math.sqrt(params["sigma_w2"]), generator=gen)


def _add(scheme: InitScheme) -> None:
    INITS.register(scheme.name)(scheme)


_add(
    InitScheme(
        "zeros", "all weights 0 (only the last bias can learn)", lambda i, o, p: 0.0, _gaussian
    )
)
_add(
    InitScheme(
        "constant",
        "all weights equal to `value` (default 0.01, the scale of `small`, minus its randomness)",
        lambda i, o, p: None,
        _constant,
        {"value": Param(0.01, _finite, "a finite number")},
    )
)
_add(InitScheme("small", "N(0, 0.01²) (DD2424)", lambda i, o, p: 0.01, _gaussian))
_add(InitScheme("large", "N(0, 1) (DD2424)", lambda i, o, p: 1.0, _gaussian))
_add(
    InitScheme(
        "xavier", "N(0, 1/n_in), DD2424's Xavier", lambda i, o, p: 1 / math.sqrt(i), _gaussian
    )
)
_add(
    InitScheme("glorot", "N(0, 2/(n_in+n_out))", lambda i, o, p: math.sqrt(2 / (i + o)), _gaussian)
)
_add(InitScheme("he", "N(0, 2/n_in)", lambda i, o, p: math.sqrt(2 / i), _gaussian))
_add(
    InitScheme(
        "orthogonal",
        "orthonormal rows (columns when out > in) times `gain` (default 1); biases"
        " N(0, `sigma_b2`) (default 0)",
        lambda i, o, p: None,
        _orthogonal,
        {
            "gain": Param(1.0, _positive, "a finite number > 0"),
            "sigma_b2": Param(0.0, _nonnegative, "a finite number >= 0"),
        },
        bias_std=lambda p: math.sqrt(p["sigma_b2"]),
    )
)
_add(
    InitScheme(
        "meanfield",
        "N(0, `sigma_w2`/n_in) weights (default 1) and N(0, `sigma_b2`) biases (default 0):"
        " the random nets of mean-field theory (Poole et al. 2016)",
        lambda i, o, p: math.sqrt(p["sigma_w2"] / i),
        _gaussian,
        {
            "sigma_w2": Param(1.0, _nonnegative, "a finite number >= 0"),
            "sigma_b2": Param(0.0, _nonnegative, "a finite number >= 0"),
        },
        bias_std=lambda p: math.sqrt(p["sigma_b2"]),
    )
)
_add(
    InitScheme(
        "meanfield_orthogonal",
        "orthogonal weights times √`sigma_w2` (default 1) and N(0, `sigma_b2`) biases"
        " (default 0): meanfield's σ_w² with orthogonal weights (Pennington et al. 2017)",
        lambda i, o, p: None,
        _orthogonal_sigma,
        {
            "sigma_w2": Param(1.0, _positive, "a finite number > 0"),
            "sigma_b2": Param(0.0, _nonnegative, "a finite number >= 0"),
        },
        bias_std=lambda p: math.sqrt(p["sigma_b2"]),
    )
)
_add(
    InitScheme(
        "normal",
        "N(0, std²) with a fixed `std` (required)",
        lambda i, o, p: p["std"],
        _gaussian,
        {"std": Param(None, _nonnegative, "a finite number >= 0")},
    )
)


def _repeated_rows(
    weight: Tensor, std: float | None, params: Mapping[str, float], gen: torch.Generator | None
) -> None:
    """One N(0, 1/n_in) row, repeated for every output unit (CS/DS 541 exercise 3)."""
    scale = 1 / math.sqrt(fans(weight)[0])  # std_rule is None: the entries are not i.i.d.
    row = torch.empty_like(weight[:1]).normal_(0.0, scale, generator=gen)
    weight.copy_(row.expand_as(weight))


_add(
    InitScheme(
        "repeated_rows",
        "every row the same N(0, 1/n_in) draw: all units start identical (symmetry)",
        lambda i, o, p: None,
        _repeated_rows,
    )
)


def fans(weight: Tensor) -> tuple[int, int]:
    """The (fan_in, fan_out) of a Linear or ConvNd weight, from its shape.

    Example:
        >>> import torch
        >>> fans(torch.empty(20, 500))            # Linear(500, 20): (out, in)
        (500, 20)
        >>> fans(torch.empty(16, 3, 3, 3))        # Conv2d(3, 16, 3): in x kernel elements
        (27, 144)

    Args:
        weight: a tensor of shape (out, in, *kernel); for grouped convolutions ``in`` is
            the number of input channels each output sees, which is its true fan-in.

    Returns:
        ``(in * k, out * k)`` with ``k`` the number of kernel elements (1 for Linear).

    Raises:
        FlowscopeError: for a tensor with fewer than two dimensions, or a lazy
            (uninitialised) parameter.
    """
    if isinstance(weight, nn.parameter.UninitializedParameter):
        raise FlowscopeError(
            "cannot take fans of a lazy, uninitialised weight; run one forward pass first"
        )
    if weight.dim() < 2:
        raise FlowscopeError(
            f"fans need a weight of shape (out, in, *kernel), got shape {tuple(weight.shape)}"
        )
    kernel = math.prod(weight.shape[2:])
    return int(weight.shape[1]) * kernel, int(weight.shape[0]) * kernel


def init_std(name: str, fan_in: int, fan_out: int, **params: object) -> float | None:
    """The standard deviation a scheme gives each weight at these fans.

    Example:
        >>> init_std("xavier", 500, 500) == 500 ** -0.5
        True
        >>> init_std("glorot", 500, 100) == (2 / 600) ** 0.5
        True
        >>> init_std("zeros", 500, 500), init_std("orthogonal", 500, 500)
        (0.0, None)

    Args:
        name: a scheme in ``INITS``.
        fan_in, fan_out: as ``fans`` gives them; integers >= 1.
        **params: the scheme's parameters (``std`` for ``normal``).

    Returns:
        The std of the i.i.d. zero-mean Gaussian the scheme draws from; 0.0 for ``zeros``;
        None for ``constant`` and ``orthogonal``, which are not i.i.d. Gaussian.

    Raises:
        FlowscopeError: unknown scheme, unknown/missing/bad parameter, fans below 1.
    """
    for what, fan in (("fan_in", fan_in), ("fan_out", fan_out)):
        if isinstance(fan, bool) or not isinstance(fan, int) or fan < 1:
            raise FlowscopeError(f"{what} must be an integer >= 1, got {fan!r}")
    return INITS.get(name).std(fan_in, fan_out, **params)


def apply_init(
    model: nn.Module,
    name: str,
    *,
    generator: torch.Generator | None = None,
    bias: str | None = "zeros",
    **params: object,
) -> list[str]:
    """Re-initialise every Linear and Conv1d/2d/3d weight of ``model`` in place.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(500, 500), nn.Tanh(), nn.Linear(500, 10))
        >>> apply_init(net, "xavier", generator=torch.Generator().manual_seed(0))
        ['0', '2']
        >>> bool((net[0].bias == 0).all())
        True

    Args:
        model: any module; norm layers, embeddings and other parameters are left alone.
        name: a scheme in ``INITS`` (``flowscope.models.inits.INITS.names()``).
        generator: a ``torch.Generator`` on the model's device, for reproducible draws;
            None uses torch's global generator.
        bias: ``"zeros"`` sets the biases of those layers to 0 (or draws them N(0, σ_b²) for
            a scheme given ``sigma_b2`` > 0: ``meanfield``, ``orthogonal``); None leaves them
            as they are.
        **params: the scheme's parameters, e.g. ``std=0.05`` for ``normal``.

    Returns:
        The qualified module names re-initialised, in ``named_modules()`` order (the
        names the recorder uses for layers; the root module itself is ``""``).

    Raises:
        FlowscopeError: unknown scheme or parameter, bad ``bias``, a lazy layer, or a
            generator on another device than a weight; raised before anything is changed.
    """
    scheme = INITS.get(name)
    scheme.resolve(params)
    if bias not in ("zeros", None):
        raise FlowscopeError(f"bias={bias!r} is not allowed; use 'zeros' or None (leave as is)")
    targets = [(qual, m) for qual, m in model.named_modules() if isinstance(m, INIT_TARGETS)]
    for qual, module in targets:
        fans(_weight(module, qual))
        _check_generator(generator, _weight(module, qual), f"layer {qual or '<root>'!r}")
    bias_std = scheme.bias_std(scheme.resolve(params)) if scheme.bias_std else 0.0
    for qual, module in targets:
        scheme(_weight(module, qual), generator=generator, **params)
        if bias == "zeros" and isinstance(module.bias, Tensor):
            with torch.no_grad():
                if bias_std > 0:
                    module.bias.normal_(0.0, bias_std, generator=generator)
                else:
                    module.bias.zero_()
    return [qual for qual, _ in targets]


def _weight(module: nn.Module, qual: str) -> Tensor:
    """The module's weight, or an error naming the layer if it is lazy."""
    weight = module.weight
    if isinstance(weight, nn.parameter.UninitializedParameter) or not isinstance(weight, Tensor):
        raise FlowscopeError(
            f"layer {qual or '<root>'!r} ({type(module).__name__}) has no initialised weight yet; "
            "run one forward pass before apply_init"
        )
    return weight


def _check_generator(generator: torch.Generator | None, weight: Tensor, where: str) -> None:
    """Refuse a generator on another device than the weight (no silent host round trip)."""
    if generator is None:
        return
    gen, dev = generator.device, weight.device
    if gen.type != dev.type or (gen.index is not None and dev.index not in (None, gen.index)):
        raise FlowscopeError(
            f"generator is on {gen} but the weight of {where} is on {dev}; "
            f"make it with torch.Generator(device={str(dev)!r})"
        )
