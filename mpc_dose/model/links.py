"""Link blocks between PK and PD: the effect compartment and transit-compartment delays.

A link takes a driving concentration (an :class:`~mpc_dose.model.spec.Output` of another
block, in canonical units) and gives a delayed copy of it as a new output.
"""

from __future__ import annotations

from ..errors import ModelError
from .spec import Block, Output, output, param, state

__all__ = ["effect_compartment", "transit_chain"]


def effect_compartment(name: str, driver: Output, *, ke0_name: str | None = None,
                       rate_constant_unit: str = "1/min") -> Block:
    """Effect site: ``dCe/dt = ke0 (C - Ce)``; *name* is the state and output (e.g.
    ``propofol_ce``), in the driver's unit. The equilibration half-time is ``ln 2 / ke0``.
    """
    ke0 = param(ke0_name or f"{name}_ke0", rate_constant_unit,
                f"effect-site equilibration rate constant of {driver.name}")
    ce = state(name, driver.unit, f"effect-site concentration of {driver.name}")
    return Block(f"effect compartment {name}", (ke0,), (ce,),
                 (ke0.value * (driver.value - ce.value),), (),
                 (output(name, driver.unit, f"effect-site concentration of {driver.name}",
                         ce.value),))


def transit_chain(name: str, driver: Output, n: int, *, time_unit: str = "h") -> Block:
    """A chain of *n* transit compartments with mean transit time ``{name}_mtt``.

    ``ktr = n / mtt``; ``dT1/dt = ktr (C - T1)``, ``dTi/dt = ktr (T(i-1) - Ti)``. The output
    *name* is the last compartment: a smooth, gamma-distributed delay of the driver.
    """
    if not isinstance(n, int) or n < 1:
        raise ModelError(f"transit chain {name!r}: n must be a whole number >= 1, got {n!r}")
    mtt = param(f"{name}_mtt", time_unit, f"mean transit time of the {n}-compartment delay")
    ktr = n / mtt.value
    stages = [state(f"{name}_{i}", driver.unit, f"transit compartment {i} of {n} delaying "
                    f"{driver.name}") for i in range(1, n + 1)]
    previous = [driver.value] + [s.value for s in stages[:-1]]
    rates = tuple(ktr * (prev - s.value) for prev, s in zip(previous, stages))
    return Block(f"transit chain {name}", (mtt,), tuple(stages), rates, (),
                 (output(name, driver.unit, f"{driver.name} delayed by {n} transit compartments",
                         stages[-1].value),))
