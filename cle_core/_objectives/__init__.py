"""How scales are chosen: one protocol, one registry.

An objective receives a :class:`ScaleProblem` (the graph after batch-norm folding, its
regions, the options with the deployment, measured statistics if any) and returns a
:class:`ScaleOutcome`: one positive scale per channel of every region. It never changes
the graph; the scaling pass applies the scales. Every objective is registered by name
(:func:`register_objective`), and that registry is what the options, the command line's
choices and the scaling pass read, so a plugin can add an objective with one call. The
built-in ones (:mod:`.noise`, :mod:`.balance`) register themselves when ``cle_core`` is
imported.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from .._errors import CLEError

if TYPE_CHECKING:  # annotations only: the registry imports nothing the passes import
    import numpy as np

    from .._ir import Graph
    from .._regions import Region
    from .._report import EqualizeOptions, NoiseEstimate, SkipRecord
    from .._stats import ChannelStats


@dataclass(frozen=True)
class ScaleProblem:
    """What an objective chooses scales for. ``statistics``: per-channel statistics
    measured on calibration data, by value name (empty when data-free). ``on_sweep`` is
    called with the sweep number, for a progress bar."""

    graph: Graph
    regions: list[Region]
    options: EqualizeOptions
    statistics: Mapping[str, ChannelStats] = field(default_factory=dict)  # type: ignore[assignment]
    on_sweep: Callable[[int], None] | None = None


@dataclass
class ScaleOutcome:
    """Scales per region id, how the search ended, and what the objective estimated:
    ``estimate`` (the output noise before and after, for objectives that have one) and,
    per region id, the noise of the terms its scales change before and after."""

    scales: dict[int, np.ndarray]
    sweeps: int
    converged: bool
    max_change: float
    triples: list[tuple[str, str, str]] = field(default_factory=list)
    estimate: NoiseEstimate | None = None
    region_before: dict[int, float] = field(default_factory=dict)
    region_after: dict[int, float] = field(default_factory=dict)
    skips: list[SkipRecord] = field(default_factory=list)


class Objective(Protocol):
    """Chooses the scales of every region.

    Optional attributes, read with these defaults where an objective does not have them
    (the options and the command line check them instead of the objective's name):
    ``uses_statistics`` (True): calibration statistics change its scales;
    ``uses_activation_weight`` (False): it reads ``EqualizeOptions.activation_weight``;
    ``fallback`` (None): the name of the objective whose scales it returns, with a skip
    record saying why, where its own criterion cannot be evaluated on a graph.
    """

    name: str
    description: str  # one line, for ``--help`` and the docs

    def choose(self, problem: ScaleProblem) -> ScaleOutcome:
        """Scales for ``problem`` (the graph must not be changed)."""


_REGISTRY: dict[str, Objective] = {}


def register_objective(objective: Objective) -> Objective:
    """Make ``objective`` available as ``EqualizeOptions(objective=objective.name)`` and
    ``cle equalize --objective NAME``. A name that is taken is refused."""
    if objective.name in _REGISTRY and _REGISTRY[objective.name] is not objective:
        raise CLEError(f"an objective named {objective.name!r} is registered already")
    _REGISTRY[objective.name] = objective
    return objective


def get_objective(name: str) -> Objective:
    """The objective registered as ``name``; :class:`CLEError` naming the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise CLEError(
            f"unknown objective {name!r} (known: {', '.join(objective_names())})"
        ) from None


def objective_trait(name: str, trait: str) -> bool | str | None:
    """An optional attribute of the objective registered as ``name`` (see
    :class:`Objective`), or its default."""
    defaults = {"uses_statistics": True, "uses_activation_weight": False, "fallback": None}
    return getattr(get_objective(name), trait, defaults[trait])


def objective_names() -> list[str]:
    """The registered objectives' names, the default first."""
    return sorted(_REGISTRY, key=lambda n: (n != "noise", n))
