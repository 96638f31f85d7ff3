"""Size bounds of a suite, and the declared ranges of typed config fields, in one place.

The bounds stop a typo (``steps: 1000000000``, ``num_samples: 1e12``) before days of work start; they are not
limits of the code.  Every bound is raised for one run by ``diffbench run --allow-large`` (``diffbench validate
--allow-large``, ``parse_suite(..., allow_large=True)``, ``evaluate(..., allow_large=True)``); the hard limits
below it (a seed must fit the 64-bit generators) hold regardless.

A config field declares its range with :func:`ranged` (dataclass field metadata); the suite validator checks every
``model_overrides`` value against it, and a float override must be finite whatever its field.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

MAX_STEPS = 10_000             # sampler steps of one run (DDPM samples with 1000)
MAX_NUM_SAMPLES = 1_000_000    # samples of one run (FID-50k twenty times over)
MAX_SEED = 2**32 - 1           # sampling and training seeds
MAX_TRAIN_STEPS = 10_000_000   # optimisation steps of one model (the paper presets train at most 1.3M)
MAX_SAMPLER_INT = 10_000       # an integer sampler option with no maximum of its own (e.g. Langevin steps T)
MAX_TIMING_REPEATS = 1_000     # timed repeats of one run
MAX_RUNS = 100_000             # runs one suite expands into (the default suite: a few hundred)

# hard limits (not raised by --allow-large): sample i of seed s draws from generator seed s * 10**6 + i
# (bench_core.seeding.sample_seed), and torch generators take seeds below 2**64; training adds small offsets
SAMPLE_SEED_STRIDE = 1_000_000
HARD_MAX_SEED_PRODUCT = 2**63 - 1
HARD_MAX_TRAIN_SEED = 2**62

HOW_TO_RAISE = "pass --allow-large to `diffbench run` / `diffbench validate` (allow_large=True in Python) to go past it"


def too_large(what: str, value: Any, bound: int, name: str) -> str:
    """The message for a value above a size bound: the value, the bound (and its name here) and how to raise it."""
    return f"{what} {value} is above the bound {bound:_} ({name} in bench_core/limits.py); {HOW_TO_RAISE}"


@dataclass(frozen=True)
class Range:
    """Allowed values of a number: ``gt`` / ``ge`` / ``lt`` / ``le`` hard bounds, ``large`` a size bound (with its
    constant's name) that --allow-large lifts."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    large: tuple[str, int] | None = None

    def check(self, value, allow_large: bool = False) -> str | None:
        """None when ``value`` is allowed, else what is wrong (without the field's name)."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None  # the type is checked elsewhere
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be a finite number, got {value!r}"
        for bound, ok, rel in ((self.gt, lambda b: value > b, ">"), (self.ge, lambda b: value >= b, ">="),
                               (self.lt, lambda b: value < b, "<"), (self.le, lambda b: value <= b, "<=")):
            if bound is not None and not ok(bound):
                return f"must be {rel} {bound}, got {value!r}"
        if self.large is not None and not allow_large and value > self.large[1]:
            return too_large("value", value, self.large[1], self.large[0])
        return None


def ranged(default: Any, **bounds) -> Any:
    """A dataclass field with ``default`` and a declared :class:`Range` (``gt=``, ``ge=``, ``lt=``, ``le=``,
    ``large=(NAME, bound)``)."""
    return dataclasses.field(default=default, metadata={"range": Range(**bounds)})


def field_range(f: dataclasses.Field) -> Range | None:
    """The declared range of a dataclass field, None when it declares none."""
    r = f.metadata.get("range") if f.metadata else None
    return r if isinstance(r, Range) else None
