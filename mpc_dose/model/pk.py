"""Pharmacokinetic blocks: mammillary compartment models and target-mediated disposition.

Every factory returns a :class:`~mpc_dose.model.spec.Block` whose states are drug amounts
(or, for target-mediated disposition, amounts of drug, target and complex in the central
volume) in the declared units, with one drug input (an infusion rate in ``amount_unit`` per
second; boluses add to the bolus state) and a central concentration output
``{drug}_cp``.

Parameter names follow the anaesthesia and NONMEM conventions: ``v1, v2, v3`` volumes,
``cl1`` elimination clearance, ``cl2, cl3`` inter-compartmental clearances, or the micro
constants ``k10, k12, k21, k13, k31``; ``vmax, km`` for Michaelis-Menten elimination;
``ka, f, tlag`` for a first-order absorption depot.
"""

from __future__ import annotations

from dataclasses import replace

import casadi as ca

from ..errors import ModelError
from .spec import Block, canonical_factor, drug_input, output, param, state

__all__ = ["mammillary", "target_mediated"]

_ELIMINATION = ("linear", "michaelis_menten", "mixed")


def mammillary(drug: str, n_compartments: int = 1, *, amount_unit: str = "mg",
               concentration_unit: str = "mg/L", volume_unit: str = "L",
               clearance_unit: str = "L/min", rate_constant_unit: str = "1/min",
               parameterisation: str = "clearance", elimination: str = "linear",
               absorption: str | None = None, time_unit: str = "min",
               endogenous: bool = False) -> Block:
    """A 1-, 2- or 3-compartment mammillary model with linear and/or saturable elimination.

    .. math::
        \\dot a_1 = u - (k_{10} + k_{12} + k_{13}) a_1 + k_{21} a_2 + k_{31} a_3
                    - V_{max} C / (K_m + C)

    with :math:`k_{10} = CL_1/V_1`, :math:`k_{12} = CL_2/V_1`, :math:`k_{21} = CL_2/V_2` (and
    likewise for compartment 3) in the clearance parameterisation.

    Parameters
    ----------
    drug : str
        Prefix of every name (``propofol`` gives ``propofol_a1``, ``propofol_cl1``, ...) and
        the name of the drug input.
    n_compartments : int
        1, 2 or 3.
    amount_unit, concentration_unit, volume_unit, clearance_unit, rate_constant_unit : str
        Units of the states, of the concentration output and of the parameters.
    parameterisation : {"clearance", "micro"}
        Volumes and clearances, or V1 and micro rate constants.
    elimination : {"linear", "michaelis_menten", "mixed"}
        Elimination from the central compartment: first order, saturable (``vmax`` in
        ``amount_unit``/``time_unit``, ``km`` in ``concentration_unit``), or both.
    absorption : {None, "first_order"}
        With ``"first_order"`` the drug input feeds a depot ``{drug}_depot`` that empties into
        the central compartment at rate ``ka``; doses into the depot are scaled by the
        bioavailability ``f`` and delayed by ``tlag`` (in ``time_unit``).
    endogenous : bool
        Adds a constant endogenous production ``{drug}_kprod`` (``amount_unit``/``time_unit``)
        into the central compartment; the model then starts at its endogenous steady state
        ``C0 = kprod / cl1`` in every compartment (clearance parameterisation, linear
        elimination only).
    """
    if n_compartments not in (1, 2, 3):
        raise ModelError(f"mammillary {drug!r}: n_compartments must be 1, 2 or 3, "
                         f"got {n_compartments!r}")
    if parameterisation not in ("clearance", "micro"):
        raise ModelError(f"mammillary {drug!r}: parameterisation must be 'clearance' or "
                         f"'micro', got {parameterisation!r}")
    if elimination not in _ELIMINATION:
        raise ModelError(f"mammillary {drug!r}: elimination must be one of {_ELIMINATION}, "
                         f"got {elimination!r}")
    if absorption not in (None, "first_order"):
        raise ModelError(f"mammillary {drug!r}: absorption must be None or 'first_order', "
                         f"got {absorption!r}")

    amounts = [state(f"{drug}_a{i}", amount_unit, f"{drug} amount in compartment {i}"
                     + (" (central)" if i == 1 else " (peripheral)"))
               for i in range(1, n_compartments + 1)]
    v1 = param(f"{drug}_v1", volume_unit, "central volume of distribution")
    params = [v1]
    a = [s.value for s in amounts]
    conc = a[0] / v1.value
    rates = [ca.SX(0)] * n_compartments

    # Linear elimination and distribution, as micro rate constants in 1/s.
    k_out = None
    if elimination in ("linear", "mixed"):
        if parameterisation == "clearance":
            cl1 = param(f"{drug}_cl1", clearance_unit, "elimination clearance")
            params.append(cl1)
            k_out = cl1.value / v1.value
        else:
            k10 = param(f"{drug}_k10", rate_constant_unit, "elimination rate constant")
            params.append(k10)
            k_out = k10.value
        rates[0] = rates[0] - k_out * a[0]
    for i in range(2, n_compartments + 1):
        if parameterisation == "clearance":
            vi = param(f"{drug}_v{i}", volume_unit, f"volume of peripheral compartment {i}")
            cli = param(f"{drug}_cl{i}", clearance_unit,
                        f"inter-compartmental clearance central <-> {i}")
            params += [vi, cli]
            k1i, ki1 = cli.value / v1.value, cli.value / vi.value
        else:
            k1i_p = param(f"{drug}_k1{i}", rate_constant_unit, f"rate constant central -> {i}")
            ki1_p = param(f"{drug}_k{i}1", rate_constant_unit, f"rate constant {i} -> central")
            params += [k1i_p, ki1_p]
            k1i, ki1 = k1i_p.value, ki1_p.value
        rates[0] = rates[0] - k1i * a[0] + ki1 * a[i - 1]
        rates[i - 1] = rates[i - 1] + k1i * a[0] - ki1 * a[i - 1]
    if elimination in ("michaelis_menten", "mixed"):
        vmax = param(f"{drug}_vmax", f"{amount_unit}/{time_unit}", "maximal elimination rate")
        km = param(f"{drug}_km", concentration_unit,
                   "concentration at half-maximal elimination rate")
        params += [vmax, km]
        rates[0] = rates[0] - vmax.value * conc / (km.value + conc)

    if endogenous:
        if parameterisation != "clearance" or elimination != "linear":
            raise ModelError(f"mammillary {drug!r}: endogenous production needs the clearance "
                             f"parameterisation and linear elimination")
        kprod = param(f"{drug}_kprod", f"{amount_unit}/{time_unit}",
                      "endogenous production rate")
        params.append(kprod)
        rates[0] = rates[0] + kprod.value
        c0 = kprod.value / params[1].value  # canonical concentration at endogenous steady state
        volumes = [v1] + [params[2 * i] for i in range(1, n_compartments)]
        amounts = [replace(s, initial=c0 * vol.value / canonical_factor(s.unit))
                   for s, vol in zip(amounts, volumes)]
    states = list(amounts)
    outputs = [output(f"{drug}_cp", concentration_unit, f"{drug} central (plasma) concentration",
                      conc)]
    if absorption is None:
        inp = drug_input(drug, amount_unit, f"{drug} given into the central compartment",
                         bolus_state=amounts[0].name)
        rates[0] = rates[0] + inp.value
    else:
        depot = state(f"{drug}_depot", amount_unit, f"{drug} amount in the absorption depot")
        ka = param(f"{drug}_ka", rate_constant_unit, "first-order absorption rate constant")
        f = param(f"{drug}_f", "1", "bioavailability (fraction of a dose that is absorbed)",
                  "fraction")
        tlag = param(f"{drug}_tlag", time_unit, "absorption lag time", "nonnegative")
        params += [ka, f, tlag]
        inp = drug_input(drug, amount_unit, f"{drug} dose into the absorption depot",
                         bolus_state=depot.name, bioavailability=f.name, lag=tlag.name)
        absorbed = ka.value * depot.value
        states.append(depot)
        # Zero-order input into the depot is scaled by F like a bolus (NONMEM F1 semantics).
        rates = rates + [f.value * inp.value - absorbed]
        rates[0] = rates[0] + absorbed
    return Block(f"{drug} {n_compartments}-compartment PK", tuple(params), tuple(states),
                 tuple(rates), (inp,), tuple(outputs))


def target_mediated(drug: str, approximation: str = "full", *, amount_unit: str = "nmol",
                    volume_unit: str = "L", time_unit: str = "h") -> Block:
    """One-compartment target-mediated drug disposition (Mager & Jusko 2001).

    Full model (states are amounts in the central volume V)::

        dL/dt  = u/V - kel L - kon L R + koff RL
        dR/dt  = ksyn - kdeg R - kon L R + koff RL
        dRL/dt = kon L R - koff RL - kint RL

    Quasi-steady-state approximation (Gibiansky et al. 2008), states total drug and total
    target, free drug ``C = ((Ct - Rt - Kss) + sqrt((Ct - Rt - Kss)^2 + 4 Kss Ct)) / 2``::

        dCt/dt = u/V - kel C - kint Rt C / (Kss + C)
        dRt/dt = ksyn - kdeg Rt - (kint - kdeg) Rt C / (Kss + C)

    The target starts at its baseline ``ksyn / kdeg``. Outputs: free drug ``{drug}_cp``,
    total drug ``{drug}_ctot`` and target occupancy ``{drug}_occupancy``.
    """
    if approximation not in ("full", "qss"):
        raise ModelError(f"target_mediated {drug!r}: approximation must be 'full' or 'qss', "
                         f"got {approximation!r}")
    conc_unit = f"{amount_unit}/{volume_unit}"
    v = param(f"{drug}_v", volume_unit, "central volume of distribution")
    kel = param(f"{drug}_kel", f"1/{time_unit}", "linear elimination rate constant of free drug")
    ksyn = param(f"{drug}_ksyn", f"{conc_unit}/{time_unit}", "target synthesis rate")
    kdeg = param(f"{drug}_kdeg", f"1/{time_unit}", "target degradation rate constant")
    kint = param(f"{drug}_kint", f"1/{time_unit}", "internalisation rate constant of the complex")
    r0 = ksyn.sym / kdeg.sym  # baseline target in conc_unit (declared units agree)
    if approximation == "full":
        kon = param(f"{drug}_kon", f"{volume_unit}/{amount_unit}/{time_unit}",
                    "second-order association rate constant")
        koff = param(f"{drug}_koff", f"1/{time_unit}", "dissociation rate constant")
        free = state(f"{drug}_free", amount_unit, "free drug amount in the central volume")
        target = state(f"{drug}_target", amount_unit, "free target amount in the central volume",
                       initial=r0 * v.sym)
        complex_ = state(f"{drug}_complex", amount_unit, "drug-target complex amount")
        inp = drug_input(drug, amount_unit, f"{drug} given into the central volume",
                         bolus_state=free.name)
        c, r, rl = free.value / v.value, target.value / v.value, complex_.value / v.value
        binding = (kon.value * c * r - koff.value * rl) * v.value
        rates = (inp.value - kel.value * free.value - binding,
                 ksyn.value * v.value - kdeg.value * target.value - binding,
                 binding - kint.value * complex_.value)
        params = (v, kel, kon, koff, ksyn, kdeg, kint)
        states = (free, target, complex_)
        free_c, total_c, total_r = c, c + rl, r + rl
    else:
        kss = param(f"{drug}_kss", conc_unit, "quasi-steady-state constant (koff + kint) / kon")
        total = state(f"{drug}_total", amount_unit, "total (free + bound) drug amount")
        target = state(f"{drug}_target_total", amount_unit, "total (free + bound) target amount",
                       initial=r0 * v.sym)
        inp = drug_input(drug, amount_unit, f"{drug} given into the central volume",
                         bolus_state=total.name)
        ct, rt = total.value / v.value, target.value / v.value
        b = ct - rt - kss.value
        root = ca.sqrt(b * b + 4 * kss.value * ct)
        # the larger root of C^2 - b C - Kss Ct = 0, in the form without cancellation
        free_c = ca.if_else(b >= 0, 0.5 * (b + root), 2 * kss.value * ct / (root - b))
        bound_fraction = free_c / (kss.value + free_c)
        rates = (inp.value - (kel.value * free_c + kint.value * rt * bound_fraction) * v.value,
                 (ksyn.value - kdeg.value * rt - (kint.value - kdeg.value) * rt * bound_fraction)
                 * v.value)
        params = (v, kel, kss, ksyn, kdeg, kint)
        states = (total, target)
        total_c, total_r = ct, rt
    outputs = (output(f"{drug}_cp", conc_unit, f"free {drug} concentration", free_c),
               output(f"{drug}_ctot", conc_unit, f"total {drug} concentration", total_c),
               output(f"{drug}_occupancy", "1", "fraction of target bound",
                      (total_c - free_c) / total_r))
    return Block(f"{drug} TMDD ({approximation})", params, states, rates, (inp,), outputs)
