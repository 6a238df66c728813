"""Study files: load a TOML study, validate it whole before any work, expand its grid.

A study names its source, a net, an init, data, sweep axes (cartesian product), run settings
and the source's claims. Keys are dotted paths into the spec (``net.activation``,
``init.name``, ``run.steps``); the frame column of an axis is its last part (``activation``),
except ``init.name`` which is ``init``.

What a file may hold (keys, types, ranges) is :mod:`flowscope.study.spec_models`, also
published as a JSON schema (``flowscope study schema``); names are looked up in the
registries (nets, inits, data, probes) for every config of the grid.

Study files are data: they are parsed with ``tomllib`` (``tomli`` on Python 3.10) and never
executed.
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import itertools
import json
import re
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from flowscope.core.errors import FlowscopeError, unknown
from flowscope.core.limits import check_fits
from flowscope.study.spec_errors import parse
from flowscope.study.spec_models import EXPECTS as EXPECTS
from flowscope.study.spec_models import REDUCERS as REDUCERS
from flowscope.study.spec_models import STAT_COLUMNS as STAT_COLUMNS
from flowscope.study.spec_models import STAT_KINDS as STAT_KINDS
from flowscope.study.spec_models import Data, Init, Net, Run, StudyFile, column_of

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, from PyPI
    import tomli as tomllib


@dataclass(frozen=True)
class Config:
    """One run of a study: the axis values, the seed, and the fully resolved sections."""

    index: int
    axes: dict[str, Any]
    seed: int
    net: dict[str, Any]
    init: dict[str, Any]
    data: dict[str, Any]
    run: dict[str, Any]

    @property
    def id(self) -> str:
        """A readable, file-safe, unique id: ``003-activation=relu,init=he,seed=0``."""
        parts = ",".join(f"{k}={_short(v)}" for k, v in {**self.axes, "seed": self.seed}.items())
        return f"{self.index:03d}-{re.sub(r'[^A-Za-z0-9=,._+-]', '_', parts)}"

    def columns(self) -> dict[str, Any]:
        """The config columns added to every frame row of this run."""
        return {"config": self.id, **{k: _cell(v) for k, v in self.axes.items()}, "seed": self.seed}


@dataclass(frozen=True)
class Study:
    """A validated study spec."""

    name: str
    title: str
    description: str
    source: dict[str, str]
    net: dict[str, Any]
    init: dict[str, Any]
    data: dict[str, Any]
    sweep: dict[str, list[Any]]
    run: dict[str, Any]
    claims: list[dict[str, Any]]
    presets: dict[str, dict[str, str]] = field(default_factory=dict)
    path: str = ""

    @property
    def axis_columns(self) -> list[str]:
        return [column_of(key) for key in self.sweep]

    def to_dict(self) -> dict[str, Any]:
        """The resolved spec, as written to spec.json."""
        return {
            "name": self.name,
            "title": self.title,
            "description": self.description,
            "source": self.source,
            "net": self.net,
            "init": self.init,
            "data": self.data,
            "sweep": self.sweep,
            "run": self.run,
            "claims": self.claims,
            "presets": self.presets,
        }

    def fingerprint(self) -> str:
        """Hash of everything that determines the measurements (not titles or claims)."""
        core = {k: self.to_dict()[k] for k in ("net", "init", "data", "sweep", "run", "presets")}
        return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()[:16]

    def configs(self) -> list[Config]:
        """The cartesian product of the sweep axes, times the seeds."""
        keys = list(self.sweep)
        out: list[Config] = []
        for values in itertools.product(*(self.sweep[k] for k in keys)):
            for seed in self.run["seeds"]:
                sections = {s: copy.deepcopy(getattr(self, s)) for s in ("net", "init", "data")}
                sections["run"] = copy.deepcopy(self.run)
                for key, value in zip(keys, values, strict=True):
                    section, _, leaf = key.partition(".")
                    sections[section][leaf] = value
                axes = {column_of(k): v for k, v in zip(keys, values, strict=True)}
                out.append(Config(index=len(out), axes=axes, seed=int(seed), **sections))
        return out


def _short(value: Any) -> str:
    return json.dumps(value) if isinstance(value, list | dict) else str(value)


def _cell(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, list | dict) else value


# -- finding and loading ------------------------------------------------------------------------


def builtin_dir() -> Path:
    """Where the built-in study files are: inside the wheel, or ``studies/`` in a checkout."""
    packaged = Path(str(resources.files("flowscope"))) / "studies"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "studies"


def builtin_names() -> list[str]:
    return sorted(p.stem for p in builtin_dir().glob("*.toml"))


def find(name_or_path: str) -> Path:
    """A built-in study by name, or a user's TOML file by path."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.suffix == ".toml":
        raise FlowscopeError(f"study file {name_or_path!r} does not exist")
    candidate = builtin_dir() / f"{name_or_path}.toml"
    if candidate.is_file():  # a built-in name, even next to a run folder of that name
        return candidate
    if path.is_dir():
        raise FlowscopeError(f"study file {name_or_path!r} is a directory, not a TOML file")
    raise unknown("study", name_or_path, builtin_names())


def read(name_or_path: str) -> dict[str, Any]:
    """The parsed TOML table of a study file, not validated (a built-in name or a path)."""
    path = find(name_or_path)
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise FlowscopeError(f"{path}: not valid TOML: {err}") from err
    except OSError as err:
        raise FlowscopeError(f"cannot read study file {str(path)!r}: {err.strerror}") from err


def load(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> Study:
    """Read, override (``key=value`` with TOML values) and validate a study.

    Example:
        >>> study = load("init-scales", ["run.seeds=[0, 1]"])
        >>> len(study.configs())
        32

    Raises:
        FlowscopeError: unreadable TOML, unknown keys or names (with did-you-mean), values
            out of range — naming the file and the key.
    """
    path = str(find(name_or_path))
    raw = read(path)
    for item in overrides:
        apply_override(raw, item)
    return validate(raw, path)


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set ``a.b=value`` in the raw spec; the value is parsed as TOML, else taken as a string."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise FlowscopeError(f"--set needs key=value (e.g. run.steps=10), got {item!r}")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    node = raw
    *parents, leaf = key.split(".")
    if parents and parents[0] == "sweep":  # sweep axes are dotted keys themselves
        parents, leaf = ["sweep"], key.partition(".")[2]
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise FlowscopeError(f"--set {key}: {part!r} is not a table")
    node[leaf] = value


# -- validation ---------------------------------------------------------------------------------


def validate(raw: dict[str, Any], where: str = "<study>") -> Study:
    """A :class:`Study` from a parsed TOML table, or the first problem found, clearly.

    The file's shape is checked by :class:`~flowscope.study.spec_models.StudyFile` (keys,
    types, ranges, claims), then every config of the grid by :func:`check_config`.

    Example:
        >>> validate({"name": "x"}, "x.toml")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        flowscope.core.errors.FlowscopeError: x.toml: missing required key 'source' (the ...)
    """
    file = parse(StudyFile, raw, where)
    study = Study(
        name=file.name,
        title=file.name if file.title is None else file.title,
        description=file.description,
        source=_as_written(file.source, raw["source"]),
        net=_as_written(file.net, raw["net"]),
        init=_as_written(file.init, raw["init"]),
        data=_as_written(file.data, raw["data"]),
        sweep=file.sweep,
        run=file.run.model_dump(),  # every setting, defaults included
        claims=[
            {**_as_written(claim, written), "where": claim.where}
            for claim, written in zip(file.claim, raw.get("claim", []), strict=True)
        ],
        presets=file.presets,
        path=where,
    )
    configs = study.configs()
    for config in configs:
        check_config(study, config, f"{where}, config {config.index + 1} of {len(configs)}")
    columns = {*study.axis_columns, "seed"}
    seen: dict[str, int] = {}
    for i, claim in enumerate(study.claims):
        if claim["id"] in seen:
            raise FlowscopeError(
                f"{where}: claims {seen[claim['id']] + 1} and {i + 1} share the id"
                f" {claim['id']!r}; every claim needs its own"
            )
        seen[claim["id"]] = i
        for column in claim["where"]:
            if column not in columns:
                place = f"{where}, claim {i + 1} ({claim['id']})"
                raise unknown("claim 'where' column", column, columns, place)
    return study


def _as_written(table: BaseModel, raw: dict[str, Any]) -> dict[str, Any]:
    """The keys a table sets, in the order the file wrote them."""
    values = table.model_dump(exclude_unset=True)
    return {key: values[key] for key in raw if key in values} | values


def check_config(study: Study, config: Config, where: str) -> None:
    """One expanded config checked whole: its sections by the models (a sweep sets their
    values per config), then every name and argument against the registries; nets are built
    on the meta device, so nothing is allocated."""
    from flowscope.models.inits import INITS
    from flowscope.models.nets import NETS
    from flowscope.study.data import DATA

    for section, model in (("net", Net), ("init", Init), ("data", Data), ("run", Run)):
        parse(model, getattr(config, section), where, (section,))  # sweeps set these per config
    net = dict(config.net)
    name = net.pop("name")
    _try_build(NETS.check_args(name, net, where), net, "meta", where, config.run["dtype"])
    data = dict(config.data)
    _try_build(DATA.check_args(data.pop("name"), data, where), data, "cpu", where)
    init = dict(config.init)
    scheme = init.pop("name")
    for glob, layer_scheme in init.pop("overrides", {}).items():
        INITS.get(layer_scheme, f"{where}, init.overrides entry {glob!r}")
    if scheme in study.presets:
        for glob, layer_scheme in study.presets[scheme].items():
            INITS.get(layer_scheme, f"{where}, preset {scheme!r} entry {glob!r}")
        if init:
            raise FlowscopeError(f"{where}: init preset {scheme!r} takes no parameters: {init}")
    else:
        if scheme not in INITS:
            allowed = [*INITS.names(), *study.presets]
            raise unknown("init", scheme, allowed, where)
        try:
            INITS.get(scheme).resolve(init)
        except FlowscopeError as err:
            raise FlowscopeError(f"{where}: {err}") from None


_BUILT: set[str] = set()
_ITEMSIZE = {"float32": 4, "float64": 8, "bfloat16": 2}


def _try_build(
    factory: Any, kwargs: dict[str, Any], device: str, where: str, dtype: str = "float32"
) -> None:
    """Build once to check the values: nets on the meta device (free; their parameters
    must fit in this machine's memory), data on the CPU."""
    import torch

    name = getattr(factory, "__name__", "")
    label = f"{'net' if device == 'meta' else 'data'} {name!r} with {_args(kwargs)}"
    key = json.dumps([name, kwargs, device, dtype], sort_keys=True)
    if key in _BUILT:
        return
    try:
        if device == "meta":
            with torch.device("meta"):
                net = factory(**kwargs)
            size = sum(p.numel() for p in net.parameters())
            check_fits(f"{label}: its parameters", size, _ITEMSIZE.get(dtype, 4), dtype)
        else:
            factory(**kwargs, device=torch.device("cpu"))
    except FlowscopeError as err:
        raise FlowscopeError(f"{where}: {err}") from None
    except (RuntimeError, OverflowError, MemoryError) as err:  # torch's size checks
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise FlowscopeError(
            f"{where}: {label} cannot be built: {type(err).__name__}: {first}"
        ) from None
    _BUILT.add(key)


def _args(kwargs: dict[str, Any]) -> str:
    """``width=8, depth=2``: arguments as the message shows them."""
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "no arguments"


def matches(glob: str | None, name: str) -> bool:
    """Layer selection in claims and presets: a glob on the qualified name (None = all)."""
    return glob is None or fnmatch.fnmatchcase(name, glob)
