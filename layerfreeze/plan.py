"""Layer plans: which training policy each decoder layer (and each non-layer part) gets.

Pure logic on layer counts: no torch, no model (policy options are validated through the
registry, which the first parse imports lazily). Three ways to write a plan:

* dict / YAML (primary)::

      default: freeze                 # layers no rule covers (freeze unless said otherwise)
      embeddings: full                # token (+ position) embeddings: freeze | full
      final_norm: freeze
      lm_head: {policy: full, lr_scale: 0.5}
      rules:
        - {layers: "0-7", policy: full}
        - {layers: "75%-100%", policy: lora, r: 16, target: mlp, gated: true}

* compact string (command line): ``0-7:full,8-31:freeze``, ``0%-25%:lora(r=16,target=mlp,gated)``,
  ``-4:-1:prefix(tokens=16,gated)``, plus ``default:``/``embeddings:``/``final_norm:``/``lm_head:``
  entries;
* a preset: ``LayerPlan.from_preset("hlpt", r=8)``, or the strings ``hlpt`` / ``freeze_deep(fraction=0.25)``,
  or the dict ``{preset: freeze_deep, preset_args: {fraction: 0.25}}``.

Ranges: ``a-b`` / ``a:b`` are inclusive 0-based global layer indices, negative ones count from
the end (``-1`` is the last layer), ``all`` is every layer. Percent endpoints are *boundaries*
between layers: ``p%`` is boundary ``floor(p/100 * N + 1/2)`` (round half up, computed exactly),
so ``0%-25%`` covers layers ``[0, b(25%))`` and ``25%-100%`` covers the rest without overlap.

Length: over the ~700-line guide because the presets' option dataclasses (one documented field
per option, read by ``validate`` / ``--help``) live next to the grammar they build on; moving
them out is a candidate split (``plan_presets.py``) that would change no behaviour.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from layerfreeze.errors import ConfigError
from layerfreeze.policies.base import PolicySpec
from layerfreeze.utils.schema import from_dict, parse_override_value, suggest, to_dict

__all__ = [
    "LayerRange",
    "LayerRule",
    "LayerPlan",
    "ResolvedPlan",
    "PRESETS",
    "NON_LAYER_PARTS",
    "boundary",
    "parse_policy_spec",
    "PLAN_FILE_SUFFIXES",
    "is_plan_file",
    "read_plan_file",
]

#: A plan string with one of these suffixes names a plan file (YAML or JSON).
PLAN_FILE_SUFFIXES: tuple[str, ...] = (".yaml", ".yml", ".json")

#: Non-layer parts a plan gives an explicit policy (``freeze`` or ``full``).
NON_LAYER_PARTS: tuple[str, ...] = ("embeddings", "final_norm", "lm_head")
_NON_LAYER_POLICIES = ("freeze", "full")
#: Policies only a non-layer part may use, with the parts that accept them.
_PART_ONLY_POLICIES: dict[str, tuple[str, ...]] = {"new_rows": ("embeddings", "lm_head")}


def _part_policies(key: str) -> tuple[str, ...] | None:
    """Policies the plan key accepts (None: any layer policy)."""
    if key == "default":
        return None
    return _NON_LAYER_POLICIES + tuple(n for n, ps in _PART_ONLY_POLICIES.items() if key in ps)
_PLAN_KEYS = ("name", "default", *NON_LAYER_PARTS, "rules", "preset", "preset_args")

_ENDPOINT = r"-?\d+(?:\.\d+)?%?"
_RANGE = re.compile(rf"^\s*({_ENDPOINT})\s*(?:[-:]\s*({_ENDPOINT}))?\s*$")
_POLICY = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:\((.*)\))?\s*$", re.DOTALL)


def boundary(fraction: Fraction, num_layers: int) -> int:
    """Layer boundary of ``fraction`` for ``num_layers``: ``floor(fraction * N + 1/2)``.

    Round half up, computed in exact rational arithmetic (no float surprises): with N = 6,
    ``25%`` is ``floor(1.5 + 0.5) = 2``; with N = 32, ``37.5%`` is exactly 12.
    """
    return math.floor(Fraction(fraction) * num_layers + Fraction(1, 2))


def _fmt_percent(frac: Fraction) -> str:
    pct = frac * 100
    if pct.denominator == 1:
        return f"{pct.numerator}%"
    # Endpoints come from decimal text or str(float), so the percent is a finite decimal.
    for digits in range(1, 30):
        scaled = pct * 10**digits
        if scaled.denominator == 1:
            s = f"{scaled.numerator:0{digits + 1}d}"
            return f"{s[:-digits]}.{s[-digits:]}%"
    raise ValueError(f"percent {float(pct)} has no finite decimal form")


def _split_depth0(text: str, sep: str) -> list[str]:
    """Split at ``sep`` outside (), [] and quotes."""
    parts, depth, quote, cur = [], 0, "", []
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur))
    return parts


def _rsplit_depth0(text: str, sep: str) -> tuple[str, str] | None:
    depth = 0
    for i in range(len(text) - 1, -1, -1):
        ch = text[i]
        if ch in ")]}":
            depth += 1
        elif ch in "([{":
            depth -= 1
        elif ch == sep and depth == 0:
            return text[:i], text[i + 1:]
    if sep in text:  # unbalanced brackets: split plainly so the policy part reports the error
        head, tail = text.rsplit(sep, 1) if depth == 0 else text.split(sep, 1)
        return head, tail
    return None


# --------------------------------------------------------------------------- ranges


@dataclass(frozen=True)
class LayerRange:
    """An inclusive range of layers; ints are layer indices, Fractions are boundaries.

    Attributes:
        start: first layer (int, negative from the end) or a boundary fraction in [0, 1].
        end: last layer (int, inclusive) or a boundary fraction (exclusive).
    """

    start: int | Fraction
    end: int | Fraction

    @classmethod
    def parse(cls, text: str | int) -> LayerRange:
        """Parse ``3``, ``0-7``, ``-4:-1``, ``0%-25%``, ``50%-100%`` or ``all``.

        Raises:
            ValueError: malformed text; the message shows the accepted forms.
        """
        if isinstance(text, bool):
            raise ValueError(f"expected a layer range, got {text!r}")
        if isinstance(text, int):
            return cls(text, text)
        if not isinstance(text, str):
            raise ValueError(f"expected a layer range string, got {text!r}")
        if text.strip().lower() in ("all", "*"):
            return cls(Fraction(0), Fraction(1))
        m = _RANGE.match(text)
        hint = "Use e.g. '3', '0-7', '-4:-1', '0%-25%' or 'all'"
        if not m:
            raise ValueError(f"malformed layer range {text!r}. {hint}")
        a, b = m.group(1), m.group(2)
        if b is None:
            if a.endswith("%"):
                raise ValueError(f"a single percent {text!r} is not a range. {hint}")
            b = a
        ends: list[int | Fraction] = []
        for e in (a, b):
            if e.endswith("%"):
                if e.startswith("-"):
                    raise ValueError(f"negative percent in {text!r}. {hint}")
                frac = Fraction(e[:-1]) / 100
                if frac > 1:
                    raise ValueError(f"percent above 100% in {text!r}. {hint}")
                ends.append(frac)
            elif "." in e:
                raise ValueError(f"layer index {e!r} in {text!r} must be an integer. {hint}")
            else:
                ends.append(int(e))
        start, end = ends
        if isinstance(start, Fraction) and isinstance(end, Fraction) and start > end:
            raise ValueError(f"range {text!r} starts after it ends. {hint}")
        if isinstance(start, int) and isinstance(end, int) and (start >= 0) == (end >= 0) and start > end:
            raise ValueError(f"range {text!r} starts after it ends. {hint}")
        return cls(start, end)

    def __str__(self) -> str:
        if isinstance(self.start, int) and isinstance(self.end, int) and self.start == self.end:
            return str(self.start)
        if self.start == Fraction(0) and self.end == Fraction(1) and isinstance(self.start, Fraction):
            return "all"
        texts = [_fmt_percent(e) if isinstance(e, Fraction) else str(e) for e in (self.start, self.end)]
        negative = any(isinstance(e, int) and e < 0 for e in (self.start, self.end))
        return f"{texts[0]}{':' if negative else '-'}{texts[1]}"

    def indices(self, num_layers: int) -> tuple[range, list[str]]:
        """Covered layer indices for ``num_layers`` and the problems found (empty when fine)."""
        n = num_layers
        problems = []
        bounds = []
        for e, is_end in ((self.start, False), (self.end, True)):
            if isinstance(e, Fraction):
                b = boundary(e, n)
                bounds.append(b - 1 if is_end else b)
            else:
                if not -n <= e < n:
                    problems.append(
                        f"layer {e} is out of range for a {n}-layer model "
                        f"(valid 0-{n - 1}, or -{n} to -1 counting from the end)"
                    )
                    e = min(max(e, -n), n - 1)  # clipped, so overlaps are still reported
                bounds.append(e + n if e < 0 else e)
        start, end = bounds
        if problems:
            problems = list(dict.fromkeys(problems))  # a single index is both ends
            return range(start, max(start, end + 1)), problems
        if end < start and not (isinstance(self.start, Fraction) or isinstance(self.end, Fraction)):
            problems.append(f"covers no layers for a {n}-layer model (first {start} after last {end})")
            return range(0), problems
        return range(start, max(start, end + 1)), problems


# --------------------------------------------------------------------------- policies


def _policy_options(name: str, options: Mapping[str, Any], path: str, problems: list[str],
                    allowed: tuple[str, ...] | None = None) -> PolicySpec | None:
    from layerfreeze.registry import get_policy, registered_names

    if allowed is None and name in _PART_ONLY_POLICIES:
        parts = " / ".join(_PART_ONLY_POLICIES[name])
        problems.append(
            f"{path}: policy {name!r} applies to the {parts} parts only, not to layers. Write "
            f"e.g. embeddings: {name}(from_id=32000)."
        )
        return None
    if allowed is not None and name not in allowed:
        problems.append(
            f"{path}: policy must be one of {', '.join(allowed)} for this part, got {name!r}."
        )
        return None
    try:
        policy = get_policy(name)
    except ValueError:
        names = registered_names()
        close = suggest(name, names)
        hint = close if "Did you mean" in close else ""
        problems.append(
            f"{path}: unknown policy {name!r}.{hint} Registered policies: {', '.join(names)}."
        )
        return None
    try:
        opts = from_dict(policy.config_cls, dict(options), path=path)
    except ConfigError as e:
        problems.extend(e.problems)
        return None
    return PolicySpec(name, opts)


def parse_policy_spec(value: Any, path: str, problems: list[str],
                      allowed: tuple[str, ...] | None = None) -> PolicySpec | None:
    """Parse ``lora``, ``lora(r=16,gated)``, ``{policy: lora, r: 16}`` or a PolicySpec.

    Appends every problem (prefixed with ``path``) to ``problems`` and returns None then.
    """
    if isinstance(value, PolicySpec):
        value = {"policy": value.name, **(to_dict(value.options) if value.options else {})}
    if isinstance(value, Mapping):
        opts = dict(value)
        name = opts.pop("policy", None)
        if not isinstance(name, str):
            problems.append(f"{path}.policy: required policy name is missing or not a string, got {name!r}.")
            return None
        return _policy_options(name, opts, path, problems, allowed)
    if not isinstance(value, str):
        problems.append(f"{path}: expected a policy like 'full' or 'lora(r=16)', got {value!r}.")
        return None
    m = _POLICY.match(value)
    if not m:
        problems.append(
            f"{path}: malformed policy {value!r}. Write name or name(key=value,flag), e.g. "
            "'lora(r=16,target=mlp,gated)'."
        )
        return None
    name, arg_text = m.group(1), m.group(2)
    opts: dict[str, Any] = {}
    if arg_text and arg_text.strip():
        for item in _split_depth0(arg_text, ","):
            item = item.strip()
            if not item:
                problems.append(f"{path}: empty option in {value!r}.")
                continue
            if "=" in item:
                k, v = item.split("=", 1)
                opts[k.strip()] = parse_override_value(v.strip())
            else:
                opts[item] = True
    return _policy_options(name, opts, path, problems, allowed)


def _spec_value(spec: PolicySpec) -> str | dict:
    """``name`` when all options are defaults, else ``{policy: name, **options}``."""
    opts = to_dict(spec.options) if spec.options is not None else {}
    default = to_dict(type(spec.options)()) if spec.options is not None and _has_defaults(spec) else None
    if not opts or opts == default:
        return spec.name
    return {"policy": spec.name, **opts}


def _has_defaults(spec: PolicySpec) -> bool:
    try:
        type(spec.options)()
    except TypeError:
        return False
    return True


def _freeze() -> PolicySpec:
    problems: list[str] = []
    spec = parse_policy_spec("freeze", "freeze", problems)
    assert spec is not None, problems
    return spec


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class LayerRule:
    """One ``layers -> policy`` entry.

    Attributes:
        layers: the covered range.
        spec: the policy with validated options.
        source: where the rule came from, for error messages (``plan.rules[1] ('0-7')``).
    """

    layers: LayerRange
    spec: PolicySpec
    source: str = field(default="", compare=False)

    def __str__(self) -> str:
        return f"{self.layers}:{self.spec.describe()}"


@dataclass(frozen=True)
class ResolvedPlan:
    """A plan resolved against a layer count: one PolicySpec per layer.

    Attributes:
        num_layers: number of decoder layers.
        layers: policy of each layer, by 0-based global index.
        sources: which rule (or ``default``) gave each layer its policy (not compared).
        embeddings: policy of the embeddings (``freeze`` / ``full``).
        final_norm: policy of the final norm.
        lm_head: policy of the LM head.
    """

    num_layers: int
    layers: tuple[PolicySpec, ...]
    sources: tuple[str, ...] = field(compare=False)
    embeddings: PolicySpec
    final_norm: PolicySpec
    lm_head: PolicySpec

    def non_layer(self, part: str) -> PolicySpec:
        """The policy of ``embeddings`` / ``final_norm`` / ``lm_head``."""
        return getattr(self, part)

    def runs(self) -> list[tuple[int, int, PolicySpec]]:
        """Consecutive layers with the same policy: ``(first, last, spec)`` (inclusive)."""
        out: list[tuple[int, int, PolicySpec]] = []
        for i, spec in enumerate(self.layers):
            if out and out[-1][2] == spec and out[-1][1] == i - 1:
                out[-1] = (out[-1][0], i, spec)
            else:
                out.append((i, i, spec))
        return out

    def table(self) -> str:
        """A compact allocation table (one line per run of equal layers, then non-layer parts)."""
        lines = [f"{'layers':>10}  policy"]
        for a, b, spec in self.runs():
            lines.append(f"{(str(a) if a == b else f'{a}-{b}'):>10}  {spec.describe()}")
        for part in NON_LAYER_PARTS:
            lines.append(f"{part:>10}  {getattr(self, part).describe()}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-ready form: ``{num_layers, layers: [{index, policy, options}], embeddings, ...}``."""
        return {
            "num_layers": self.num_layers,
            "layers": [
                {"index": i, "policy": s.name, "options": to_dict(s.options) if s.options else {}}
                for i, s in enumerate(self.layers)
            ],
            **{part: _spec_value(getattr(self, part)) for part in NON_LAYER_PARTS},
        }


@dataclass(frozen=True)
class LayerPlan:
    """A declarative layer plan (see the module docstring for the forms it is written in).

    Attributes:
        rules: ``layers -> policy`` entries (disjoint once resolved).
        default: policy of layers no rule covers (``freeze`` unless declared).
        embeddings: policy of the embeddings (``freeze`` / ``full``).
        final_norm: policy of the final norm.
        lm_head: policy of the LM head (tied heads follow ``embeddings``).
        name: informative label (the preset name), not compared.
    """

    rules: tuple[LayerRule, ...] = ()
    default: PolicySpec = field(default_factory=_freeze)
    embeddings: PolicySpec = field(default_factory=_freeze)
    final_norm: PolicySpec = field(default_factory=_freeze)
    lm_head: PolicySpec = field(default_factory=_freeze)
    name: str | None = field(default=None, compare=False)

    # ------------------------------------------------------------------ parsing
    @classmethod
    def parse(cls, spec: str | Mapping[str, Any] | LayerPlan, path: str = "plan") -> LayerPlan:
        """Build a plan from a dict, a compact string, a preset name or a LayerPlan.

        Args:
            spec: the plan in any of its forms.
            path: config path used in error messages (``policy.plan``).

        Raises:
            ConfigError: every problem at once (syntax, unknown policy or option).
        """
        if isinstance(spec, LayerPlan):
            return spec
        if isinstance(spec, str):
            return cls._parse_str(spec, path)
        if isinstance(spec, Mapping):
            return cls._parse_dict(spec, path)
        raise ConfigError(
            f"{path}: expected a plan (mapping, compact string or preset name), got {spec!r}. "
            "Write e.g. '0-7:full,8-31:freeze' or {rules: [{layers: '0-7', policy: full}]}."
        )

    @classmethod
    def _parse_dict(cls, data: Mapping[str, Any], path: str) -> LayerPlan:
        problems: list[str] = []
        for key in data:
            if key not in _PLAN_KEYS:
                problems.append(f"{path}.{key}: unknown key.{suggest(str(key), _PLAN_KEYS)}")
        if "preset" in data:
            if "rules" in data:
                problems.append(
                    f"{path}: 'preset' and 'rules' are exclusive, got both. Write the rules out "
                    "or use the preset with its preset_args."
                )
            if problems:
                raise ConfigError(problems)
            args = data.get("preset_args") or {}
            if not isinstance(args, Mapping):
                raise ConfigError(f"{path}.preset_args: expected a mapping, got {args!r}.")
            base = cls.from_preset(data["preset"], path=f"{path}.preset", **args)
            overrides: dict[str, PolicySpec] = {}
            for key in ("default", *NON_LAYER_PARTS):
                if key in data:
                    allowed = _part_policies(key)
                    s = parse_policy_spec(data[key], f"{path}.{key}", problems, allowed)
                    if s is not None:
                        overrides[key] = s
            if problems:
                raise ConfigError(problems)
            return dataclasses.replace(base, **overrides)
        if "preset_args" in data:
            problems.append(f"{path}.preset_args: given without 'preset'. Add preset: <name>.")
        kwargs: dict[str, Any] = {}
        for key in ("default", *NON_LAYER_PARTS):
            if key in data:
                allowed = _part_policies(key)
                s = parse_policy_spec(data[key], f"{path}.{key}", problems, allowed)
                if s is not None:
                    kwargs[key] = s
        raw_rules = data.get("rules", [])
        if raw_rules is None:
            raw_rules = []
        if isinstance(raw_rules, (str, Mapping)) or not isinstance(raw_rules, (list, tuple)):
            problems.append(f"{path}.rules: expected a list of rules, got {raw_rules!r}.")
            raw_rules = []
        rules = []
        for i, raw in enumerate(raw_rules):
            rpath = f"{path}.rules[{i}]"
            if not isinstance(raw, Mapping):
                problems.append(
                    f"{rpath}: expected a mapping like {{layers: '0-7', policy: full}}, got {raw!r}."
                )
                continue
            raw = dict(raw)
            if "layers" not in raw:
                problems.append(f"{rpath}.layers: required key is missing. Write e.g. layers: '0-7'.")
                continue
            layers_raw = raw.pop("layers")
            try:
                rng = LayerRange.parse(layers_raw)
            except ValueError as e:
                problems.append(f"{rpath}.layers: {e}.")
                rng = None
            s = parse_policy_spec(raw, rpath, problems)
            if rng is not None and s is not None:
                rules.append(LayerRule(rng, s, source=f"{rpath} ({layers_raw!r})"))
        name = data.get("name")
        if name is not None and not isinstance(name, str):
            problems.append(f"{path}.name: expected a string, got {name!r}.")
        if problems:
            raise ConfigError(problems)
        return cls(rules=tuple(rules), name=name, **kwargs)

    @classmethod
    def _parse_str(cls, text: str, path: str) -> LayerPlan:
        stripped = text.strip()
        m = _POLICY.match(stripped)
        if m and m.group(1) in PRESETS and ":" not in stripped.split("(")[0]:
            args: dict[str, Any] = {}
            problems: list[str] = []
            if m.group(2) and m.group(2).strip():
                for item in _split_depth0(m.group(2), ","):
                    if "=" not in item:
                        problems.append(f"{path}: preset argument {item.strip()!r} needs key=value.")
                        continue
                    k, v = item.split("=", 1)
                    args[k.strip()] = parse_override_value(v.strip())
            if problems:
                raise ConfigError(problems)
            return cls.from_preset(m.group(1), path=path, **args)
        problems = []
        kwargs: dict[str, Any] = {}
        rules = []
        entries = [e.strip() for e in _split_depth0(stripped, ",")]
        if not stripped:
            raise ConfigError(f"{path}: empty plan. Write e.g. '0-7:full,8-31:freeze' or a preset name.")
        for i, entry in enumerate(entries):
            epath = f"{path}[{i}]"
            first_problem = len(problems)
            split = _rsplit_depth0(entry, ":")
            if not entry or split is None:
                hint = suggest(entry, PRESETS) if entry else ""
                hint = hint if "Did you mean" in hint else ""
                m = _POLICY.match(entry)
                if len(entries) == 1 and m:  # a bare name: meant as a preset
                    problems.append(
                        f"{path}: unknown preset {m.group(1)!r}; presets are "
                        f"{', '.join(PRESETS)}.{hint} (A plan string is '<layers>:<policy>', "
                        "e.g. '0-7:full,8-31:freeze'.)"
                    )
                    continue
                looks_like_file = len(entries) == 1 and ("/" in entry or "." in entry)
                problems.append(
                    f"{epath}: expected '<layers>:<policy>' (e.g. '0-7:full') or a preset name "
                    f"({', '.join(PRESETS)}).{hint}"
                    + (
                        f" A plan file is read when its name ends in .yaml, .yml or .json, got "
                        f"{entry!r}."
                        if looks_like_file
                        else ""
                    )
                )
                continue
            key, pol = split[0].strip(), split[1].strip()
            if key in ("default", *NON_LAYER_PARTS):
                if key in kwargs:
                    problems.append(f"{epath}: {key} given twice. Keep one entry.")
                allowed = _part_policies(key)
                s = parse_policy_spec(pol, epath, problems, allowed)
                if s is not None:
                    kwargs[key] = s
                problems[first_problem:] = [f"{p} (in entry {entry!r})" for p in problems[first_problem:]]
                continue
            try:
                rng = LayerRange.parse(key)
            except ValueError as e:
                problems.append(f"{epath}: {e}; or a part: default, {', '.join(NON_LAYER_PARTS)}.")
                rng = None
            s = parse_policy_spec(pol, epath, problems)
            if rng is not None and s is not None:
                rules.append(LayerRule(rng, s, source=f"{epath} ({entry!r})"))
            problems[first_problem:] = [f"{p} (in entry {entry!r})" for p in problems[first_problem:]]
        if problems:
            raise ConfigError(problems)
        return cls(rules=tuple(rules), **kwargs)

    # ------------------------------------------------------------------ forms
    def to_dict(self) -> dict[str, Any]:
        """Dict form; ``LayerPlan.parse(plan.to_dict()) == plan``. Rules carry every option."""
        out: dict[str, Any] = {}
        if self.name:
            out["name"] = self.name
        out["default"] = _spec_value(self.default)
        for part in NON_LAYER_PARTS:
            out[part] = _spec_value(getattr(self, part))
        out["rules"] = [
            {"layers": str(r.layers), "policy": r.spec.name,
             **(to_dict(r.spec.options) if r.spec.options is not None else {})}
            for r in self.rules
        ]
        return out

    def __str__(self) -> str:
        """Compact form; ``LayerPlan.parse(str(plan)) == plan``."""
        parts = [str(r) for r in self.rules]
        freeze = _freeze()
        for key in ("default", *NON_LAYER_PARTS):
            spec = getattr(self, key)
            if spec != freeze or not parts and key == "default":
                parts.append(f"{key}:{spec.describe()}")
        return ",".join(parts)

    def policy_names(self) -> set[str]:
        """Every policy name the plan uses (rules, default and non-layer parts)."""
        names = {r.spec.name for r in self.rules} | {self.default.name}
        return names | {getattr(self, p).name for p in NON_LAYER_PARTS}

    # ------------------------------------------------------------------ resolve
    def resolve(self, num_layers: int, path: str = "plan") -> ResolvedPlan:
        """Give every one of ``num_layers`` layers its policy.

        Raises:
            ConfigError: every out-of-range index and every pair of overlapping rules (both
                named, with the shared layers).
        """
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ConfigError(f"{path}: num_layers must be a positive integer, got {num_layers!r}.")
        problems: list[str] = []
        owner: list[int | None] = [None] * num_layers
        overlaps: dict[tuple[int, int], list[int]] = {}
        for ri, rule in enumerate(self.rules):
            idx, probs = rule.layers.indices(num_layers)
            label = rule.source or f"{path}.rules[{ri}] ('{rule.layers}')"
            for p in probs:
                problems.append(f"{label}: {p}. Fix the range.")
            for i in idx:
                if owner[i] is None:
                    owner[i] = ri
                else:
                    overlaps.setdefault((owner[i], ri), []).append(i)
        for (a, b), shared in overlaps.items():
            la = self.rules[a].source or f"{path}.rules[{a}] ('{self.rules[a].layers}')"
            lb = self.rules[b].source or f"{path}.rules[{b}] ('{self.rules[b].layers}')"
            problems.append(
                f"{la} and {lb} both cover {_fmt_indices(shared)} of a {num_layers}-layer model. "
                "Make the ranges disjoint: a layer gets exactly one policy."
            )
        if problems:
            raise ConfigError(problems)
        layers = tuple(self.rules[o].spec if o is not None else self.default for o in owner)
        sources = tuple(
            (self.rules[o].source or f"rules[{o}]") if o is not None else "default" for o in owner
        )
        return ResolvedPlan(num_layers, layers, sources, self.embeddings, self.final_norm, self.lm_head)

    # ------------------------------------------------------------------ presets
    @classmethod
    def from_preset(cls, name: str, path: str | None = None, **options: Any) -> LayerPlan:
        """Build a preset plan (``full``, ``freeze_deep``, ``freeze_shallow``, ``hlpt``,
        ``hlpt_branch``, ``h2lpt``, ``h2lpt_3to1``, ``h2lpt_branch``, ``lora_all``); see
        docs/plans.md for sources and allocations.

        Raises:
            ConfigError: unknown preset (lists them) or preset option (did-you-mean).
        """
        where = path or f"preset {name!r}"
        if name not in PRESETS:
            raise ConfigError(
                f"{where}: unknown preset {name!r}.{_did_you_mean(name, PRESETS)} "
                f"Presets: {', '.join(PRESETS)}."
            )
        args_cls, build, _doc = PRESETS[name]
        args = from_dict(args_cls, dict(options), path=where)
        plan = cls.parse(build(args), path=where)
        return dataclasses.replace(plan, name=name)


def _did_you_mean(name: str, names) -> str:
    s = suggest(str(name), names)
    return s if "Did you mean" in s else ""


def _fmt_indices(idx: list[int]) -> str:
    runs: list[list[int]] = []
    for i in sorted(idx):
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
    return f"layer{'s' if len(idx) > 1 else ''} {text}"


# --------------------------------------------------------------------------- presets


def _pct(fraction: float) -> str:
    return _fmt_percent(Fraction(str(fraction)))


def _check_fraction(name: str, value: float, problems: list[str], allow_zero: bool = False) -> None:
    ok = (0 <= value <= 1) if allow_zero else (0 < value <= 1)
    if not ok:
        rng = "[0, 1]" if allow_zero else "(0, 1]"
        problems.append(f"{name}: must be a fraction in {rng}, got {value}.")


_LORA_TARGETS = ("mlp", "attn", "down", "all")


def _check_lora_target(value: str, problems: list[str]) -> None:
    if value not in _LORA_TARGETS:
        problems.append(
            f"lora_target: must be one of {', '.join(_LORA_TARGETS)}, got {value!r}. For named "
            "modules use lora={target: [...]}."
        )


def _part_default(value: str | None, follow: str) -> str:
    return follow if value is None else value


@dataclass
class FullArgs:
    """``full``: every layer and every non-layer part trains (no options)."""


@dataclass
class FreezeDeepArgs:
    """``freeze_deep`` options."""

    fraction: float = 0.5
    """Fraction of layers, from the bottom, that train in full; the rest are frozen."""
    embeddings: str | None = None
    """Policy of the embeddings; None follows the bottom (``full``)."""
    final_norm: str | None = None
    """Policy of the final norm; None follows the top (``freeze``)."""
    lm_head: str | None = None
    """Policy of the LM head; None follows the top (``freeze``)."""

    def __post_init__(self):
        problems: list[str] = []
        _check_fraction("fraction", self.fraction, problems)
        if problems:
            raise ConfigError(problems)


@dataclass
class FreezeShallowArgs(FreezeDeepArgs):
    """``freeze_shallow`` options (fraction counts from the top; embeddings follow the bottom
    (``freeze``), norm/head the top (``full``))."""


_PREFIX_FORMS = ("paper", "branch")
_GATE_AT = ("logit", "value")


def _check_prefix_form(form: str, gate_at: str, gated: bool, problems: list[str]) -> None:
    if form not in _PREFIX_FORMS:
        problems.append(
            f"form: must be paper (HLPT's gated virtual tokens) or branch (the zero-initialised "
            f"branch), got {form!r}."
        )
    if gate_at not in _GATE_AT:
        problems.append(f"gate_at: must be logit or value, got {gate_at!r}.")
    elif gate_at == "value" and (form != "paper" or not gated):
        problems.append(
            f"gate_at: value is read by the gated paper form only, got form={form}, "
            f"gated={str(gated).lower()}. Use form=paper with gated=true, or drop gate_at."
        )


@dataclass
class HLPTArgs:
    """``hlpt`` options (HLPT, Gu et al., EMNLP 2024: gated LoRA on the FFN of the bottom layers,
    gated prefix on the top layers, the prefix in the paper's form)."""

    lora_fraction: float = 0.75
    """Bottom fraction of layers with gated LoRA on the FFN; the rest get gated prefix."""
    r: int = 16
    """LoRA rank."""
    tokens: int = 16
    """Prefix virtual tokens per layer."""
    gated: bool = True
    """HLPT's input-dependent gate on the LoRA and the prefix layers; false is the paper's
    no-gate ablation: plain LoRA (``alpha / r`` only) and, in the paper form, plain prefix tuning
    (weight 1 in the one softmax; no gate, no factor). The branch form keeps its zero-initialised
    per-head factor without gates (it is what makes that form the identity at init)."""
    form: str = "paper"
    """The prefix's form: ``paper`` (HLPT: the prefix prepended to the layer's own keys/values,
    one softmax, the gate on the prefix) or ``branch`` (a separate zero-initialised attention
    branch, LLaMA-Adapter style; the base model exactly at init; the form the Megatron engine and
    inline-attention models support). See docs/plans.md."""
    gate_at: str = "logit"
    """Where the paper form's gate acts: ``logit`` (``log g`` on the prefix's attention logits)
    or ``value`` (``g`` scales the prefix's values). Paper form with ``gated`` only."""
    lora_target: str = "mlp"
    """What the LoRA layers adapt: ``mlp`` (HLPT: the FFN), ``attn`` (ablation: attention
    instead of the FFN), ``down`` (ablation: the FFN's down projection only) or ``all``."""
    reverse: bool = False
    """Mirror the layout (ablation): prefix on the bottom ``1 - lora_fraction`` of the layers,
    LoRA on the top ``lora_fraction``."""
    lora: dict = field(default_factory=dict)
    """Extra LoRA options (alpha, dropout, ...), merged over ``{r, target, gated}``."""
    prefix: dict = field(default_factory=dict)
    """Extra prefix options (gate_bias, reparam, ...), merged over ``{tokens, gated, form,
    gate_at}``."""
    embeddings: str = "freeze"
    """Policy of the embeddings."""
    final_norm: str = "freeze"
    """Policy of the final norm."""
    lm_head: str = "freeze"
    """Policy of the LM head."""

    def __post_init__(self):
        problems: list[str] = []
        _check_fraction("lora_fraction", self.lora_fraction, problems, allow_zero=True)
        _check_lora_target(self.lora_target, problems)
        _check_prefix_form(self.form, self.gate_at, self.gated, problems)
        if problems:
            raise ConfigError(problems)


@dataclass
class HLPTBranchArgs(HLPTArgs):
    """``hlpt_branch`` options: ``hlpt`` with the prefix in the branch form (identity at init)."""

    form: str = "branch"
    """The prefix's form (``branch`` here; ``paper`` makes this ``hlpt``)."""


@dataclass
class H2LPTArgs:
    """``h2lpt`` options (H²LPT, Gu et al., EMNLP 2024): gated LoRA on the FFN of the bottom
    quarter, the middle half frozen, gated prefix (paper form) on the top quarter."""

    lora_fraction: float = 0.25
    """Bottom fraction with gated LoRA on the FFN (the paper's bottom-most quarter)."""
    prefix_fraction: float = 0.25
    """Top fraction with gated prefix (the paper's top-most quarter)."""
    r: int = 16
    """LoRA rank."""
    tokens: int = 16
    """Prefix virtual tokens per layer."""
    gated: bool = True
    """HLPT's input-dependent gate on the LoRA and the prefix layers (false: the gate-free
    ablation, as for ``hlpt``)."""
    form: str = "paper"
    """The prefix's form: ``paper`` or ``branch`` (as for ``hlpt``)."""
    gate_at: str = "logit"
    """Where the paper form's gate acts: ``logit`` or ``value`` (as for ``hlpt``)."""
    lora_target: str = "mlp"
    """What the LoRA layers adapt: ``mlp`` (the FFN), ``attn``, ``down`` or ``all``."""
    lora: dict = field(default_factory=dict)
    """Extra LoRA options, merged over ``{r, target, gated}``."""
    prefix: dict = field(default_factory=dict)
    """Extra prefix options, merged over ``{tokens, gated, form, gate_at}``."""
    embeddings: str = "freeze"
    """Policy of the embeddings."""
    final_norm: str = "freeze"
    """Policy of the final norm."""
    lm_head: str = "freeze"
    """Policy of the LM head."""

    def __post_init__(self):
        problems: list[str] = []
        _check_fraction("lora_fraction", self.lora_fraction, problems, allow_zero=True)
        _check_fraction("prefix_fraction", self.prefix_fraction, problems, allow_zero=True)
        _check_lora_target(self.lora_target, problems)
        _check_prefix_form(self.form, self.gate_at, self.gated, problems)
        if not problems and self.lora_fraction + self.prefix_fraction > 1:
            problems.append(
                f"lora_fraction + prefix_fraction: must be at most 1, got "
                f"{self.lora_fraction} + {self.prefix_fraction}."
            )
        if problems:
            raise ConfigError(problems)


@dataclass
class H2LPT3to1Args(H2LPTArgs):
    """``h2lpt_3to1`` options: HLPT's 3 : 1 split on half the layers (bottom 3/8 LoRA, top 1/8
    prefix, middle half frozen), the layout ``h2lpt`` had before it followed the paper."""

    lora_fraction: float = 0.375
    """Bottom fraction with gated LoRA on the FFN (HLPT's 3/4 of half the layers)."""
    prefix_fraction: float = 0.125
    """Top fraction with gated prefix (HLPT's 1/4 of half the layers)."""


@dataclass
class H2LPTBranchArgs(H2LPTArgs):
    """``h2lpt_branch`` options: ``h2lpt`` with the prefix in the branch form."""

    form: str = "branch"
    """The prefix's form (``branch`` here; ``paper`` makes this ``h2lpt``)."""


@dataclass
class LoRAAllArgs:
    """``lora_all`` options: plain LoRA on every layer."""

    r: int = 16
    """LoRA rank."""
    target: str = "all"
    """Modules to adapt: ``mlp``, ``attn`` or ``all``."""
    lora: dict = field(default_factory=dict)
    """Extra LoRA options (alpha, dropout, gated, ...)."""
    embeddings: str = "freeze"
    """Policy of the embeddings."""
    final_norm: str = "freeze"
    """Policy of the final norm."""
    lm_head: str = "freeze"
    """Policy of the LM head."""


def _parts(args) -> dict[str, str]:
    return {p: getattr(args, p) for p in NON_LAYER_PARTS}


def _preset_full(args: FullArgs) -> dict:
    return {"rules": [{"layers": "all", "policy": "full"}], "embeddings": "full",
            "final_norm": "full", "lm_head": "full"}


def _preset_freeze_deep(args: FreezeDeepArgs) -> dict:
    return {
        "rules": [{"layers": f"0%-{_pct(args.fraction)}", "policy": "full"}],
        "embeddings": _part_default(args.embeddings, "full"),
        "final_norm": _part_default(args.final_norm, "freeze"),
        "lm_head": _part_default(args.lm_head, "freeze"),
    }


def _preset_freeze_shallow(args: FreezeShallowArgs) -> dict:
    start = Fraction(1) - Fraction(str(args.fraction))
    return {
        "rules": [{"layers": f"{_fmt_percent(start)}-100%", "policy": "full"}],
        "embeddings": _part_default(args.embeddings, "freeze"),
        "final_norm": _part_default(args.final_norm, "full"),
        "lm_head": _part_default(args.lm_head, "full"),
    }


def _lora_rule(layers: str, args) -> dict:
    return {
        "layers": layers, "policy": "lora", "r": args.r, "target": args.lora_target,
        "gated": args.gated, **args.lora,
    }


def _prefix_rule(layers: str, args) -> dict:
    rule = {"layers": layers, "policy": "prefix", "tokens": args.tokens, "gated": args.gated,
            "form": args.form}
    if args.form == "paper":
        rule["gate_at"] = args.gate_at
    return {**rule, **args.prefix}


def _preset_hlpt(args: HLPTArgs) -> dict:
    if args.reverse:  # prefix bottom, LoRA top
        split = _fmt_percent(Fraction(1) - Fraction(str(args.lora_fraction)))
        rules = [_prefix_rule(f"0%-{split}", args), _lora_rule(f"{split}-100%", args)]
        return {"rules": rules, **_parts(args)}
    split = _pct(args.lora_fraction)
    return {"rules": [_lora_rule(f"0%-{split}", args), _prefix_rule(f"{split}-100%", args)], **_parts(args)}


def _preset_h2lpt(args: H2LPTArgs) -> dict:
    top = _fmt_percent(Fraction(1) - Fraction(str(args.prefix_fraction)))
    return {
        "rules": [_lora_rule(f"0%-{_pct(args.lora_fraction)}", args), _prefix_rule(f"{top}-100%", args)],
        **_parts(args),
    }


def _preset_lora_all(args: LoRAAllArgs) -> dict:
    return {"rules": [{"layers": "all", "policy": "lora", "r": args.r, "target": args.target, **args.lora}],
            **_parts(args)}


#: name -> (options dataclass, builder returning a plan dict, one-line description).
PRESETS: dict[str, tuple[type, Callable[[Any], dict], str]] = {
    "full": (FullArgs, _preset_full, "train everything"),
    "freeze_deep": (FreezeDeepArgs, _preset_freeze_deep,
                    "LayerTracer: train the bottom fraction in full, freeze the deep layers"),
    "freeze_shallow": (FreezeShallowArgs, _preset_freeze_shallow,
                       "the opposite: train the top fraction in full, freeze the shallow layers"),
    "hlpt": (HLPTArgs, _preset_hlpt,
             "HLPT: gated LoRA on the FFN of the bottom 3/4, gated prefix (paper form) on the top 1/4"),
    "hlpt_branch": (HLPTBranchArgs, _preset_hlpt,
                    "hlpt with the prefix as a zero-initialised branch (identity at init; Megatron)"),
    "h2lpt": (H2LPTArgs, _preset_h2lpt,
              "H2LPT: bottom 1/4 gated LoRA, middle half frozen, top 1/4 gated prefix (paper form)"),
    "h2lpt_3to1": (H2LPT3to1Args, _preset_h2lpt,
                   "HLPT's 3:1 split on half the layers: bottom 3/8 LoRA, top 1/8 prefix, middle frozen"),
    "h2lpt_branch": (H2LPTBranchArgs, _preset_h2lpt,
                     "h2lpt with the prefix as a zero-initialised branch (identity at init; Megatron)"),
    "lora_all": (LoRAAllArgs, _preset_lora_all, "plain LoRA on every layer"),
}


def is_plan_file(value: Any) -> bool:
    """Whether a plan value is a file name: a string ending in ``.yaml``, ``.yml`` or ``.json``."""
    return isinstance(value, str) and value.strip().lower().endswith(PLAN_FILE_SUFFIXES)


def read_plan_file(value: str, path: str = "plan.spec") -> Any:
    """The plan a YAML/JSON file holds: a preset or plan string, a mapping, or a list of phases.

    ``layerfreeze plan --plan FILE`` and ``plan.spec: FILE`` (a config value or override) both
    read the file here; a relative name is relative to the working directory.

    Args:
        value: the file name, as the user wrote it.
        path: the option or config key, for messages.

    Raises:
        ConfigError: the file is missing, a directory, not UTF-8, not valid YAML/JSON, or empty.
    """
    from pathlib import Path

    import yaml

    f = Path(value.strip()).expanduser()
    if not f.is_file():
        what = "is a directory" if f.is_dir() else "no such plan file"
        raise ConfigError(
            f"{path}: {what}, got {value!r}. Give a YAML/JSON plan file, a preset name or a plan "
            "string such as '0-7:full,8-31:freeze'."
        )
    try:
        data = yaml.safe_load(f.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:  # JSON is YAML: a JSON syntax error lands here too
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(
            f"{path}: {value} is not valid YAML/JSON{at}: {what}. Fix the file's syntax."
        ) from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: {value} is not a UTF-8 text file.") from None
    if data is None:
        raise ConfigError(
            f"{path}: plan file {value} is empty. Write a plan or a list of phases in it."
        )
    return data
