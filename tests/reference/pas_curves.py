#!/usr/bin/env python3
"""Generate reference PK/PD curves with python-anesthesia-simulator (PAS).

This script is NOT imported by the test-suite.  It must run in a separate
virtual environment that has PAS installed (PAS 1.0.0 pins control==0.9.4 and
needs numpy<2), e.g.::

    python3 -m venv /tmp/pasvenv
    /tmp/pasvenv/bin/pip install 'numpy<2' python-anesthesia-simulator
    /tmp/pasvenv/bin/python tests/reference/pas_curves.py \
        tests/reference/data/cases.json tests/reference/data

Input: a JSON file ``{"cases": [case, ...]}``; each case is::

    {
      "name": "c01_...",                      # CSV file stem
      "patient": [age_yr, height_cm, weight_kg, gender],   # gender 1 male, 0 female
      "propofol_model": "Schnider" | "Eleveld" | "Marsh_initial",
      "remifentanil_model": "Minto" | "Eleveld",
      "bis_params": {"c50p": .., "c50r": .., "gamma": .., "beta": .., "e0": .., "emax": ..},
      "propofol_segments": [[t_start_s, t_end_s, rate_mg_per_s], ...],
      "remifentanil_segments": [[t_start_s, t_end_s, rate_ug_per_s], ...],
      "duration_s": 2700,
      "output": {"dense_until_s": 300, "every_s": 5}
    }

Segments may overlap (rates add) and must start/end on whole seconds: PAS is
a discrete-time model with a 1 s zero-order hold, so with integer boundaries
its sampled output is the exact solution of the continuous model.

Output: ``<outdir>/<name>.csv`` with columns
``t_s, propofol_cp, propofol_ce, remifentanil_cp, remifentanil_ce, bis``
(propofol in ug/mL, remifentanil in ng/mL), sampled every second up to
``dense_until_s`` and every ``every_s`` seconds after that (plus the final
time), and ``<outdir>/pas_manifest.json`` with the PAS version and the
typical parameters PAS used for every case (recovered from its matrices).

What PAS does (v1.0.0, read from its source):
* ``Patient(...)`` computes James LBM, builds ``CompartmentModel`` objects
  whose states are CONCENTRATIONS [blood, fast periph., slow periph., BIS
  effect site, (MAP effect sites)], A in 1/s = A(1/min)/60, B = [1/V1, 0...],
  and discretises them with ``control.ss(...).sample(ts)`` (default 'zoh',
  i.e. exact matrix exponential); ``full_sim`` runs
  ``control.forced_response`` so row k is the state at t = k*ts with input
  u[k] held on [k*ts, (k+1)*ts).
* ke0: Schnider 0.456; Marsh_initial 0.26; Eleveld propofol arterial
  0.146*(W/70)^-0.25 (Patient passes no opiate/measurement argument, so
  Eleveld propofol always runs with opiates=True, arterial); Minto
  0.595-0.007*(age-40); Eleveld remifentanil 1.09*exp(-0.0289*(age-35)).
* BIS: ``BIS_model`` (Bouillon 2004 surface).  Default ('Bouillon') is
  c50p 4.47, c50r 19.3, gamma 1.43, beta 0, E0 97.4, Emax = E0; here the
  parameters are always passed explicitly via ``hill_param=[c50p, c50r,
  gamma, beta, E0, Emax]``.  PAS computes phi = Up/(Up+Ur+1e-6), so for
  beta != 0 its BIS differs from the exact formula by O(1e-6 * beta).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np


def _rates(segments, n_steps, label):
    """Per-second ZOH input vector (length n_steps) from (start, end, rate)."""
    u = np.zeros(n_steps)
    for seg in segments:
        start, end, rate = float(seg[0]), float(seg[1]), float(seg[2])
        if start != math.floor(start) or end != math.floor(end):
            raise ValueError(f"{label}: segment {seg} does not start/end on whole seconds")
        if end < start or start < 0:
            raise ValueError(f"{label}: bad segment {seg}")
        lo, hi = int(start), min(int(end), n_steps)
        if lo < hi:
            u[lo:hi] += rate
    return u


def _output_times(duration, dense_until, every):
    times = list(range(0, min(dense_until, duration) + 1))
    t = times[-1] + every
    while t <= duration:
        times.append(t)
        t += every
    if times[-1] != duration:
        times.append(duration)
    return np.array(times, dtype=int)


def _params_from_pas(pk):
    """Recover V/CL/ke0 from a PAS CompartmentModel (A in 1/s, conc. states)."""
    a = np.asarray(pk.A_init) * 60.0  # 1/min
    v1 = float(pk.v1)
    k12, k13 = a[0, 1], a[0, 2]
    k21, k31 = a[1, 0], a[2, 0]
    k10 = -a[0, 0] - k12 - k13
    ke0 = a[3, 0]
    cl2, cl3 = k12 * v1, k13 * v1
    return {
        "v1_l": v1, "v2_l": cl2 / k21, "v3_l": cl3 / k31,
        "cl1_l_per_min": k10 * v1, "cl2_l_per_min": cl2, "cl3_l_per_min": cl3,
        "ke0_per_min": float(ke0),
    }


def run_case(case, pas):
    duration = int(case["duration_s"])
    n = duration + 1  # samples t = 0..duration
    bp = case["bis_params"]
    hill = [bp["c50p"], bp["c50r"], bp["gamma"], bp["beta"], bp["e0"], bp["emax"]]
    patient = pas.Patient(list(case["patient"]),
                          model_propo=case["propofol_model"],
                          model_remi=case["remifentanil_model"],
                          hill_param=hill, ts=1, random_PK=False, random_PD=False,
                          save_data_bool=False)
    u_p = _rates(case.get("propofol_segments", []), n, case["name"] + "/propofol")
    u_r = _rates(case.get("remifentanil_segments", []), n, case["name"] + "/remifentanil")
    df = patient.full_sim(u_propo=u_p, u_remi=u_r)
    out = case.get("output", {})
    idx = _output_times(duration, int(out.get("dense_until_s", duration)),
                        int(out.get("every_s", 1)))
    cols = {
        "t_s": df["Time"].to_numpy()[idx],
        "propofol_cp": df["x_propo_1"].to_numpy()[idx],
        "propofol_ce": df["x_propo_4"].to_numpy()[idx],
        "remifentanil_cp": df["x_remi_1"].to_numpy()[idx],
        "remifentanil_ce": df["x_remi_4"].to_numpy()[idx],
        "bis": df["BIS"].to_numpy()[idx],
    }
    meta = {
        "propofol_params": _params_from_pas(patient.propo_pk),
        "remifentanil_params": _params_from_pas(patient.remi_pk),
        "lbm_james_kg": float(patient.lbm),
        "hill_param": [float(h) for h in patient.hill_param],
    }
    return cols, meta


def write_csv(path, cols):
    names = list(cols)
    n = len(cols[names[0]])
    with open(path, "w", encoding="ascii") as fh:
        fh.write(",".join(names) + "\n")
        for i in range(n):
            row = [str(int(cols["t_s"][i]))]
            row += ["%.12g" % float(cols[k][i]) for k in names[1:]]
            fh.write(",".join(row) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("cases_json")
    ap.add_argument("outdir")
    args = ap.parse_args(argv)

    import python_anesthesia_simulator as pas  # only available in the PAS venv
    try:
        from importlib.metadata import version
        pas_version = version("python_anesthesia_simulator")
        control_version = version("control")
    except Exception:  # pragma: no cover
        pas_version = control_version = "unknown"

    np.random.seed(0)  # PAS draws a noise sequence at Patient() even if unused
    with open(args.cases_json, encoding="utf-8") as fh:
        cases = json.load(fh)["cases"]
    os.makedirs(args.outdir, exist_ok=True)
    manifest = {"pas_version": pas_version, "control_version": control_version,
                "numpy_version": np.__version__, "cases": {}}
    for case in cases:
        cols, meta = run_case(case, pas)
        write_csv(os.path.join(args.outdir, case["name"] + ".csv"), cols)
        manifest["cases"][case["name"]] = meta
        print(f"{case['name']}: {len(cols['t_s'])} rows", file=sys.stderr)
    with open(os.path.join(args.outdir, "pas_manifest.json"), "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=1, sort_keys=True)
        fh.write("\n")


if __name__ == "__main__":
    main()
