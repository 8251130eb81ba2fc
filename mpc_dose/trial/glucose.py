"""Glucose control metrics: the international consensus CGM metrics, the Kovatchev risk
indices and the control-variability grid (the ``[metrics] clinical = "glucose"`` set).

Sources (each number below is declared once, with its source):

* Battelino T, Danne T, Bergenstal RM, et al. Clinical targets for continuous glucose
  monitoring data interpretation: recommendations from the International Consensus on Time
  in Range. Diabetes Care 2019;42(8):1593-1603. doi:10.2337/dci19-0028. Time in range
  70-180 mg/dL, below 70 and below 54 (level 2), above 180 and above 250 (level 2), mean
  glucose, GMI, coefficient of variation; the targets for most adults with type 1 or type 2
  diabetes (TIR > 70 %, below 70 < 4 %, below 54 < 1 %, above 180 < 25 %, above 250 < 5 %).
* Bergenstal RM, Beck RW, Close KL, et al. Glucose management indicator (GMI): a new term
  for estimating A1C from continuous glucose monitoring. Diabetes Care 2018;41(11):2275-80.
  doi:10.2337/dc18-1581. GMI (%) = 3.31 + 0.02392 x mean glucose [mg/dL].
* Kovatchev BP, Cox DJ, Gonder-Frederick LA, Clarke W. Symmetrization of the blood glucose
  measurement scale and its applications. Diabetes Care 1997;20(11):1655-8.
  doi:10.2337/diacare.20.11.1655; and Kovatchev BP et al., Diabetes Technol Ther
  2003;5(5):817-28 (the LBGI and HBGI). With BG in mg/dL, f = 1.509 (ln(BG)^1.084 - 5.381),
  risk r = 10 f^2; LBGI = (1/n) sum of r over readings with f < 0 (the others count 0),
  HBGI likewise over f > 0. The mean runs over *all* n readings, as Kovatchev defines it;
  simglucose (``analysis/risk.py``) instead averages only over the readings on that side,
  which gives a larger LBGI whenever some readings are high. The scale is defined on
  20-600 mg/dL (1.1-33.3 mmol/L): values outside are clipped to it (risk 100 at the ends).
* Magni L, Raimondo DM, Dalla Man C, Breton M, Patek S, De Nicolao G, Cobelli C, Kovatchev
  BP. Evaluating the efficacy of closed-loop glucose regulation via control-variability
  grid analysis. J Diabetes Sci Technol 2008;2(4):630-5. doi:10.1177/193229680800200414.
  One point per subject: x the lowest glucose of the period clipped to 50-110 mg/dL
  (axis drawn from 110 on the left to 50 on the right), y the highest clipped to
  110-400 mg/dL; the 3 x 3 grid of :data:`CVGA_GRID`.

Which signal a metric reads is part of its name, as in :mod:`~mpc_dose.trial.metrics`:
``true`` (the patient's blood glucose at every record, each record counting for the time
until the next one) or ``measured`` (the CGM's valid readings at their sample times, each
counting once: the consensus's "% of readings", which is % of time for a regular sensor;
dropouts are left out). Names: ``tir_70_180_<signal>_pct``, ``tbr_70_...``, ``tbr_54_...``,
``tar_180_...``, ``tar_250_...``, ``gmi_<signal>_pct``, ``lbgi_<signal>``, ``hbgi_<signal>``,
``mean_<output>_<signal>_<unit>``, ``sd_<output>_<signal>_<unit>``,
``cv_<output>_<signal>_pct``, ``cvga_min_<output>_<signal>_mg_per_dL`` /
``cvga_max_...`` (the grid's clipped coordinates) and ``cvga_zone_<a-e>_<signal>_pct``
(100 when the patient's point lies in that zone, else 0: the mean over patients is the share
of patients in the zone).

Glucose comes in mg/dL or mmol/L (any unit of mass or substance per volume): the thresholds
are the consensus's mg/dL, the mean and SD keep the output's declared unit.
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError

__all__ = ["MG_PER_DL_PER_MMOL_PER_L", "CONSENSUS_TARGETS_PCT", "CVGA_GRID", "CVGA_ZONES",
           "glucose_in_mg_per_dL", "risk_scale", "glucose_metrics", "cvga_point",
           "cvga_zone", "clinical_glucose_metrics", "clock_hours"]

#: [mg/dL per mmol/L] glucose: its molar mass 180.16 g/mol (C6H12O6) / 10 dL/L
MG_PER_DL_PER_MMOL_PER_L = 18.016

# --- Battelino 2019 (Diabetes Care 42:1593): the glucose ranges [mg/dL]
#: [mg/dL] the target range, both ends included
RANGE_LOW_MG_PER_DL, RANGE_HIGH_MG_PER_DL = 70.0, 180.0
#: [mg/dL] level 2 hypoglycaemia: below 54
LEVEL2_LOW_MG_PER_DL = 54.0
#: [mg/dL] level 2 hyperglycaemia: above 250
LEVEL2_HIGH_MG_PER_DL = 250.0
#: [%] the consensus targets for most adults with type 1 or type 2 diabetes:
#: metric stem -> (">" or "<", percent of readings)
CONSENSUS_TARGETS_PCT = {"tir_70_180": (">", 70.0), "tbr_70": ("<", 4.0),
                         "tbr_54": ("<", 1.0), "tar_180": ("<", 25.0), "tar_250": ("<", 5.0)}

# --- Bergenstal 2018 (Diabetes Care 41:2275): GMI (%) = 3.31 + 0.02392 x mean [mg/dL]
GMI_INTERCEPT_PCT = 3.31
GMI_SLOPE_PCT_PER_MG_PER_DL = 0.02392

# --- Kovatchev 1997 (Diabetes Care 20:1655): the symmetrised BG scale, BG in mg/dL
RISK_SCALE, RISK_EXPONENT, RISK_SHIFT = 1.509, 1.084, 5.381
RISK_FACTOR = 10.0
#: [mg/dL] the range the scale is built on (1.1-33.3 mmol/L)
RISK_DOMAIN_MG_PER_DL = (20.0, 600.0)

# --- Magni 2008 (J Diabetes Sci Technol 2:630): the control-variability grid [mg/dL]
#: x: the lowest glucose, clipped to [50, 110]; column edges from the left (110) rightwards
CVGA_MIN_AXIS_MG_PER_DL = (110.0, 90.0, 70.0, 50.0)
#: y: the highest glucose, clipped to [110, 400]; row edges from the bottom upwards
CVGA_MAX_AXIS_MG_PER_DL = (110.0, 180.0, 300.0, 400.0)
#: the zones, rows from the bottom (max <= 180, <= 300, above) and columns from the left
#: (min >= 90, >= 70, below). A boundary value belongs to the better cell: a lowest glucose
#: of exactly 90 is in the left column, a highest of exactly 180 in the bottom row (as the
#: target range 70-180 includes its ends).
CVGA_GRID = (("A", "Lower B", "Lower C"),
             ("Upper B", "B", "Lower D"),
             ("Upper C", "Upper D", "E"))
#: the zone letters counted (lower / upper B, C, D count as B, C, D)
CVGA_ZONES = ("A", "B", "C", "D", "E")


def glucose_in_mg_per_dL(values, unit: str, *, what: str = "glucose") -> np.ndarray:
    """*values* in *unit* (a mass or an amount of substance per volume: mg/dL, mmol/L, g/L,
    ...) as mg/dL; glucose is 18.016 mg/dL per mmol/L.

    Raises
    ------
    ConfigError
        When *unit* is neither a mass nor a substance concentration (*what* names the
        values).
    """
    from ..units import conversion_factor, parse_unit

    values = np.asarray(values, dtype=float)
    dimension = dict(parse_unit(unit).dimension)
    if dimension == {"mass": 1, "volume": -1}:
        return values * conversion_factor(unit, "mg/dL", what=what)
    if dimension == {"substance": 1, "volume": -1}:
        return values * conversion_factor(unit, "mmol/L", what=what) * \
            MG_PER_DL_PER_MMOL_PER_L
    raise ConfigError(f"{what}: unit {unit!r} is not a glucose concentration; expected mg/dL "
                      f"or mmol/L (a mass or amount of substance per volume)")


def risk_scale(bg_mg_per_dL) -> np.ndarray:
    """Kovatchev's symmetrised glucose f(BG) = 1.509 (ln(BG)^1.084 - 5.381), BG in mg/dL
    clipped to the scale's 20-600 mg/dL: 0 at about 112.5 mg/dL, negative below."""
    bg = np.clip(np.asarray(bg_mg_per_dL, dtype=float), *RISK_DOMAIN_MG_PER_DL)
    return RISK_SCALE * (np.log(bg) ** RISK_EXPONENT - RISK_SHIFT)


def _unit_token(unit: str) -> str:
    from ..units import unit_to_token

    return unit_to_token(unit)


def glucose_metrics(glucose, unit: str, *, signal: str, output: str = "glucose",
                    weights=None) -> dict[str, float]:
    """The consensus CGM metrics, LBGI/HBGI and the CVGA point of one patient's *glucose*
    (in *unit*, read from *signal*: ``"true"`` or ``"measured"``; see the module docstring
    for the names). *weights* are what each value counts for (e.g. the time until the next
    record); equal when not given. NaN values (no valid reading) are left out; with none
    left, every metric is NaN.

    Raises
    ------
    ConfigError
        When *unit* is not a glucose concentration or *signal* is neither true nor measured.
    """
    if signal not in ("true", "measured"):
        raise ConfigError(f"glucose metrics: signal {signal!r}; expected 'true' or "
                          f"'measured'")
    native = np.asarray(glucose, dtype=float)
    w = np.ones_like(native) if weights is None else np.asarray(weights, dtype=float)
    if w.shape != native.shape:
        raise ConfigError(f"glucose metrics: {w.size} weights for {native.size} values")
    bg = glucose_in_mg_per_dL(native, unit, what=f"{output} ({signal})")
    keep = np.isfinite(bg) & (w > 0)
    bg, native, w = bg[keep], native[keep], w[keep]
    token = _unit_token(unit)
    stems = ("tir_70_180", "tbr_70", "tbr_54", "tar_180", "tar_250")
    names = [f"{s}_{signal}_pct" for s in stems] + [
        f"mean_{output}_{signal}_{token}", f"sd_{output}_{signal}_{token}",
        f"cv_{output}_{signal}_pct", f"gmi_{signal}_pct", f"lbgi_{signal}",
        f"hbgi_{signal}", f"cvga_min_{output}_{signal}_mg_per_dL",
        f"cvga_max_{output}_{signal}_mg_per_dL"] + [
        f"cvga_zone_{z.lower()}_{signal}_pct" for z in CVGA_ZONES]
    if bg.size == 0:
        return dict.fromkeys(names, float("nan"))
    total = float(w.sum())

    def share(mask: np.ndarray) -> float:
        return float(w[mask].sum() / total * 100.0)

    mean = float(np.average(native, weights=w))
    sd = float(np.sqrt(np.average((native - mean) ** 2, weights=w)))
    mean_mg_per_dL = float(np.average(bg, weights=w))
    f = risk_scale(bg)
    risk = RISK_FACTOR * f ** 2
    x, y = cvga_point(bg.min(), bg.max())
    zone = cvga_zone(x, y)[-1]   # the letter: "Lower B" -> "B"
    values = [share((bg >= RANGE_LOW_MG_PER_DL) & (bg <= RANGE_HIGH_MG_PER_DL)),
              share(bg < RANGE_LOW_MG_PER_DL), share(bg < LEVEL2_LOW_MG_PER_DL),
              share(bg > RANGE_HIGH_MG_PER_DL), share(bg > LEVEL2_HIGH_MG_PER_DL),
              mean, sd, sd / mean * 100.0 if mean > 0 else float("nan"),
              GMI_INTERCEPT_PCT + GMI_SLOPE_PCT_PER_MG_PER_DL * mean_mg_per_dL,
              # Kovatchev: the mean over all readings, those on the other side count 0
              float(np.average(np.where(f < 0, risk, 0.0), weights=w)),
              float(np.average(np.where(f > 0, risk, 0.0), weights=w)), x, y] + [
        100.0 if zone == z else 0.0 for z in CVGA_ZONES]
    return dict(zip(names, (float(v) for v in values)))


def cvga_point(lowest_mg_per_dL: float, highest_mg_per_dL: float) -> tuple[float, float]:
    """A subject's CVGA coordinates [mg/dL]: the lowest glucose clipped to 50-110, the
    highest clipped to 110-400 (Magni 2008)."""
    x_edges, y_edges = CVGA_MIN_AXIS_MG_PER_DL, CVGA_MAX_AXIS_MG_PER_DL
    return (float(np.clip(lowest_mg_per_dL, x_edges[-1], x_edges[0])),
            float(np.clip(highest_mg_per_dL, y_edges[0], y_edges[-1])))


def cvga_zone(lowest_mg_per_dL: float, highest_mg_per_dL: float) -> str:
    """The CVGA zone ("A", "Lower B", "B", "Upper B", "Lower C", "Upper C", "Lower D",
    "Upper D", "E") of a subject whose glucose ranged over [*lowest*, *highest*] mg/dL; a
    value on a boundary belongs to the better cell (:data:`CVGA_GRID`)."""
    x, y = cvga_point(lowest_mg_per_dL, highest_mg_per_dL)
    _, x_a, x_b, _ = CVGA_MIN_AXIS_MG_PER_DL
    _, y_a, y_b, _ = CVGA_MAX_AXIS_MG_PER_DL
    column = 0 if x >= x_a else 1 if x >= x_b else 2
    row = 0 if y <= y_a else 1 if y <= y_b else 2
    return CVGA_GRID[row][column]


def clock_hours(time_s, start_clock_h: float | None) -> np.ndarray:
    """The clock time [h, 0-24) of each *time_s* of a run that starts at *start_clock_h*
    (0:00 when not given, as the scenario's clock)."""
    return (np.asarray(time_s, dtype=float) / 3600.0 + (start_clock_h or 0.0)) % 24.0


def _durations(t: np.ndarray) -> np.ndarray:
    """How long each record stands for: until the next one, the last for the step before it
    (as :mod:`~mpc_dose.trial.metrics` counts time)."""
    from .metrics import _durations as durations

    return durations(t) if t.size else t


def clinical_glucose_metrics(time_s, true, true_unit: str, reading_times_s, readings,
                             readings_unit: str | None, *, output: str) -> dict[str, float]:
    """The ``glucose`` clinical set of one run: :func:`glucose_metrics` on the true blood
    glucose at every record (*time_s*, *true* in *true_unit*; each record counts for the
    time until the next one) and on the CGM's valid readings at their sample times
    (*readings* in *readings_unit*, each counting once); no ``measured`` terms without
    readings (*readings_unit* None)."""
    t = np.asarray(time_s, dtype=float)
    out = glucose_metrics(true, true_unit, signal="true", output=output,
                          weights=_durations(t))
    if readings_unit is not None:
        out.update(glucose_metrics(readings, readings_unit, signal="measured",
                                   output=output))
    return out
