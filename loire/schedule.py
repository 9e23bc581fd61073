"""Lifelong growth schedules: which domain each stage trains on, how the model grows before it, and how long.

A `Schedule` is a start model (a `loire.config` preset plus `overrides`, with the tokenizer's
vocabulary size) and a sequence of `StageSpec`s, one per incoming domain. Before training stage t
the model is grown to the totals in `stage.grow` (keys among hidden, ffn, heads, layers, as in
`loire.grow.grow`); an empty `grow` trains the current model as it is. Schedules load from YAML /
dicts and are validated as a whole. Validation is by pydantic models (`_ScheduleDoc` for a mapping,
`_Stage` for a stage; unknown keys refused, bools are not ints, numeric strings only for the numbers
of a mapping), which also check the frozen dataclasses `StageSpec` and `Schedule` when they are built
directly: every error is a ValueError that names the field path
(`stages[2].grow.width: unknown dimension; allowed: hidden, ffn, heads, layers`), all of a mapping's
field errors in one line. The sizes are then simulated through the stages from the preset so no stage
shrinks a dimension. A target may also be relative to the model the stage starts from
(`hidden: x1.25`, `layers: +2`; `resolve_growth`), so a schedule fits an arbitrary imported base
model (`from-base` preset).

Reasoning behind the presets and defaults:

- **Order Hidden → FFN → MHA → Layer** (LOIRE slides, "Optimized multi-stage growth schedule"):
  "growing the layers and heads in later stages and having a larger hidden dimension in earlier
  stages can lead to better model performance"; θ1 ⇒ θ2 = φ_hidden ⇒ θ3 = φ_ffn ⇒ θ4 = φ_mha ⇒
  θ5 = φ_layer. Each preset therefore grows one dimension per stage, M2 hidden, M3 FFN, M4 heads,
  M5 layers, over the ELLE domain stream WB, NEWS, REV, BIO, CS.
- **Sizes M1..M5 are not given in the paper** (growth-methods.md §2.2). Assumption: ELLE's ladder
  (§3.1), which starts at 6 layers / 384 hidden / 6 heads / 1536 FFN and ends at GPT-2 small
  (12 / 768 / 12 / 3072) with head_dim 64 fixed. `gpt2-gpu` keeps those end points and reaches them
  in LOIRE's order; ELLE's update counts (62500, then 20000 per stage), its GPT warmup ratio 0.16,
  lr 5e-4 and its 5000-update recovery window (as the distillation window) are kept. `gpt-tiny`
  (and `bert-tiny`) are the same shape at CPU scale: 64 → 128 hidden, 256 → 512 FFN, 2 → 4 heads
  (head_dim 32), 2 → 4 layers, a few hundred steps of 16 × 64 tokens per stage.
- **β (per-teacher distillation weights, L_final = L_LM + Σ_{j≤t−1} β_j L_distill-j) is not given
  in the paper.** `beta=None` means uniform weights 1/(t−1) over the t−1 earlier stages' models
  (`loire.distill.DistillConfig.betas`, `loire.lifelong.teacher_betas`); an explicit `beta` lists one
  weight per earlier stage, oldest first.
- **Distillation window:** LOIRE's iterative distillation *warmup* is applied for the first
  `distill_steps` steps of a stage (the teachers are the models at the end of every earlier stage),
  after which the stage trains on L_LM alone. The first stage has no teacher, so its
  `distill_steps` must be 0. The presets use about a third of a stage (CPU) or ELLE's 5000 updates
  of function recovering warmup (GPU). `temperature` softens teacher and student distributions
  (1.0 = the slides' plain KL; ELLE used 2.0).
- `lambda_mode` is the plug-in layer mode given to the start config (`plugin_lambda_mode`):
  "scheduled" (λ ramped 1 → 0 by the trainer) or "learned".
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from loire.config import LAMBDA_MODES, PRESETS, LoireConfig, preset
from loire.domains import DOMAINS  # ELLE's domain stream, in order
from loire.flops import flops_per_step, head_of
from loire.grow import OPERATORS

logger = logging.getLogger(__name__)

_M = TypeVar("_M", bound=BaseModel)

DIMENSIONS: tuple[str, ...] = tuple(OPERATORS)  # hidden, ffn, heads, layers
_DIMS = ", ".join(DIMENSIONS)

# Stage fields written to a record only when set (records of schedules without them stay as they were).
_OPTIONAL_STAGE_FIELDS = {"plan": False, "flops_budget": None}
# Config fields a schedule sets itself, so `overrides` may not.
_RESERVED_OVERRIDES = {
    "vocab_size": "set tokenizer_vocab_size instead",
    "plugin_lambda_mode": "set lambda_mode instead",
    "plugin_layers": "growth-time state, set by the layer operator",
    "hidden_mask": "growth-time state, set by the hidden operator",
}


# ---------------------------------------------------------------------- validation
# pydantic models check each field alone (and the two rules within a stage); the checks that need the
# simulated sizes stay in `Schedule._simulate`. Every validator raises the project's own message, so a
# ValidationError becomes `<field path>: <message>` by prefixing the path (`_validated`).


def _fail(path: str, message: str) -> NoReturn:
    raise ValueError(f"{path}: {message}")


def _int(value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:  # bools are not counts
        raise ValueError(f"must be an int >= {minimum}, got {value!r}")
    return value


def _at_least(minimum: int) -> PlainValidator:
    return PlainValidator(lambda value: _int(value, minimum))


def _number(*, positive: bool) -> PlainValidator:
    """A finite float (> 0 or >= 0); numeric strings too where the context says `lenient` (PyYAML reads 1e-3 as one)."""
    bound = "> 0" if positive else ">= 0"

    def check(value: Any, info: ValidationInfo) -> float:
        if isinstance(value, str) and (info.context or {}).get("lenient"):
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"must be a number, got {value!r}") from None
        number = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if not number or not (value > 0 if positive else value >= 0):
            raise ValueError(f"must be a finite number {bound}, got {value!r}")
        return float(value)

    return PlainValidator(check)


def _one_of(what: str, allowed: Collection[str]) -> PlainValidator:
    def check(value: Any) -> str:
        if not isinstance(value, str) or value not in allowed:
            raise ValueError(f"unknown {what} {value!r}; allowed: {', '.join(allowed)}")
        return value

    return PlainValidator(check)


def _is_list(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str | bytes)


def _domain(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"must be a non-empty str, got {value!r}")
    return value


def _grow_mapping(value: Any) -> Any:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"must map a dimension ({_DIMS}) to its new total, got {value!r}")
    return dict(value)


def _dimension(key: Any) -> str:
    if key not in DIMENSIONS:
        raise ValueError(f"unknown dimension; allowed: {_DIMS}")
    return key


_RELATIVE = re.compile(r"^\s*([x*+])\s*(\d+(?:\.\d*)?)\s*$")


def _target(target: Any) -> int | str:
    """An absolute total (int >= 1) or a target relative to the model the stage starts from:
    a ratio "x1.25" (>= 1) or an increment "+2" (an int >= 0); relative ones normalised."""
    if not isinstance(target, str):
        return _int(target, 1)
    match = _RELATIVE.match(target)
    if match is None:
        raise ValueError(
            f"must be a new total (int >= 1), a ratio such as 'x1.25' or an increment such as '+2'; got {target!r}"
        )
    op, number = match.groups()
    if op == "+":
        if "." in number:
            raise ValueError(f"an increment must be a whole number, got {target!r}")
        return f"+{int(number)}"
    if float(number) < 1.0:
        raise ValueError(f"a ratio must be >= 1 (growth only adds), got {target!r}")
    return f"x{float(number):g}"


def _weights(value: Any) -> Any:
    if value is not None and not _is_list(value):
        raise ValueError(f"must be null (uniform) or a list of weights >= 0, got {value!r}")
    return value


def _plan(value: Any) -> bool:
    if not isinstance(value, bool):  # not 0 / 1 / "yes": a typo should not switch the planner on
        raise ValueError(f"must be true (the growth planner decides) or false, got {value!r}")
    return value


_Int0 = Annotated[int, _at_least(0)]
_Int1 = Annotated[int, _at_least(1)]
_Int2 = Annotated[int, _at_least(2)]
_Positive = Annotated[float, _number(positive=True)]
_NonNegative = Annotated[float, _number(positive=False)]
# Canonical order (hidden, ffn, heads, layers) whatever order the mapping gives.
_Grow = Annotated[
    dict[Annotated[str, PlainValidator(_dimension)], Annotated[int | str, PlainValidator(_target)]],
    BeforeValidator(_grow_mapping),
    AfterValidator(lambda grow: {key: grow[key] for key in DIMENSIONS if key in grow}),
]


class _Stage(BaseModel):
    """A stage's fields (`StageSpec`'s, in its order and with its defaults)."""

    model_config = ConfigDict(extra="forbid")

    domain: Annotated[str, PlainValidator(_domain)]
    grow: _Grow = Field(default_factory=dict)
    steps: _Int1
    warmup_steps: _Int0 = 0
    distill_steps: _Int0 = 0
    beta: Annotated[tuple[_NonNegative, ...] | None, BeforeValidator(_weights)] = None
    temperature: _Positive = 1.0
    lr: _Positive
    batch_size: _Int1
    block_size: _Int2
    max_train_tokens: _Int1 | None = None
    plan: Annotated[bool, PlainValidator(_plan)] = False
    flops_budget: _Positive | None = None

    @field_validator("warmup_steps", "distill_steps")
    @classmethod
    def _within_steps(cls, value: int, info: ValidationInfo) -> int:
        steps = info.data.get("steps")  # absent when steps itself failed
        if steps is not None and value > steps:
            raise ValueError(f"must be <= steps ({steps}), got {value}")
        return value

    @field_validator("plan")
    @classmethod
    def _plan_or_grow(cls, plan: bool, info: ValidationInfo) -> bool:
        if plan and info.data.get("grow"):
            raise ValueError("the growth planner decides the growth: leave grow empty or set plan: false")
        return plan


def _unknown_keys(keys: Sequence[Any], model: type[BaseModel]) -> str:
    return f"unknown key(s) {list(keys)}; allowed: {', '.join(model.model_fields)}"


def _path(root: str, loc: Sequence[int | str]) -> str:
    """`stages[2].grow.width` from pydantic's loc ("stages", 2, "grow", "width"), below `root`."""
    path = root
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else part
    return path or "schedule"


def _reason(error: ErrorDetails) -> str:
    if error["type"] == "missing":
        return "required"
    if error["type"] == "model_type":
        return f"must be a mapping, got {type(error['input']).__name__}"
    return error["msg"].removeprefix("Value error, ")  # our validators' own messages


def _message(exc: ValidationError, model: type[BaseModel], root: str) -> str:
    """One line: every error as `<field path>: <message>`, in pydantic's order; a mapping's unknown keys
    together, against the allowed keys of `model` (the top level) or of a stage (deeper)."""
    reasons: dict[str, str] = {}
    unknown: dict[str, list[Any]] = {}
    for error in exc.errors():
        loc = [part for part in error["loc"] if part != "[key]"]  # a dict key's error names the key itself
        if error["type"] == "extra_forbidden":
            *parent, key = loc
            path = _path(root, parent)
            unknown.setdefault(path, []).append(key)
            reasons[path] = _unknown_keys(unknown[path], _Stage if parent else model)
        else:
            reasons[_path(root, loc)] = _reason(error)
    return "; ".join(f"{path}: {reason}" for path, reason in reasons.items())


def _validated(model: type[_M], data: Any, root: str, *, lenient: bool = False) -> _M:
    """`data` validated by `model`; a ValidationError becomes a ValueError naming the fields below `root`."""
    try:
        return model.model_validate(data, context={"lenient": lenient})
    except ValidationError as exc:
        raise ValueError(_message(exc, model, root)) from None


def _validate_fields(instance: Any, model: type[BaseModel], root: str) -> None:
    """Check a frozen dataclass's fields with `model` and store them normalised (lr 1 -> 1.0, beta list -> tuple).
    A dataclass field the model lacks is refused as an unknown key, so the two cannot drift apart unnoticed."""
    values = {f.name: getattr(instance, f.name) for f in dataclasses.fields(instance) if f.init}
    valid = _validated(model, values, root)
    for name in values:
        object.__setattr__(instance, name, getattr(valid, name))


def resolve_growth(grow: Mapping[str, int | str], config: LoireConfig, path: str = "grow") -> dict[str, int]:
    """New totals for `config` from a stage's growth targets (absolute, or relative to `config`).

    A ratio is rounded up to an int, and for `hidden` up to a whole number of heads (a multiple of
    head_dim, the head-size constraint: hidden = heads x head_dim stays reachable, as GPT-2 and BERT
    checkpoints need); an increment of `hidden` that is not a multiple of head_dim is refused, naming the
    field. Raises ValueError for a target that would shrink its dimension.
    """
    out: dict[str, int] = {}
    for name, target in grow.items():
        config_field = OPERATORS[name][1]
        current = getattr(config, config_field)
        try:
            value = _target(target)
        except ValueError as err:
            raise ValueError(f"{path}.{name}: {err}") from None
        if isinstance(value, str) and value.startswith("+"):
            step = int(value[1:])
            if name == "hidden" and step % config.head_dim:
                _fail(
                    f"{path}.{name}",
                    f"{value} is not a multiple of head_dim ({config.head_dim}); hidden_size must stay a whole "
                    "number of heads",
                )
            value = current + step
        elif isinstance(value, str):
            unit = config.head_dim if name == "hidden" else 1
            value = unit * math.ceil(current * float(value[1:]) / unit - 1e-9)
        if value < current:
            _fail(f"{path}.{name}", f"{value} would shrink {config_field} from {current}; growth only adds")
        out[name] = value
    return out


@dataclass(frozen=True, kw_only=True)
class StageSpec:
    """One stage: grow the model to `grow`'s totals, then train `steps` steps on `domain`.

    - `grow`: new totals for dimensions among hidden, ffn, heads, layers (empty = no growth).
    - `steps`: optimizer steps; `warmup_steps`: linear learning-rate warmup at the stage start.
    - `distill_steps`: length of the iterative-distillation warmup window at the stage start,
      during which L_final = L_LM + Σ_j β_j L_distill-j against every earlier stage's model.
    - `beta`: one weight per earlier stage, oldest first; None = uniform 1/(t−1) (`loire.lifelong.teacher_betas`).
    - `temperature`: distillation temperature (1.0 = plain KL between the distributions).
    - `lr`, `batch_size` (sequences per step), `block_size` (tokens per sequence).
    - `max_train_tokens`: cap on the domain's training tokens (None = the whole corpus).
    - `plan`: the growth planner (`loire.planner`) decides this stage's growth from probes on the new
      domain (`grow` must then be empty); exact-growth strategies only.
    - `flops_budget`: train for this many FLOPs (planner probes included) instead of `steps`: the steps
      follow from the grown model's cost, so schedules that grow differently spend the same compute.
    """

    domain: str
    grow: dict[str, int | str] = field(default_factory=dict)
    steps: int
    warmup_steps: int = 0
    distill_steps: int = 0
    beta: tuple[float, ...] | None = None
    temperature: float = 1.0
    lr: float
    batch_size: int
    block_size: int
    max_train_tokens: int | None = None
    plan: bool = False
    flops_budget: float | None = None

    def __post_init__(self) -> None:
        _validate_fields(self, _Stage, "StageSpec")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], path: str = "stage") -> StageSpec:
        """A stage from a mapping (numbers may be numeric strings); errors name `path` ("stages[2]") and the field."""
        return cls(**_validated(_Stage, data, path, lenient=True).model_dump())

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (lists, dicts, numbers), ready for YAML or JSON."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["grow"] = dict(self.grow)
        out["beta"] = None if self.beta is None else list(self.beta)
        for name, default in _OPTIONAL_STAGE_FIELDS.items():
            if out[name] == default:
                del out[name]
        return out


def _stage_list(value: Any) -> Any:
    if not _is_list(value):
        raise ValueError("must be a list of stages")
    if not value:
        raise ValueError("must hold at least one stage")
    return value


def _stage_spec(value: Any) -> StageSpec:
    if not isinstance(value, StageSpec):
        raise ValueError(f"must be a StageSpec, got {type(value).__name__}")
    return value


def _overrides(value: Any) -> dict[str, Any]:
    if value is None:  # `overrides:` left empty in YAML
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"must map LoireConfig fields to values, got {value!r}")
    return dict(value)


def _defaults(value: Any) -> dict[str, Any]:
    """Stage fields only; their values are checked in each stage they fill."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"must be a mapping, got {type(value).__name__}")
    unknown = [key for key in value if key not in _Stage.model_fields]
    if unknown:
        raise ValueError(_unknown_keys(unknown, _Stage))
    return dict(value)


class _ScheduleFields(BaseModel):
    """`Schedule`'s fields (the stages as built `StageSpec`s); the sizes are checked by `Schedule._simulate`."""

    model_config = ConfigDict(extra="forbid")

    preset: Annotated[str, _one_of("preset", tuple(PRESETS))]
    stages: Annotated[tuple[Annotated[StageSpec, PlainValidator(_stage_spec)], ...], BeforeValidator(_stage_list)]
    seed: _Int0 = 0
    lambda_mode: Annotated[str, _one_of("mode", LAMBDA_MODES)] = "scheduled"
    tokenizer_vocab_size: _Int2 = 4096
    overrides: Annotated[dict[str, Any], PlainValidator(_overrides)] = Field(default_factory=dict)


class _ScheduleDoc(_ScheduleFields):
    """A schedule as a mapping (YAML): the stages as mappings, `defaults` filling the fields a stage leaves out."""

    stages: Annotated[list[_Stage], BeforeValidator(_stage_list)]  # type: ignore[assignment]
    defaults: Annotated[dict[str, Any], PlainValidator(_defaults)] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _fill_stages(cls, data: Any) -> Any:
        if not (
            isinstance(data, Mapping) and isinstance(data.get("defaults"), Mapping) and _is_list(data.get("stages"))
        ):
            return data  # nothing to fill; the fields' validators say what is wrong
        # unknown keys are reported once, at `defaults`, not again in every stage
        known = {key: value for key, value in data["defaults"].items() if key in _Stage.model_fields}
        stages = [{**known, **stage} if isinstance(stage, Mapping) else stage for stage in data["stages"]]
        return {**data, "stages": stages}


@dataclass(frozen=True)
class Schedule:
    """A start model and its growth stages; validated (with simulated sizes) on construction.

    The start config is `loire.config.preset(preset, **overrides)` with `vocab_size =
    tokenizer_vocab_size` and `plugin_lambda_mode = lambda_mode`; `seed` seeds training and growth.
    """

    preset: str
    stages: tuple[StageSpec, ...]
    seed: int = 0
    lambda_mode: str = "scheduled"
    tokenizer_vocab_size: int = 4096
    overrides: dict[str, Any] = field(default_factory=dict)
    _configs: tuple[LoireConfig, ...] = field(init=False, repr=False, compare=False, default=())

    def __post_init__(self) -> None:
        _validate_fields(self, _ScheduleFields, "")
        object.__setattr__(self, "_configs", self._simulate())

    def _initial(self) -> LoireConfig:
        known = set(preset(self.preset).to_dict())
        for key in self.overrides:
            if key in _RESERVED_OVERRIDES:
                _fail(f"overrides.{key}", f"not allowed here; {_RESERVED_OVERRIDES[key]}")
            if key not in known:
                _fail(f"overrides.{key}", "unknown LoireConfig field")
        try:
            return preset(
                self.preset,
                **self.overrides,
                vocab_size=self.tokenizer_vocab_size,
                plugin_lambda_mode=self.lambda_mode,
            )
        except ValueError as err:
            raise ValueError(f"overrides: {err}") from None

    def _simulate(self) -> tuple[LoireConfig, ...]:
        """Configs after each stage's growth; checks the cross-stage rules on the way."""
        config = self._initial()
        configs = []
        seen: dict[str, int] = {}
        for i, stage in enumerate(self.stages):
            path = f"stages[{i}]"
            if stage.domain in seen:
                _fail(f"{path}.domain", f"{stage.domain!r} is already trained at stages[{seen[stage.domain]}]")
            seen[stage.domain] = i
            if i == 0 and stage.distill_steps:
                _fail(f"{path}.distill_steps", "must be 0 at the first stage (no earlier model to distil from)")
            if stage.beta is not None and len(stage.beta) != i:
                _fail(f"{path}.beta", f"needs {i} weight(s), one per earlier stage; got {len(stage.beta)}")
            targets = resolve_growth(stage.grow, config, f"{path}.grow")
            changes = {OPERATORS[name][1]: target for name, target in targets.items()}
            try:
                config = config.replace(**changes)
            except ValueError as err:
                raise ValueError(f"{path}.grow: {err}") from None
            if stage.block_size > config.max_position_embeddings:
                _fail(
                    f"{path}.block_size",
                    f"{stage.block_size} exceeds max_position_embeddings ({config.max_position_embeddings})",
                )
            configs.append(config)
        return tuple(configs)

    # ------------------------------------------------------------------ sizes

    def initial_config(self) -> LoireConfig:
        """The start model's config (M1 before any growth)."""
        return self._initial()

    def config_at(self, stage_index: int) -> LoireConfig:
        """Config of the model trained at stage `stage_index` (0-based), i.e. after that stage's growth.

        Only the grown dimensions are simulated (the consolidated architecture); growth-time devices
        (plug-in layers, hidden mask) and the operators' norm-ε rescaling are not.
        """
        self._check_index(stage_index)
        return copy.deepcopy(self._configs[stage_index])

    def _check_index(self, stage_index: Any) -> None:
        if isinstance(stage_index, bool) or not isinstance(stage_index, int) or not 0 <= stage_index < len(self):
            raise ValueError(f"stage_index={stage_index!r} must be an int in [0, {len(self)})")

    def final_config(self) -> LoireConfig:
        """Config of the last stage's model."""
        return self.config_at(len(self) - 1)

    @property
    def domains(self) -> tuple[str, ...]:
        return tuple(stage.domain for stage in self.stages)

    def __len__(self) -> int:
        return len(self.stages)

    # ------------------------------------------------------------------ serialisation

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Schedule:
        """A schedule from a mapping (numbers may be numeric strings); an optional `defaults` mapping fills
        fields each stage leaves out."""
        doc = _validated(_ScheduleDoc, data, "", lenient=True)
        stages = tuple(StageSpec(**stage.model_dump()) for stage in doc.stages)
        return cls(**doc.model_dump(exclude={"stages", "defaults"}), stages=stages)

    @classmethod
    def from_yaml(cls, path_or_text: str | os.PathLike[str]) -> Schedule:
        """A schedule from a YAML file (a path) or YAML text."""
        if isinstance(path_or_text, os.PathLike):
            text = Path(path_or_text).read_text(encoding="utf-8")
        elif isinstance(path_or_text, str):
            is_file = "\n" not in path_or_text and len(path_or_text) < 4096 and Path(path_or_text).is_file()
            text = Path(path_or_text).read_text(encoding="utf-8") if is_file else path_or_text
        else:
            raise ValueError(f"from_yaml needs a path or YAML text, got {type(path_or_text).__name__}")
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ValueError(f"schedule: invalid YAML: {err}") from None
        if not isinstance(data, Mapping):
            raise ValueError(f"schedule: YAML must hold a mapping (or {path_or_text!r} is not a file)")
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        """Plain types only; `Schedule.from_dict(s.to_dict()) == s`."""
        return {
            "preset": self.preset,
            "seed": self.seed,
            "lambda_mode": self.lambda_mode,
            "tokenizer_vocab_size": self.tokenizer_vocab_size,
            "overrides": dict(self.overrides),
            "stages": [stage.to_dict() for stage in self.stages],
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------------- presets


def _ladder(
    preset_name: str,
    overrides: dict[str, Any],
    growth: Sequence[dict[str, int]],
    steps: Sequence[int],
    warmup: Sequence[int],
    distill: int,
    vocab: int,
    *,
    later_lr: float | None = None,
    beta_total: float | None = None,
    **stage: Any,
) -> Schedule:
    """Stage i > 0 continues with `later_lr` (default: the same lr) and teachers weighted
    β_j = beta_total / i (default None: uniform 1/i, i.e. a total weight of 1)."""
    stages = tuple(
        StageSpec(
            domain=domain,
            grow=dict(grow),
            steps=n,
            warmup_steps=w,
            distill_steps=min(distill, n) if i else 0,
            **{
                **stage,
                **({"lr": later_lr} if (i and later_lr) else {}),
                **({"beta": (beta_total / i,) * i} if (i and beta_total) else {}),
            },
        )
        for i, (domain, grow, n, w) in enumerate(zip(DOMAINS, growth, steps, warmup, strict=True))
    )
    return Schedule(preset=preset_name, stages=stages, tokenizer_vocab_size=vocab, overrides=overrides)


# M1 sizes (hidden, ffn, heads, layers); each later stage grows one dimension, in LOIRE's order.
_TINY_START = dict(
    hidden_size=64,
    intermediate_size=256,
    num_attention_heads=2,
    head_dim=32,
    num_hidden_layers=2,
    max_position_embeddings=128,
)
_TINY_GROWTH = ({}, {"hidden": 128}, {"ffn": 512}, {"heads": 4}, {"layers": 4})
_TINY_STAGE = dict(lr=2e-3, batch_size=16, block_size=64, max_train_tokens=262_144)

_GPU_START = dict(
    hidden_size=384,
    intermediate_size=1536,
    num_attention_heads=6,
    head_dim=64,
    num_hidden_layers=6,
    max_position_embeddings=1024,
)
_GPU_GROWTH = ({}, {"hidden": 768}, {"ffn": 3072}, {"heads": 12}, {"layers": 12})


def _tiny_ladder(
    preset_name: str, growth: Sequence[dict[str, Any]] = _TINY_GROWTH, factor: int = 1, max_train_tokens: int = 262_144
) -> Schedule:
    """gpt-tiny's ladder; `factor` scales its steps, warmup and distillation window."""
    return _ladder(
        preset_name,
        _TINY_START,
        growth,
        tuple(n * factor for n in (200, 150, 150, 150, 150)),
        tuple(w * factor for w in (20, 10, 10, 10, 10)),
        150 * factor,
        4096,
        later_lr=1e-3,
        beta_total=4.0,
        **{**_TINY_STAGE, "max_train_tokens": max_train_tokens},
    )


# From a base model (`loire lifelong --base`): the paper's order Hidden -> FFN -> MHA -> Layer as growth
# relative to whatever the base is (x1.25 the hidden size rounded up to whole heads, x1.25 the FFN, x1.25
# the heads rounded up, 2 more layers), then a last stage without growth; gpt-tiny's CPU training budget.
# The start config only serves validation: a base replaces it.
_FROM_BASE_GROWTH = ({"hidden": "x1.25"}, {"ffn": "x1.25"}, {"heads": "x1.25"}, {"layers": "+2"}, {})


_MICRO_START = dict(
    hidden_size=32,
    intermediate_size=128,
    num_attention_heads=2,
    head_dim=16,
    num_hidden_layers=1,
    max_position_embeddings=64,
)
_MICRO_GROWTH = ({}, {"hidden": 48}, {"ffn": 192}, {"heads": 3}, {"layers": 2})


def stage_flops(schedule: Schedule, index: int) -> float:
    """Training FLOPs of stage `index` (0-based) as the schedule sets it: its steps on the model after its
    growth, at the tokenizer's vocabulary size (teacher passes not included)."""
    spec = schedule.stages[index]
    if spec.flops_budget is not None:
        return spec.flops_budget
    config = schedule.config_at(index).replace(vocab_size=schedule.tokenizer_vocab_size)
    return spec.steps * flops_per_step(config, spec.batch_size, spec.block_size, head=head_of(config))


def flops_matched(reference: Schedule, growth: Sequence[Mapping[str, int]] | None) -> Schedule:
    """`reference` with another growth per stage (None: the growth planner decides every later stage), each
    stage given the FLOPs `reference` spends on it as its budget: schedules compared at the same compute."""
    stages = []
    for i, spec in enumerate(reference.stages):
        budget = stage_flops(reference, i)
        grow_i = {} if growth is None else dict(growth[i])
        planned = growth is None and i > 0
        stages.append(dataclasses.replace(spec, grow=grow_i, plan=planned, flops_budget=budget))
    return dataclasses.replace(reference, stages=tuple(stages))


# The paper's ladder in reverse: Layer -> MHA -> FFN -> Hidden (it reports hidden early, layers late is better).
_TINY_REVERSE = ({}, {"layers": 4}, {"heads": 4}, {"ffn": 512}, {"hidden": 128})

SCHEDULES: dict[str, Schedule] = {
    # CPU: 64/256/2/2 -> 128/512/4/4 (hidden/ffn/heads/layers), 200 + 4 x 150 steps of 16 x 64 tokens.
    # Later stages: lr 1e-3 and distillation over the whole stage with a total teacher weight of 4
    # (tuned on WB → NEWS: AP+ 534 with a 50-step window at weight 1, 157 with these settings).
    "gpt-tiny": _tiny_ladder("gpt-tiny"),
    # The `long` benchmark budget (bench/lifelong.py --budget long): 1000 + 4 x 750 steps.
    # 5x the steps, warmup and window, and a token budget of about one epoch of each domain instead of three
    # passes over 262k tokens (750 steps x 16 x 64 = 768k tokens).
    "gpt-tiny-long": _tiny_ladder("gpt-tiny", factor=5, max_train_tokens=1_048_576),
    "bert-tiny": _tiny_ladder("bert-tiny"),
    # CPU, seconds per stage: the same ladder at a quarter of the width, for `loire demo --quick` and tests.
    "gpt-micro": _ladder(
        "gpt-tiny",
        _MICRO_START,
        _MICRO_GROWTH,
        (60, 40, 40, 40, 40),
        (6, 4, 4, 4, 4),
        40,
        512,
        later_lr=1e-3,
        beta_total=4.0,
        lr=3e-3,
        batch_size=8,
        block_size=32,
        max_train_tokens=32_768,
    ),
    # GPU: ELLE's ladder end points 384/1536/6/6 -> GPT-2 small 768/3072/12/12, ELLE's update counts,
    # warmup ratio 0.16, lr 5e-4 and 5000-update recovery window; 32 x 512 tokens per step.
    "gpt2-gpu": _ladder(
        "gpt2",
        _GPU_START,
        _GPU_GROWTH,
        (62_500, 20_000, 20_000, 20_000, 20_000),
        (10_000, 3_200, 3_200, 3_200, 3_200),
        5_000,
        32_768,
        lr=5e-4,
        batch_size=32,
        block_size=512,
        max_train_tokens=None,
    ),
}
# Issue "where and when to grow": the planner and the reverse ladder, each stage at the ladder's FLOPs.
for _name in ("gpt-tiny", "gpt-tiny-long", "gpt-micro"):
    SCHEDULES[f"{_name}-planned"] = flops_matched(SCHEDULES[_name], None)
SCHEDULES["gpt-tiny-reverse"] = flops_matched(SCHEDULES["gpt-tiny"], _TINY_REVERSE)
SCHEDULES["gpt-tiny-long-reverse"] = flops_matched(SCHEDULES["gpt-tiny-long"], _TINY_REVERSE)


# Presets whose growth is relative to an imported base model (`loire lifelong --base`): every stage grows,
# the first one included, since the base is stage 0 (the absolute ladders above start with M1 instead).
BASE_SCHEDULES: dict[str, Schedule] = {
    # Any base model (GPT-2, BERT, Llama) grown in LOIRE's order by relative targets (see _FROM_BASE_GROWTH).
    "from-base": _tiny_ladder("gpt-tiny", _FROM_BASE_GROWTH),
}


def schedule_preset(name: str, domains: Sequence[str] | None = None) -> Schedule:
    """A preset schedule, optionally with its stages' domains renamed (same count, in order)."""
    presets = {**SCHEDULES, **BASE_SCHEDULES}
    if name not in presets:
        raise ValueError(f"unknown schedule preset {name!r}; allowed: {', '.join(presets)}")
    schedule = presets[name]
    if domains is None:
        return schedule
    if isinstance(domains, (str, bytes)) or not isinstance(domains, Sequence) or len(domains) != len(schedule):
        raise ValueError(f"domains={domains!r} must be a list of {len(schedule)} domain names (one per stage)")
    stages = tuple(dataclasses.replace(s, domain=d) for s, d in zip(schedule.stages, domains, strict=True))
    return dataclasses.replace(schedule, stages=stages)


__all__ = [
    "BASE_SCHEDULES",
    "DIMENSIONS",
    "DOMAINS",
    "SCHEDULES",
    "Schedule",
    "StageSpec",
    "resolve_growth",
    "schedule_preset",
]
