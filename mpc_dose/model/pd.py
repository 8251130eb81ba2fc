"""Pharmacodynamic blocks: direct effects, the propofol-remifentanil BIS surface, turnover
(indirect response) models and Friberg myelosuppression.

Why the Hill term is smoothed: ``C**gamma`` has an infinite or undefined derivative at
``C = 0`` for ``gamma < 1`` (and CasADi's ``pow`` gives NaN derivatives at 0 for any
non-integer exponent), and an optimiser fed NaN or infinite sensitivities at induction plans
almost no drug. Every Hill term here is ``(r**2 + e**2)**(gamma/2) - HILL_FLOOR`` of the
normalised concentration ``r = C/C50``, with ``e = HILL_FLOOR**(1/gamma)``: it is exactly 0
at ``r = 0``, its derivative is finite everywhere (at most about ``gamma e**(gamma-1)``,
5e7 for gamma 0.5, 0 for gamma >= 1), and it differs from ``r**gamma`` by at most
``HILL_FLOOR = 1e-8`` plus a relative ``gamma/2 (e/r)**2``. It is even in ``r``: at
(unphysical) negative concentrations its slope has the opposite sign.
"""

from __future__ import annotations

import casadi as ca

from ..errors import ModelError
from .spec import Block, Output, output, param, state

__all__ = ["HILL_EPS", "HILL_FLOOR", "smooth_power", "linear_effect", "emax_effect", "bouillon_bis",
           "indirect_response", "friberg_myelosuppression"]

#: Largest deviation of a smoothed Hill term from ``r**gamma`` (see module docstring).
HILL_FLOOR = 1e-8
#: Regularisation of the propofol fraction of the Bouillon surface at zero drug.
HILL_EPS = 1e-5


def smooth_power(ratio: ca.SX, gamma: ca.SX) -> ca.SX:
    """``ratio**gamma`` with finite derivatives at and below zero (see module docstring)."""
    e = HILL_FLOOR ** (1 / gamma)
    return (ratio * ratio + e * e) ** (gamma / 2) - HILL_FLOOR


def linear_effect(name: str, driver: Output, *, effect_unit: str = "1") -> Block:
    """``E = e0 + slope * C`` with parameters ``{name}_e0`` and ``{name}_slope``."""
    e0 = param(f"{name}_e0", effect_unit, "baseline effect", "real")
    slope = param(f"{name}_slope", _per(effect_unit, driver.unit),
                  f"effect per unit of {driver.name}", "real")
    e = e0.value + slope.value * driver.value
    return Block(f"linear effect {name}", (e0, slope), outputs=(
        output(name, effect_unit, f"linear effect of {driver.name}", e),))


def _per(numerator: str, denominator: str) -> str:
    """Unit of ``numerator / denominator`` for a slope (``"mmHg"`` per ``"ug/L"``)."""
    if "/" in denominator:
        num, den = denominator.split("/", 1)
        return f"{numerator}*{den}/{num}"
    return f"{numerator}/{denominator}"


def emax_effect(name: str, driver: Output, *, effect_unit: str = "1",
                direction: str = "stimulatory", sigmoid: bool = False) -> Block:
    """Emax or sigmoid Emax (Hill) effect of a concentration.

    ``E = e0 + Emax H`` (stimulatory) or ``E = e0 - Emax H`` (inhibitory), with
    ``H = C/(C50 + C)`` or, when *sigmoid*, ``H = r^gamma / (1 + r^gamma)``, ``r = C/C50``.
    Parameters ``{name}_e0``, ``{name}_emax`` (both in *effect_unit*), ``{name}_c50`` (in the
    driver's unit) and ``{name}_gamma``.
    """
    if direction not in ("stimulatory", "inhibitory"):
        raise ModelError(f"emax effect {name!r}: direction must be 'stimulatory' or "
                         f"'inhibitory', got {direction!r}")
    e0 = param(f"{name}_e0", effect_unit, "baseline effect", "real")
    emax = param(f"{name}_emax", effect_unit, "maximal change of the effect", "nonnegative")
    c50 = param(f"{name}_c50", driver.unit, f"{driver.name} at half-maximal effect")
    params = [e0, emax, c50]
    ratio = driver.value / c50.value
    if sigmoid:
        gamma = param(f"{name}_gamma", "1", "Hill coefficient (steepness)")
        params.append(gamma)
        powered = smooth_power(ratio, gamma.sym)
        fraction = powered / (1 + powered)
    else:
        fraction = ratio / (1 + ratio)
    sign = 1 if direction == "stimulatory" else -1
    e = e0.value + sign * emax.value * fraction
    return Block(f"emax effect {name}", tuple(params), outputs=(
        output(name, effect_unit, f"{'sigmoid ' if sigmoid else ''}Emax effect of {driver.name}",
               e),))


def bouillon_bis(propofol_ce: Output, remifentanil_ce: Output, name: str = "bis") -> Block:
    """Propofol-remifentanil response surface for BIS (Bouillon et al. 2004).

    ``Up = Ce_p/c50p``, ``Ur = Ce_r/c50r``, ``U = Up + Ur``, ``phi = Up/U``,
    ``U50 = 1 - beta phi + beta phi^2``,
    ``BIS = E0 - Emax (U/U50)^gamma / (1 + (U/U50)^gamma)``.

    ``phi = Up/U`` is undefined at ``U = 0``; it is taken as ``Up U / (U^2 + HILL_EPS^2)``,
    which differs from ``Up/U`` by a relative ``(HILL_EPS/U)^2`` (1e-9 at U = 0.3) and is 0
    with finite derivatives at ``U = 0``.
    """
    c50p = param(f"{name}_c50p", propofol_ce.unit, "propofol effect-site concentration at "
                 "half-maximal effect alone")
    c50r = param(f"{name}_c50r", remifentanil_ce.unit, "remifentanil effect-site concentration "
                 "at half-maximal effect alone")
    gamma = param(f"{name}_gamma", "1", "steepness of the response surface")
    beta = param(f"{name}_beta", "1", "interaction (synergy) term of the surface", "real")
    e0 = param(f"{name}_e0", "1", "baseline BIS (awake)", "real")
    emax = param(f"{name}_emax", "1", "maximal BIS decrease", "nonnegative")
    up = propofol_ce.value / c50p.value
    ur = remifentanil_ce.value / c50r.value
    u = up + ur
    phi = up * u / (u * u + HILL_EPS**2)
    u50 = 1 - beta.value * phi + beta.value * phi * phi
    powered = smooth_power(u / u50, gamma.sym)
    bis = e0.value - emax.value * powered / (1 + powered)
    return Block(f"Bouillon BIS surface {name}", (c50p, c50r, gamma, beta, e0, emax), outputs=(
        output(name, "1", "bispectral index (0-100) from the propofol-remifentanil surface",
               bis),))


def indirect_response(name: str, driver: Output, kind: int, *, response_unit: str = "1",
                      time_unit: str = "h") -> Block:
    """Indirect response (turnover) model of Dayneka, Garg & Jusko (1993), types I-IV.

    ``dR/dt = kin * S_in - kout * S_out * R`` with ``R(0) = kin/kout`` and
    I: ``S_in = 1 - Imax C/(IC50 + C)``; II: ``S_out = 1 - Imax C/(IC50 + C)``;
    III: ``S_in = 1 + Emax C/(EC50 + C)``; IV: ``S_out = 1 + Emax C/(EC50 + C)``.
    Parameters ``{name}_kin``, ``{name}_kout``, ``{name}_imax`` or ``{name}_emax``,
    ``{name}_ic50`` or ``{name}_ec50``.
    """
    if kind not in (1, 2, 3, 4):
        raise ModelError(f"indirect response {name!r}: kind must be 1, 2, 3 or 4, got {kind!r}")
    kin = param(f"{name}_kin", f"{response_unit}/{time_unit}", "zero-order production rate")
    kout = param(f"{name}_kout", f"1/{time_unit}", "first-order loss rate constant")
    inhibits = kind in (1, 2)
    cap = param(f"{name}_{'imax' if inhibits else 'emax'}", "1",
                "maximal fractional inhibition" if inhibits else "maximal fractional stimulation",
                "fraction" if inhibits else "nonnegative")
    c50 = param(f"{name}_{'ic50' if inhibits else 'ec50'}", driver.unit,
                f"{driver.name} at half-maximal {'inhibition' if inhibits else 'stimulation'}")
    drug = cap.value * driver.value / (c50.value + driver.value)
    modifier = 1 - drug if inhibits else 1 + drug
    response = state(name, response_unit, f"response of turnover model type {kind}",
                     initial=kin.sym / kout.sym)
    production = kin.value * (modifier if kind in (1, 3) else 1)
    loss = kout.value * (modifier if kind in (2, 4) else 1) * response.value
    return Block(f"indirect response {name} (type {kind})", (kin, kout, cap, c50), (response,),
                 (production - loss,), (), (output(name, response_unit,
                                                  f"turnover response (type {kind})",
                                                  response.value),))


def friberg_myelosuppression(name: str, driver: Output, *, cell_unit: str = "10^9/L",
                             time_unit: str = "h", drug_effect: str = "linear") -> Block:
    """Semi-mechanistic myelosuppression model (Friberg et al. 2002).

    Proliferating cells, three transit compartments and circulating cells, ``ktr = 4/MTT``::

        dProl/dt = ktr Prol (1 - Edrug) (Circ0/Circ)^gamma - ktr Prol
        dTi/dt   = ktr (T(i-1) - Ti)                  (T0 = Prol)
        dCirc/dt = ktr T3 - ktr Circ

    with ``Edrug = slope C`` (``drug_effect="linear"``) or ``Emax C/(EC50 + C)``. Every
    compartment starts at ``Circ0``. The feedback uses ``Circ`` smoothed away from zero so its
    derivative stays finite.
    """
    if drug_effect not in ("linear", "emax"):
        raise ModelError(f"friberg {name!r}: drug_effect must be 'linear' or 'emax', "
                         f"got {drug_effect!r}")
    circ0 = param(f"{name}_circ0", cell_unit, "baseline circulating cell count")
    mtt = param(f"{name}_mtt", time_unit, "mean transit time through maturation")
    gamma = param(f"{name}_gamma", "1", "feedback exponent of circulating cells on proliferation")
    params = [circ0, mtt, gamma]
    if drug_effect == "linear":
        slope = param(f"{name}_slope", _per("1", driver.unit),
                      f"fractional kill of proliferating cells per unit {driver.name}",
                      "nonnegative")
        params.append(slope)
        e_drug = slope.value * driver.value
    else:
        emax = param(f"{name}_emax", "1", "maximal fractional kill", "nonnegative")
        ec50 = param(f"{name}_ec50", driver.unit, f"{driver.name} at half-maximal kill")
        params += [emax, ec50]
        e_drug = emax.value * driver.value / (ec50.value + driver.value)
    labels = ["prol", "transit_1", "transit_2", "transit_3", "circ"]
    docs = ["proliferating cells", "maturing cells (transit 1)", "maturing cells (transit 2)",
            "maturing cells (transit 3)", "circulating cells"]
    cells = [state(f"{name}_{lab}", cell_unit, doc, initial=circ0.sym)
             for lab, doc in zip(labels, docs)]
    ktr = 4 / mtt.value
    v = [c.value for c in cells]
    circ_floor = ca.sqrt(v[4] * v[4] + (1e-6 * circ0.value) ** 2)
    feedback = (circ0.value / circ_floor) ** gamma.sym
    rates = [ktr * v[0] * (1 - e_drug) * feedback - ktr * v[0]]
    rates += [ktr * (v[i - 1] - v[i]) for i in range(1, 5)]
    return Block(f"Friberg myelosuppression {name}", tuple(params), tuple(cells), tuple(rates),
                 (), (output(name, cell_unit, "circulating cell count", v[4]),))
