"""Validate the anaesthesia library models against two independent implementations.

Runs the 13 cross-check cases of ``tests/reference/data/cases.json`` (4 patients; Schnider,
Marsh and Eleveld propofol; Minto and Eleveld remifentanil; bolus as a short infusion,
maintenance and stepped infusions, both drugs; Bouillon BIS with beta 0 and 0.5) through
``mpc-dose simulate`` (in-process, ``mpc_dose.cli.main``) and compares the output with

* the independent numpy/scipy reference ``tests/reference/anaesthesia.py`` (Eleveld propofol
  on the unrounded NONMEM thetas), and
* the stored python-anesthesia-simulator (PAS 1.0.0) curves ``tests/reference/data/c*.csv``.
  PAS has documented parameter slips for Eleveld remifentanil (V2ref 8.882, no KSEX on V2)
  and Marsh (rounded V2/V3 per kg); those entries are starred and left out of the PAS
  summary (see tests/reference/README.md).

Metrics, on the PAS time grid (every 1 s to 300 s, then every 5 s): max |diff| / peak of each
concentration curve (peak of the comparison curve; for a drug not given, max |value|) and
max |BIS diff|. Requirement (issue "done when"): 1e-3 of peak and 0.05 BIS against the
reference. Exit status 1 if it is not met.

Usage, from the repository root::

    python benchmarks/validate_anaesthesia.py          # through the CLI (default)
    python benchmarks/validate_anaesthesia.py --api    # through mpc_dose.model.simulate
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.reference import anaesthesia as ref  # noqa: E402

from mpc_dose.cli import main as cli_main  # noqa: E402
from mpc_dose.model.dosing import Dose  # noqa: E402
from mpc_dose.model.library import load  # noqa: E402
from mpc_dose.model.simulation import simulate  # noqa: E402

DATA = ROOT / "tests" / "reference" / "data"
REQ_REL, REQ_BIS = 1e-3, 0.05
PROPOFOL_ENTRY = {"Schnider": "propofol-schnider", "Marsh_initial": "propofol-marsh",
                  "Eleveld": "propofol-eleveld"}
REMIFENTANIL_ENTRY = {"Minto": "remifentanil-minto", "Eleveld": "remifentanil-eleveld"}
SHORT = {"Schnider": "Schnider", "Marsh_initial": "Marsh", "Eleveld": "Eleveld",
         "Minto": "Minto"}
CURVES = ("propofol_cp", "propofol_ce", "remifentanil_cp", "remifentanil_ce")
COLUMNS = {"propofol_cp": "propofol_cp_ug_per_mL", "propofol_ce": "propofol_ce_ug_per_mL",
           "remifentanil_cp": "remifentanil_cp_ng_per_mL",
           "remifentanil_ce": "remifentanil_ce_ng_per_mL", "bis": "bis_unitless"}
BIS_KEYS = ("c50p", "c50r", "gamma", "beta", "e0", "emax")
PAS_RIGHT = {"propofol": {"Schnider", "Eleveld"}, "remifentanil": {"Minto"}}


def model_name(case: dict) -> str:
    return (f"{PROPOFOL_ENTRY[case['propofol_model']]}+"
            f"{REMIFENTANIL_ENTRY[case['remifentanil_model']]}+bis-bouillon")


def covariates(case: dict) -> dict:
    age, height, weight, gender = case["patient"]
    return {"age": age, "height_cm": height, "weight_kg": weight,
            "sex": "male" if gender else "female"}


def reference(case: dict, t: np.ndarray) -> dict[str, np.ndarray]:
    age, height, weight, gender = case["patient"]
    male = bool(gender)
    pp = {"Schnider": lambda: ref.schnider_propofol(age, height, weight, male),
          "Marsh_initial": lambda: ref.marsh_propofol(weight),
          "Eleveld": lambda: ref.eleveld_propofol(
              age, height, weight, male, theta=ref.ELEVELD_PROPOFOL_THETA_NONMEM),
          }[case["propofol_model"]]()
    rp = {"Minto": lambda: ref.minto_remifentanil(age, height, weight, male),
          "Eleveld": lambda: ref.eleveld_remifentanil(age, height, weight, male),
          }[case["remifentanil_model"]]()
    p = ref.simulate_three_compartment(pp, case["propofol_segments"], t)
    r = ref.simulate_three_compartment(rp, case["remifentanil_segments"], t)
    b = case["bis_params"]
    return {"propofol_cp": p["cp"], "propofol_ce": p["ce"], "remifentanil_cp": r["cp"],
            "remifentanil_ce": r["ce"],
            "bis": np.asarray(ref.bouillon_bis(p["ce"], r["ce"], *(b[k] for k in BIS_KEYS)))}


def package_via_cli(case: dict, t: np.ndarray, workdir: Path) -> dict[str, np.ndarray]:
    """``mpc-dose simulate`` at a 1-s step, rows picked at the (integer) times *t*."""
    doses = workdir / f"{case['name']}_doses.csv"
    lines = ["time_s,input,rate_ug_per_s,duration_s"]
    for drug, factor in (("propofol", 1000.0), ("remifentanil", 1.0)):  # mg/s -> ug/s
        for a, b, r in case[f"{drug}_segments"]:
            lines.append(f"{a!r},{drug},{r * factor!r},{b - a!r}")
    doses.write_text("\n".join(lines) + "\n")
    out = workdir / f"{case['name']}_out.csv"
    bis = ",".join(f"bis_{k}={case['bis_params'][k]!r}" for k in BIS_KEYS)
    argv = ["simulate", "--model", model_name(case),
            "--covariates", ",".join(f"{k}={v}" for k, v in covariates(case).items()),
            "--params", bis, "--doses", str(doses), "--duration", str(case["duration_s"]),
            "--step", "1", "--out", str(out)]
    with contextlib.redirect_stdout(io.StringIO()):
        status = cli_main(argv)
    if status != 0:
        raise SystemExit(f"{case['name']}: mpc-dose simulate failed with status {status}")
    df = pd.read_csv(out)
    rows = np.searchsorted(df["time_s"].to_numpy(float), t)
    if not np.array_equal(df["time_s"].to_numpy(float)[rows], t):
        raise SystemExit(f"{case['name']}: CLI output misses some comparison times")
    return {k: df[c].to_numpy(float)[rows] for k, c in COLUMNS.items()}


def package_via_api(case: dict, t: np.ndarray) -> dict[str, np.ndarray]:
    lm = load(model_name(case))
    params = lm.population.typical_parameters(covariates(case))
    params.update({f"bis_{k}": float(v) for k, v in case["bis_params"].items()})
    doses = [Dose.infusion(a, "propofol", r, b - a) for a, b, r in case["propofol_segments"]]
    doses += [Dose.infusion(a, "remifentanil", r, b - a)
              for a, b, r in case["remifentanil_segments"]]
    res = simulate(lm.model, params, doses, t)
    return {k: res.output(k) for k in CURVES + ("bis",)}


def rel_to_peak(x, y) -> float:
    x, y = np.asarray(x, float), np.asarray(y, float)
    peak = np.max(np.abs(y))
    return float(np.max(np.abs(x - y)) / peak) if peak > 0 else float(np.max(np.abs(x)))


def metrics(got: dict, want: dict) -> list[float]:
    return [rel_to_peak(got[c], want[c]) for c in CURVES] + \
        [float(np.max(np.abs(got["bis"] - want["bis"])))]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--api", action="store_true",
                        help="call mpc_dose.model.simulate directly instead of the CLI")
    args = parser.parse_args(argv)
    cases = json.loads((DATA / "cases.json").read_text())["cases"]
    started = time.perf_counter()
    header = (f"{'case':<30} {'model (propofol/remi)':<18} {'vs':<4} "
              f"{'prop cp':>8} {'prop ce':>8} {'remi cp':>8} {'remi ce':>8} {'BIS abs':>8}")
    print(f"mpc_dose via {'simulate()' if args.api else 'mpc-dose simulate (CLI)'}; "
          f"max |diff|/peak per curve, max |BIS diff|; '*' = known PAS slip, not counted")
    print(header)
    print("-" * len(header))
    worst_ref = np.zeros(5)
    worst_pas = np.zeros(5)
    per_model: dict[str, float] = {}
    per_model_pas: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            pas = pd.read_csv(DATA / f"{case['name']}.csv")
            t = pas["t_s"].to_numpy(float)
            got = package_via_api(case, t) if args.api else package_via_cli(case, t, Path(tmp))
            m_ref = metrics(got, reference(case, t))
            m_pas = metrics(got, {k: pas[k].to_numpy(float) for k in CURVES + ("bis",)})
            p_model, r_model = case["propofol_model"], case["remifentanil_model"]
            given = {"propofol": bool(case["propofol_segments"]),
                     "remifentanil": bool(case["remifentanil_segments"])}
            pas_ok = {d: (m in PAS_RIGHT[d]) or not given[d]
                      for d, m in (("propofol", p_model), ("remifentanil", r_model))}
            pas_ok_all = pas_ok["propofol"] and pas_ok["remifentanil"]
            label = f"{SHORT[p_model] if given['propofol'] else '-'}/" \
                    f"{SHORT[r_model] if given['remifentanil'] else '-'}"
            print(f"{case['name']:<30} {label:<18} {'ref':<4} "
                  + " ".join(f"{x:8.1e}" for x in m_ref))
            flags = [not pas_ok["propofol"]] * 2 + [not pas_ok["remifentanil"]] * 2 \
                + [not pas_ok_all]
            print(f"{'':<30} {'':<18} {'PAS':<4} "
                  + " ".join(f"{x:7.1e}{'*' if f else ' '}" for x, f in zip(m_pas, flags)))
            worst_ref = np.maximum(worst_ref, m_ref)
            counted = [x if not f else 0.0 for x, f in zip(m_pas, flags)]
            worst_pas = np.maximum(worst_pas, counted)
            for drug, model, k in (("propofol", p_model, 0), ("remifentanil", r_model, 2)):
                if not given[drug]:
                    continue
                key = f"{drug} {SHORT[model]}"
                per_model[key] = max(per_model.get(key, 0.0), *m_ref[k:k + 2])
                if pas_ok[drug]:
                    per_model_pas[key] = max(per_model_pas.get(key, 0.0), *m_pas[k:k + 2])
    print("-" * len(header))
    print("worst |diff|/peak per model vs reference: "
          + ", ".join(f"{k} {v:.1e}" for k, v in per_model.items()))
    print("worst |diff|/peak per model vs PAS (where PAS is right): "
          + ", ".join(f"{k} {v:.1e}" for k, v in per_model_pas.items()))
    print(f"pas_worst_rel_peak={worst_pas[:4].max():.3e} pas_worst_bis_abs={worst_pas[4]:.3e} "
          f"(PAS-slip entries excluded)")
    print(f"elapsed {time.perf_counter() - started:.1f} s; requirement {REQ_REL:g} of peak, "
          f"{REQ_BIS:g} BIS")
    worst_rel, worst_bis = worst_ref[:4].max(), worst_ref[4]
    print(f"worst_rel_peak={worst_rel:.3e} worst_bis_abs={worst_bis:.3e}")
    return 0 if worst_rel <= REQ_REL and worst_bis <= REQ_BIS else 1


if __name__ == "__main__":
    sys.exit(main())
