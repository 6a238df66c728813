"""What a study file may hold, as pydantic models: key names, types and ranges, in one place.

:func:`flowscope.study.spec.validate` checks a parsed TOML table with :class:`StudyFile`
first, then every expanded config against the registries (nets, inits, data, probes).
:func:`json_schema` is the same contract for editors (``flowscope study schema``).
Values are taken as written: strict types, no ``"8"`` for 8, no ``true`` for 1.

Example:
    >>> StudyFile.model_fields["run"].annotation is Run
    True
    >>> Run().seeds
    [0]
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

from flowscope.core.columns import RESERVED
from flowscope.core.errors import unknown

# -- the claims' vocabulary (flowscope.study.claims evaluates them) ------------------------------

Reducer = Literal[
    "first", "last", "mean", "min", "max", "last/first", "first/last", "gain", "gain_to_input",
    "spread", "depth_scale",
]  # fmt: skip
Expect = Literal["increasing", "decreasing", "same", "differ", "power"]
StatKind = Literal["activation", "gradient", "weight", "weight_grad"]
REDUCERS: tuple[str, ...] = get_args(Reducer)
EXPECTS: tuple[str, ...] = get_args(Expect)
STAT_KINDS: tuple[str, ...] = get_args(StatKind)
TESTS = ("below", "above", "between", "expect")  # a claim has exactly one
STAT_COLUMNS = (
    "mean", "std", "rms", "min", "max", "absmax", "frac_zero", "frac_saturated", "nan", "inf",
)  # fmt: skip

Number = Annotated[int | float, WithJsonSchema({"type": "number"})]
"""A TOML integer or float, kept as written (``below = 10`` stays 10, not 10.0)."""

SWEEP_KEY = re.compile(r"(net|init|data|run)\..+")


def column_of(key: str) -> str:
    """Frame column of a sweep key: its last part (``init.name`` -> ``init``), or
    ``section_leaf`` where the last part is a column of the frames (``init.std`` ->
    ``init_std``, never ``std``, which is a statistic).

    Example:
        >>> column_of("net.activation"), column_of("init.name"), column_of("init.std")
        ('activation', 'init', 'init_std')
    """
    if key == "init.name":
        return "init"
    section, _, leaf = key.rpartition(".")
    return f"{section}_{leaf}" if leaf in RESERVED else leaf


class Table(BaseModel):
    """A TOML table of known keys; any other key is refused."""

    model_config = ConfigDict(extra="forbid", strict=True)


class Named(BaseModel):
    """A registry entry by ``name`` and its arguments; the registry checks the arguments."""

    model_config = ConfigDict(extra="allow", strict=True)
    name: str = Field(description="the registry entry")


class Net(Named):
    """[net]: the network; other keys are the net's arguments (width, depth, activation...)."""

    name: str = Field(description="a net: mlp, conv, ...")


class Init(Named):
    """[init]: the init scheme; other keys are its parameters (std for normal...)."""

    name: str = Field(description="an init scheme (xavier, he, small, ...) or a [presets] name")
    overrides: dict[str, str] = Field(
        default_factory=dict, description="layer glob = init scheme, applied after name"
    )


class Data(Named):
    """[data]: the batch; other keys are the data set's arguments (n, dim, classes...)."""

    name: str = Field(description="a data set: gaussian, teacher, ...")


class Source(BaseModel):
    """[source]: the lecture or paper this study reproduces."""

    model_config = ConfigDict(extra="allow", strict=True)
    file: str = Field(description="the source file, e.g. 002_2f5fb56b234155bd.txt")
    lines: str = Field(description='the lines it reproduces, e.g. "850-1450"')
    what: str | None = Field(default=None, description="what the source is, in words")


class Run(Table):
    """[run]: how every config runs and what it records."""

    steps: int = Field(
        default=0, ge=0, description="optimizer steps; 0 = one forward/backward at init"
    )
    seeds: Annotated[list[int], Field(min_length=1)] | int = Field(
        default=[0], description="one config per seed (one integer is a list of one)"
    )
    device: Literal["cpu", "cuda"] = Field(default="cpu", description="where tensors live")
    dtype: Literal["float32", "float64", "bfloat16"] = Field(
        default="float32", description="the net's and the data's dtype"
    )
    loss: Literal["cross_entropy", "mse", "sum_squares"] = Field(
        default="cross_entropy", description="the loss the backward pass starts from"
    )
    lr: Annotated[
        int | float, Field(gt=0), WithJsonSchema({"type": "number", "exclusiveMinimum": 0})
    ] = Field(default=0.1, description="the learning rate (the base one under muP)")
    optimizer: Literal["sgd", "adam"] = Field(default="sgd", description="the training optimizer")
    parametrization: Literal["sp", "mup"] = Field(
        default="sp",
        description="sp: as initialised, one lr; mup: muP for Adam (flowscope.models.mup)",
    )
    base_width: int | None = Field(
        default=None, ge=1, description="muP's base width (width multiplier = net.width / this)"
    )
    record_every: int = Field(
        default=1, ge=1, description="with steps > 0: every k-th step (and the last)"
    )
    mode: Literal["train", "eval"] = Field(
        default="train", description="module mode while recording"
    )
    warmup: int = Field(
        default=0, ge=0, description="train-mode passes first (batchnorm running stats)"
    )
    kinds: Annotated[list[StatKind], Field(min_length=1)] = Field(
        default=["activation", "gradient", "weight_grad"], description="what is recorded"
    )
    modules: list[str] = Field(
        default=[], description="module name globs; empty = every leaf module"
    )
    bins: int = Field(default=64, ge=1, description="linear histogram bins")
    hist_sample: int = Field(default=16384, ge=16, description="values sampled per histogram")
    probes: list[str] = Field(
        default=[], description="probes to run (dead_units, param_change, ...)"
    )

    @field_validator("seeds")
    @classmethod
    def _one_seed_is_a_list(cls, seeds: list[int] | int) -> list[int]:
        return [seeds] if isinstance(seeds, int) else seeds

    @model_validator(mode="after")
    def _mup_needs_adam(self) -> Run:
        if self.parametrization == "mup" and (self.optimizer != "adam" or self.base_width is None):
            raise ValueError(
                "parametrization 'mup' needs optimizer = 'adam' and a base_width "
                f"(got optimizer = {self.optimizer!r}, base_width = {self.base_width!r})"
            )
        return self

    @field_validator("probes")
    @classmethod
    def _known_probes(cls, probes: list[str]) -> list[str]:
        from flowscope.study.probes import PROBES  # torch: only when there are probes to check

        for probe in probes:
            PROBES.get(probe)
        return probes


class Claim(Table):
    """[[claim]]: one claim of the source, tested on the measured frames
    (see flowscope.study.claims)."""

    id: str = Field(description="a short unique name")
    text: str = Field(description="the source's words")
    of: str = Field(description="KIND.STATISTIC (activation.std) or probe.NAME")
    where: dict[str, Any] = Field(
        default_factory=dict, description="config column = value (or list of values)"
    )
    layers: str | None = Field(default=None, description="layer name glob (default: every layer)")
    divide_by: str | None = Field(
        default=None,
        description="a layer name glob: the series is divided, layer by layer in execution"
        " order, by the same statistic over these layers (e.g. an activation's local factor:"
        " its block's pre-activation gradient over its own output gradient)",
    )
    predicted: str | None = Field(
        default=None,
        description="probe.NAME whose series over the same layers, reduced the same way, is"
        " theory's value for the measured one (probe.meanfield_grad for gradient.rms); the"
        " test (below/above/between) then applies to measured / predicted",
    )
    tensor: str | None = Field(
        default=None, description="weight or bias, of weight kinds (default: weight)"
    )
    step: Annotated[int, Field(ge=0)] | None = Field(
        default=None, description="the step read (default: each config's last recorded step)"
    )
    reduce: Reducer | None = Field(default=None, description="per-layer series -> one number")
    below: Number | None = Field(default=None, description="holds when every value is below")
    above: Number | None = Field(default=None, description="holds when every value is above")
    between: Annotated[list[Number], Field(min_length=2, max_length=2)] | None = Field(
        default=None, description="[low, high]"
    )
    across: str | None = Field(default=None, description="the sweep axis expect compares along")
    expect: Expect | None = Field(default=None, description="how configs compare across")
    band: Number | None = Field(
        default=None, description="same/differ: max/min ratio (default 1.5)"
    )
    power: Number | None = Field(default=None, description="power: the log-log slope expected")
    tol: Number | None = Field(default=None, description="power: allowed slope error (default 0.1)")
    note: str | None = Field(default=None, description="a remark shown with the verdict")
    origin: Literal["lecture", "theory", "flowscope"] = Field(
        default="lecture",
        description="who makes the claim: the source lecture (default), a theory paper the"
        " note names, or flowscope itself (a measurement the source only implies)",
    )

    @field_validator("of")
    @classmethod
    def _known_statistic(cls, of: str) -> str:
        source, _, stat = of.partition(".")
        if source == "probe":
            from flowscope.study.probes import PROBES

            PROBES.get(stat)
        elif source not in STAT_KINDS:
            raise unknown("claim 'of' kind", source, [*STAT_KINDS, "probe"])
        elif stat not in STAT_COLUMNS:
            raise unknown("claim 'of' statistic", stat, STAT_COLUMNS)
        return of

    @field_validator("predicted")
    @classmethod
    def _known_prediction(cls, predicted: str | None) -> str | None:
        if predicted is not None:
            source, _, name = predicted.partition(".")
            if source != "probe":
                raise ValueError(f"predicted must be probe.NAME, got {predicted!r}")
            from flowscope.study.probes import PROBES

            PROBES.get(name)
        return predicted

    @model_validator(mode="after")
    def _one_test(self) -> Claim:
        tests = [k for k in TESTS if getattr(self, k) is not None]
        if len(tests) != 1:
            raise ValueError(f"a claim needs exactly one of {', '.join(TESTS)}; got {tests}")
        if self.expect is None and self.reduce is None:
            raise ValueError("below/above/between need a reduce")
        if self.expect is not None and self.across is None:
            raise ValueError(f"expect={self.expect!r} needs across = AXIS")
        if self.expect in ("increasing", "decreasing", "power") and self.reduce is None:
            raise ValueError(f"expect={self.expect!r} needs a reduce")
        if self.predicted is not None and self.expect is not None:
            raise ValueError("predicted goes with below/above/between, not expect")
        if self.expect == "power" and self.power is None:
            raise ValueError("expect='power' needs power = EXPONENT")
        return self


class StudyFile(Table):
    """A flowscope study file: a source's experiment, its grid and its claims."""

    model_config = ConfigDict(title="flowscope study file")
    name: str = Field(description="the study's name; a built-in study's is its file name")
    title: str | None = Field(default=None, description="one line (default: the name)")
    description: str = Field(default="", description="a paragraph: what is measured, and how")
    source: Source = Field(description="the lecture or paper this study reproduces")
    net: Net = Field(description="the network")
    init: Init = Field(description="the init scheme")
    data: Data = Field(description="the batch")
    sweep: dict[str, Annotated[list[Any], Field(min_length=1)]] = Field(
        default_factory=dict,
        description="dotted key = list of values; the grid is their cartesian product",
        json_schema_extra={"propertyNames": {"pattern": f"^(init|{SWEEP_KEY.pattern})$"}},
    )
    run: Run = Run()
    claim: list[Claim] = Field(default_factory=list, description="the source's claims")
    presets: dict[str, dict[str, str]] = Field(
        default_factory=dict, description="init presets: name = {layer glob = init scheme}"
    )

    @field_validator("sweep")
    @classmethod
    def _dotted_axes(cls, sweep: dict[str, list[Any]]) -> dict[str, list[Any]]:
        axes = {("init.name" if key == "init" else key): values for key, values in sweep.items()}
        for key in axes:
            if not SWEEP_KEY.fullmatch(key):
                raise ValueError(
                    f"sweep axis {key!r} must be a dotted key under net., init., data. or run. "
                    "(e.g. 'net.activation', 'init.name', 'run.lr')"
                )
            section, _, leaf = key.partition(".")
            if section == "run" and leaf not in Run.model_fields:
                raise unknown("run setting", leaf, Run.model_fields, f"sweep axis {key!r}")
        columns = [column_of(k) for k in axes]
        clash = {c for c in columns if columns.count(c) > 1 or c in RESERVED}
        if clash:
            raise ValueError(f"sweep axes give clashing column names {sorted(clash)}")
        return axes


class TomlSchema(GenerateJsonSchema):
    """A JSON schema for a TOML file: TOML has no null (a key that may be left out is just
    not required), and a title per field would only repeat its key."""

    def nullable_schema(self, schema: core_schema.NullableSchema) -> JsonSchemaValue:
        return self.generate_inner(schema["schema"])

    def default_schema(self, schema: core_schema.WithDefaultSchema) -> JsonSchemaValue:
        if schema.get("default", ...) is None:
            return self.generate_inner(schema["schema"])
        return super().default_schema(schema)

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False


def json_schema() -> dict[str, Any]:
    """The JSON schema of a study file (docs/study.schema.json is this, for editors).

    Example:
        >>> json_schema()["properties"]["run"]["$ref"]
        '#/$defs/Run'
    """
    schema = StudyFile.model_json_schema(schema_generator=TomlSchema)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}
