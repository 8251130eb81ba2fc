"""Model files (issue 17.1, "bring your own model"): library entries written as TOML give
exactly the library's model, relations are parsed without eval, bad files are refused with
file, line, key and expectation."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpc_dose.cli import main
from mpc_dose.control.estimation import EstimationConfig, map_fit
from mpc_dose.errors import ModelError
from mpc_dose.model.dosing import Dose
from mpc_dose.model.expression import ExpressionError, parse_expression
from mpc_dose.model.library import load, relocate, resolve
from mpc_dose.model.library.base import compose
from mpc_dose.model.modelfile import FileEntry, parse_model_file
from mpc_dose.model.simulation import simulate
from tests.test_map import DOSES, LEVELS, PATIENT

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "scenarios" / "models"
H = 3600.0

#: each shipped file, the library name it copies, covariate sets and a dosing to simulate
COPIES = {
    "vancomycin-goti": (
        "vancomycin-goti",
        [PATIENT, {"crcl": 200, "weight": 95.5, "dialysis": "yes"},
         {"crcl": 12, "weight": 48, "dialysis": "no"}],
        [Dose.from_record(0, "vancomycin", amount=1500, duration_s=H),
         Dose.from_record(12 * H, "vancomycin", amount=1000, duration_s=2 * H)]),
    "propofol-schnider": (
        "propofol-schnider",
        [{"age": 35, "height": 170, "weight": 70, "sex": "male"},
         {"age": 81, "height": 152, "weight": 44.5, "sex": "female"},
         {"age": 20, "height": 201, "weight": 140, "sex": "male"}],
        [Dose.from_record(0, "propofol", amount=140, duration_s=30),
         Dose.from_record(60, "propofol", amount=600, duration_s=3600)]),
    "fluorouracil-circadian": (
        "fluorouracil-circadian", [{}],
        [Dose.from_record(0, "fluorouracil", amount=2400, duration_s=46 * H)]),
}


def _file(stem: str) -> str:
    return str(MODELS / f"{stem}.toml")


def _signals(model):
    return [[(x.name, unit(x), x.doc) for x in items] for items, unit in (
        (model.params, lambda p: (p.unit, p.domain)), (model.states, lambda s: s.unit),
        (model.inputs, lambda i: (i.amount_unit, i.bolus_state, i.bioavailability, i.lag)),
        (model.outputs, lambda o: o.unit))]


@pytest.mark.parametrize("stem", list(COPIES))
def test_file_declares_the_library_entry(stem):
    """Same signals and parameters (units, meanings, domains), fixed effects (values, units,
    references), covariates, Omega, IOV, residual error, circadian terms, title, notes."""
    name, _, _ = COPIES[stem]
    mine, theirs = load(_file(stem)), load(name)
    assert _signals(mine.model) == _signals(theirs.model)
    assert mine.model.doc == theirs.model.doc and mine.references == theirs.references
    a, b = mine.population, theirs.population
    assert a.thetas == b.thetas and a.covariates == b.covariates
    assert a.eta_names == b.eta_names and np.array_equal(a.omega, b.omega)
    assert a.occasion_effects == b.occasion_effects
    assert a.residual_errors == b.residual_errors
    (e,), (lib,) = mine.entries, theirs.entries
    assert isinstance(e, FileEntry) and e.name == lib.name
    assert (e.title, e.notes, e.circadian, e.references) == \
        (lib.title, lib.notes, lib.circadian, lib.references)


@pytest.mark.parametrize("stem", list(COPIES))
def test_file_gives_the_same_patients_and_simulation(stem):
    """Typical values are equal to the last bit for every covariate set; individuals drawn
    with the same generator are equal; their simulations agree to 1e-10."""
    name, covariate_sets, doses = COPIES[stem]
    mine, theirs = load(_file(stem)), load(name)
    times = np.linspace(0, 48 * H, 97)
    for k, covariates in enumerate(covariate_sets):
        assert mine.population.typical_parameters(covariates) == \
            theirs.population.typical_parameters(covariates)
        a = mine.population.sample(covariates, np.random.default_rng(k))
        b = theirs.population.sample(covariates, np.random.default_rng(k))
        assert a.params == b.params and a.eta == b.eta
        clock = {"clock_time_at_t0": 22.0} if "clock_time_at_t0" in mine.model.param_names \
            else {}
        ya = simulate(mine.model, {**a.params, **clock}, doses, times)
        yb = simulate(theirs.model, {**b.params, **clock}, doses, times)
        assert np.abs(ya.states - yb.states).max() <= 1e-10
        assert np.abs(ya.outputs - yb.outputs).max() <= 1e-10
        assert np.array_equal(ya.inputs, yb.inputs) and np.array_equal(ya.params, yb.params)


def test_file_gives_the_same_map_estimate():
    """The done-when of issue 17.1: map_fit on the Goti case of test_map gives the same etas
    and objective from the file as from the library entry."""
    config = EstimationConfig("vancomycin_cp")
    mine = map_fit(load(_file("vancomycin-goti")), PATIENT, config, DOSES, LEVELS)
    theirs = map_fit(load("vancomycin-goti"), PATIENT, config, DOSES, LEVELS)
    assert mine.success and theirs.success
    assert mine.eta.keys() == theirs.eta.keys()
    for k in theirs.eta:
        assert mine.eta[k] == pytest.approx(theirs.eta[k], abs=1e-10)
    assert mine.objective == pytest.approx(theirs.objective, abs=1e-10)


def test_files_compose_with_library_entries(tmp_path):
    """A file composes with '+' like an entry, before a PD entry or as a PD-only file after a
    library PK entry; both give the library's composition."""
    pd_file = tmp_path / "bis-hill.toml"
    pd_file.write_text(_BIS_PROPOFOL)
    reference = load("propofol-schnider+bis-propofol")
    for name in (f"{_file('propofol-schnider')}+bis-propofol",
                 f"propofol-schnider+{pd_file}"):
        lm = load(name)
        assert _signals(lm.model) == _signals(reference.model)
        assert np.array_equal(lm.population.omega, reference.population.omega)
        man = {"age": 35, "height": 170, "weight": 70, "sex": "male"}
        assert lm.population.typical_parameters(man) == \
            reference.population.typical_parameters(man)
    assert parse_model_file(_BIS_PROPOFOL, source="x", name="x").requires == ("propofol_ce",)
    with pytest.raises(ModelError, match=r"bis-hill.toml:\d+: \[\[blocks\]\] #1 driver: no "
                                         r"output 'propofol_ce'.*'pk.toml\+this.toml'"):
        load(str(pd_file))


_BIS_PROPOFOL = """
[model]
title = "BIS, single-drug sigmoid Emax of propofol (Bouillon 2004 propofol-alone values)"
[references]
bouillon = "Bouillon TW, Bruhn J, Radulescu L, et al. Pharmacodynamic interaction between propofol and remifentanil regarding hypnosis, tolerance of laryngoscopy, bispectral index, and electroencephalographic approximate entropy. Anesthesiology 2004;100(6):1353-72. doi:10.1097/00000542-200406000-00006"
[[blocks]]
type = "emax_effect"
name = "bis"
driver = "propofol_ce"
direction = "inhibitory"
sigmoid = true
[fixed_effects]
c50p = { value = 4.47, unit = "ug/mL", doc = "propofol Ce at half-maximal BIS effect alone", reference = "bouillon" }
gamma = { value = 1.43, unit = "1", doc = "steepness", reference = "bouillon" }
e0 = { value = 97.4, unit = "1", doc = "awake BIS", reference = "bouillon" }
emax = { value = 97.4, unit = "1", doc = "maximal BIS decrease", reference = "bouillon" }
[parameters]
bis_e0 = "e0"
bis_emax = "emax"
bis_c50 = "c50p"
bis_gamma = "gamma"
[omega]
bis_c50 = { cv = 0.182 }
bis_gamma = { cv = 0.304 }
"""


def test_readme_worked_example_is_a_working_model():
    """The complete example of scenarios/models/README.md loads, draws a patient with its
    correlated Omega, and simulates an oral dose with lag, bioavailability and effect."""
    text = (MODELS / "README.md").read_text(encoding="utf-8")
    example, = re.findall(r"```toml\n(.*?)```", text, flags=re.S)
    lm = compose("example", [parse_model_file(example, source="README.md", name="example")])
    pop = lm.population
    assert pop.omega[0, 1] == pytest.approx(0.5 * math.sqrt(math.log1p(0.09) * 0.04))
    assert pop.omega[2, 2] == 0.25 and [r.param for r in pop.occasion_effects] == ["drugx_ka"]
    assert pop.residual_error("drugx_cp").additive == pytest.approx(0.05)  # 50 ug/L in mg/L
    patient = {"weight": 70, "crcl": 240, "age": 50, "dialysis": "yes"}
    typical = pop.typical_parameters(patient)
    assert typical["drugx_cl1"] == pytest.approx(5.0 * (150 / 120) ** 0.8 * 0.7)
    assert typical["drugx_f"] == 0.8 and typical["drugx_ka"] == 1.2  # default: tablet
    capsule = pop.typical_parameters({**patient, "formulation": "capsule"})
    assert capsule["drugx_f"] == pytest.approx(0.7)
    solution = pop.typical_parameters({**patient, "formulation": "Solution"})
    assert solution["drugx_ka"] == pytest.approx(3.0)
    individual = pop.sample(patient, np.random.default_rng(3))
    result = simulate(lm.model, individual.params,
                      [Dose.from_record(0, "drugx", amount=500)], np.linspace(0, 12 * H, 49))
    cp, effect = result.output("drugx_cp"), result.output("effect")
    assert cp[1] == 0 and cp.max() > 1 and effect[0] == 100 and effect.min() < 90


def _readme_model_file() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return dict(re.findall(r"```toml\n# (\S+\.toml)\n(.*?)```", text, flags=re.S))[
        "my_vanco.toml"]


def test_main_readme_example_is_goti():
    """The worked example of the main README (Goti written with THETAs and inline constants)
    gives the library entry's typical values for every covariate set, its Omega and its
    residual error; and the error the README shows for a misspelt covariate is the one the
    reader gives, word for word."""
    text = _readme_model_file()
    mine = compose("my_vanco", [parse_model_file(text, source="my_vanco.toml",
                                                 name="my_vanco")])
    theirs = load("vancomycin-goti")
    for covariates in COPIES["vancomycin-goti"][1]:
        assert mine.population.typical_parameters(covariates) == \
            pytest.approx(theirs.population.typical_parameters(covariates), rel=1e-15)
    assert mine.population.eta_names == theirs.population.eta_names
    assert np.array_equal(mine.population.omega, theirs.population.omega)
    assert mine.population.residual_errors == theirs.population.residual_errors
    shown, = re.findall(r"^(my_vanco\.toml:\d+: .*)$",
                        (REPO / "README.md").read_text(encoding="utf-8"), flags=re.M)
    with pytest.raises(ModelError) as raised:
        parse_model_file(text.replace("min(crcl,", "min(crlc,"), source="my_vanco.toml",
                         name="my_vanco")
    assert str(raised.value) == shown


def test_format_document_names_every_table_block_and_kind():
    """scenarios/models/README.md documents every table, block type, variability form and
    residual kind the reader accepts (a new one must be documented to pass)."""
    from mpc_dose.model import modelfile

    doc = (MODELS / "README.md").read_text(encoding="utf-8")
    for section in modelfile._SECTIONS:
        assert re.search(rf"\*\*`\[{{1,2}}{section}(\.<output>)?\]{{1,2}}`\*\*", doc), section
    for name in [*modelfile.BLOCK_TYPES, *modelfile._ERROR_KINDS]:
        assert f"`{name}`" in doc or f'"{name}"' in doc, name
    for key in modelfile._VARIABILITY_KEYS:
        assert f"{{ {key} = " in doc, key


def test_models_command_prints_a_file_like_its_entry(capsys):
    """`mpc-dose models FILE` prints what `mpc-dose models NAME` does, but the first line."""
    assert main(["models", _file("vancomycin-goti")]) == 0
    mine = capsys.readouterr().out.splitlines()
    assert main(["models", "vancomycin-goti"]) == 0
    theirs = capsys.readouterr().out.splitlines()
    assert mine[1:] == theirs[1:] and mine[0].endswith(theirs[0].split(": ", 1)[1])


def test_relative_paths_resolve_against_a_folder(tmp_path, monkeypatch):
    """load takes a relative path from base_dir (or the working directory); resolve makes
    the file parts of a name absolute and keeps library names."""
    monkeypatch.chdir(REPO / "scenarios")
    by_cwd = load("models/vancomycin-goti.toml")
    by_base = load("models/vancomycin-goti.toml", base_dir=REPO / "scenarios")
    assert by_cwd.model.param_names == by_base.model.param_names
    assert resolve("models/a.toml+bis-propofol", tmp_path) == \
        f"{tmp_path.resolve() / 'models' / 'a.toml'}+bis-propofol"
    assert resolve("propofol-schnider", tmp_path) == "propofol-schnider"
    with pytest.raises(ModelError, match=r"model file 'models/x.toml' does not exist \(from "):
        load("models/x.toml", base_dir=tmp_path)


def test_a_changed_file_is_read_again(tmp_path):
    """The cache holds a file's model until the file changes."""
    path = tmp_path / "vanco.toml"
    text = (MODELS / "vancomycin-goti.toml").read_text()
    path.write_text(text)
    first = load(str(path))
    assert load(str(path)) is first
    path.write_text(text.replace("value = 4.5,", "value = 4.75,"))
    assert load(str(path)).population.theta["goti_cl"] == 4.75


def _scenario_with_model_files(folder: Path, model: str) -> Path:
    """vancomycin_nmpc.toml written into *folder*, its patient's and controller's model set
    to *model* (a relative model file is copied from scenarios/ to that place under
    *folder*)."""
    import tomllib

    import tomli_w

    data = tomllib.loads((REPO / "scenarios" / "vancomycin_nmpc.toml").read_text("utf-8"))
    data["patient"]["model"] = data["controller"]["nmpc"]["model"] = model
    data["patient"]["population"]["size"] = 2
    if model.endswith(".toml") and not Path(model).is_absolute():
        (folder / model).parent.mkdir(parents=True, exist_ok=True)
        (folder / model).write_text(_GOTI, encoding="utf-8")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "vanco.toml"
    path.write_text(tomli_w.dumps(data), encoding="utf-8")
    return path


def test_scenario_runs_with_a_model_file_from_its_folder(tmp_path, monkeypatch, capsys):
    """End to end: `mpc-dose run` of a scenario whose patient and NMPC models are
    "models/vanco.toml" (taken from the scenario's folder, not the working directory) gives
    the same closed loop, to the last digit written, as with the library name."""
    import pandas as pd

    mine = _scenario_with_model_files(tmp_path / "trial", "models/vanco.toml")
    theirs = _scenario_with_model_files(tmp_path / "library", "vancomycin-goti")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert not (elsewhere / "models").exists()
    for scenario, out in ((mine, "a"), (theirs, "b")):
        assert main(["run", str(scenario), "--patient", "2", "--out", out, "--no-plot"]) == 0
    capsys.readouterr()
    a = pd.read_csv(elsewhere / "a" / "timeseries.csv")
    b = pd.read_csv(elsewhere / "b" / "timeseries.csv")
    assert a["delivered_vancomycin_rate_mg_per_s"].max() > 0  # the controller dosed
    pd.testing.assert_frame_equal(a, b, check_exact=True)


def test_scenario_model_file_errors_name_the_scenario_folder(tmp_path):
    """A model file missing from the scenario's folder is refused naming that folder."""
    from mpc_dose.scenario import load_scenario
    from mpc_dose.trial.build import build_setup

    path = _scenario_with_model_files(tmp_path / "trial", "vancomycin-goti")
    scenario = load_scenario(path, {"patient.model": "models/missing.toml"})
    folder = re.escape(repr(str((tmp_path / "trial").resolve())))
    with pytest.raises(ModelError, match=rf"model file 'models/missing.toml' does not exist "
                                         rf"\(from {folder}\)"):
        build_setup(scenario, 0, 1)


def test_a_recommended_scenario_elsewhere_keeps_its_model_files(tmp_path):
    """`mpc-dose tune` writes its recommended scenario into another folder: the model files
    named in it are rewritten relative to that folder (library names are kept)."""
    from mpc_dose.scenario import load_scenario
    from mpc_dose.trial.build import scenario_model
    from mpc_dose.tune.sweep import write_recommended

    source = _scenario_with_model_files(tmp_path / "trial", "models/vanco.toml")
    target = tmp_path / "tuned" / "deep" / "recommended.toml"
    target.parent.mkdir(parents=True)
    write_recommended(str(source), {"controller.nmpc.auc_weight": 2.0}, target, ["test"])
    written = load_scenario(target)
    assert written.patient.model == "../../trial/models/vanco.toml"
    assert written.controller.nmpc.model == written.patient.model
    assert scenario_model(written).model.param_names == \
        load("vancomycin-goti").model.param_names
    assert relocate("a.toml+bis-propofol", "/x/y", "/x/z") == "../y/a.toml+bis-propofol"
    assert relocate("/abs/a.toml+propofol-schnider", "/x", "/y") == \
        "/abs/a.toml+propofol-schnider"


# ---------------------------------------------------------------- expressions
def test_expression_grammar():
    """Numbers, names, + - * / ^ ( ), exp/log/sqrt/min/max; ^ is right-associative and
    binds tighter than unary minus, as Python's **."""
    env = {"a": 2.0, "b": 3.0, "CRCL": 65.0, "DIAL": 1.0}
    cases = {"1 + 2 * 3": 7, "-a^2": -4, "a^b^2": 2.0 ** 9, "2^-1": 0.5, "(1 + a) * b": 9,
             "exp(0) + log(1) + sqrt(16)": 5, "min(a, b, 1) + max(a, b)": 4, "1e-3 * 1000": 1,
             ".5 + 2.": 2.5, "8 / 4 / 2": 1, "a - b - 1": -2,
             "4.5 * (CRCL/120)^0.8 * 0.7^DIAL": 4.5 * (65 / 120) ** 0.8 * 0.7}
    for text, value in cases.items():
        assert parse_expression(text)(env) == value, text
    assert parse_expression("a * exp(b) + a").names == {"a": 0, "b": 8}


_NAMES = st.sampled_from(["x", "y", "z"])
_ATOMS = st.one_of(_NAMES, st.sampled_from(["0.5", "2", "3.25", "1e-1"]))


def _tree(children):
    return st.one_of(
        st.tuples(children, st.sampled_from(["+", "-", "*", "/", "^"]), children).map(
            lambda t: f"{t[0]} {t[1]} {t[2]}"),
        children.map(lambda c: f"-{c}"), children.map(lambda c: f"({c})"),
        st.tuples(st.sampled_from(["min", "max"]), children, children).map(
            lambda t: f"{t[0]}({t[1]}, {t[2]})"))


@settings(max_examples=300, deadline=None)
@given(st.recursive(_ATOMS, _tree, max_leaves=8))
def test_expressions_evaluate_as_python_does(text):
    """For any expression of the grammar, the value is Python's own for the same text with
    ^ written ** (precedence, associativity and float operations alike), or an error
    where Python's has none real (division by zero, complex power, overflow)."""
    env = {"x": 1.7, "y": 0.3, "z": 2.0}
    try:
        expected = eval(text.replace("^", "**"), {"min": min, "max": max}, dict(env))
    except (ZeroDivisionError, OverflowError):
        expected = None
    if isinstance(expected, complex) or (expected is not None and not math.isfinite(expected)):
        expected = None
    expression = parse_expression(text)
    if expected is None:
        with pytest.raises(ExpressionError):
            expression(env)
    else:
        assert expression(env) == expected


@pytest.mark.parametrize("text, message", [
    ("__import__('os')", r"unexpected character \"'\""),
    ("a.b", r"unexpected character '\.' \(no attribute access\)"),
    ("a ** 2", r"write a power with '\^'"),
    ("a == 1", r"comparisons are not part"),
    ("pow(a, 2)", r"unknown function 'pow'"),
    ("exp(a, b)", r"exp\(\) takes 1 argument, got 2"),
    ("min(a)", r"min\(\) takes at least 2 arguments"),
    ("(a + 1", r"expected '\)', found the end"),
    ("a b", r"unexpected 'b' \(an operator is missing\?\)"),
    ("", r"empty"),
    ("a * ", r"expected a number, a name or '\(', found the end"),
])
def test_expression_refuses_what_is_not_arithmetic(text, message):
    """Anything outside the grammar is refused with what was expected."""
    with pytest.raises(ExpressionError, match=message):
        parse_expression(text)


def test_expression_evaluation_errors_say_why():
    """log of a negative number, a fractional power of a negative one, a division by zero
    and a missing name are errors, never a complex, NaN or infinite value."""
    for text, env, message in [("log(x)", {"x": -1.0}, r"log\(-1\.0\) is undefined"),
                               ("x^0.5", {"x": -4.0}, "not a real number"),
                               ("1 / x", {"x": 0.0}, "division by zero"),
                               ("exp(x)", {"x": 1e4}, "overflow"),
                               ("x + y", {"x": 1.0}, "no value for y")]:
        with pytest.raises(ExpressionError, match=message):
            parse_expression(text)(env)


# ---------------------------------------------------------------- bad files
_GOTI = (MODELS / "vancomycin-goti.toml").read_text(encoding="utf-8")


def _line(text: str, fragment: str) -> int:
    return next(k for k, line in enumerate(text.splitlines(), 1) if fragment in line)


@pytest.mark.parametrize("old, new, message", [
    ("min(crcl,", "min(crlc,",
     r"x.toml:<<vancomycin_cl1 = >>: \[parameters\] vancomycin_cl1: unknown name 'crlc' \(did you "
     r"mean 'crcl'\?\) at character 16 of"),
    ('kind = "combined"', "kind = combined", r"x.toml:<<kind = >>: not valid TOML: .*line"),
    ("^DIAL\"\nvancomycin_v1", "^dialysis\"\nvancomycin_v1",
     r"'dialysis' is a categorical covariate, not a number; declare e\.g\. indicators"),
    ("[omega]", "[omegas]", r"x.toml:<<[omegas]>>: \[omegas\]: unknown key \(did you mean 'omega'"),
    ("n_compartments = 2", "n_compartment = 2",
     r"x.toml:<<n_compartment>>: \[\[blocks\]\] #1 n_compartment: unknown key \(did you mean "
     r"'n_compartments'"),
    ("n_compartments = 2", 'n_compartments = "2"', r"n_compartments: expected a whole number"),
    ('type = "mammillary"', 'type = "mamillary"', r"unknown block type 'mamillary' \(did you "
                                                  r"mean 'mammillary'"),
    ("n_compartments = 2", "n_compartments = 4",
     r"\[\[blocks\]\] #1: mammillary 'vancomycin': n_compartments must be 1, 2 or 3"),
    ('vancomycin_v2 = "goti_v2"\n', "",
     r"\[parameters\]: no relation for vancomycin_v2 \(e\.g\. vancomycin_v2 \[L\]"),
    ('vancomycin_v2 = "goti_v2"', 'vancomycin_v3 = "goti_v2"',
     r"vancomycin_v3: 'vancomycin_v3' is not a parameter of this file's blocks \(did you mean "
     r"'vancomycin_v2'"),
    ('reference = "goti2018" }\ngoti_q', 'reference = "goti2108" }\ngoti_q',
     r"\[fixed_effects\.goti_v1_dialysis\] reference: 'goti2108' is not a key of \[references\]"
     r" \(did you mean 'goti2018'"),
    ('goti_q = { value = 6.5, unit = "L/h"', 'goti_q = { value = 6.5, unit = "L/hr/x"',
     r"\[fixed_effects\.goti_q\] unit: unit 'L/hr/x': unknown unit 'x'"),
    ("value = 6.5,", 'value = "6.5",', r"goti_q\] value: expected a finite number, got '6\.5'"),
    ('vancomycin_cl2 = "goti_q"', 'vancomycin_cl2 = "goti_q * (2"',
     r"vancomycin_cl2: expected '\)', found the end at character 12 of 'goti_q \* \(2'"),
    ('vancomycin_cl1 = "goti_cl', 'vancomycin_cl1 = "vancomycin_v1 * goti_cl',
     r"'vancomycin_v1' is defined below, in \[parameters\]: relations are evaluated in order"),
    ("{ cv = 0.571,", "{ cv = 0.571, variance = 0.2,", r"give exactly one of cv"),
    ("{ cv = 0.571,", "{ cv = -0.5,", r"\[omega\.vancomycin_v2\] cv: expected a value > 0"),
    ("[omega]\n", '[omega]\nvancomycin_a1 = { cv = 0.2 }\n',
     r"\[omega\] vancomycin_a1: 'vancomycin_a1' is not a parameter with a relation"),
    ('combine = "sum"\n', "",
     r"x.toml:<<[residual_error.>>: \[residual_error\.vancomycin_cp\] combine: missing"),
    ('combine = "sum"', 'combine = "add"', r"combine: expected 'sum' .* or 'quadrature'"),
    ('kind = "combined"', 'kind = "combined-sum"', r"kind: expected one of additive, "
                                                   r"proportional, combined, exponential"),
    ("additive = 3.4", 'additive = "3.4 mmHg"', r"additive.*mmHg.*mg/L"),
    ("[residual_error.vancomycin_cp]", "[residual_error.vancomycin_cq]",
     r"'vancomycin_cq' is not an output of this file's blocks \(did you mean 'vancomycin_cp'"),
    ('["yes", "no"]', '["Yes", "no"]', r"'Yes': choices are lower case"),
    ('indicators = { DIAL = "yes" }', 'indicators = { DIAL = "maybe" }',
     r"indicators\] DIAL: expected a choice or a list of choices of 'dialysis'"),
    ("range = [0, 400]", "range = [400, 0]", r"\[covariates\.crcl\] range: expected lower < "),
    ('range = [0, 400], doc', 'range = [0, 400], default = 500, doc',
     r"\[covariates\.crcl\] default: 500\.0 is outside the range \[0, 400\] mL/min"),
    ("goti_v2 = { value", "goti_cl = { value",
     r"^x\.toml:<<goti_cl = { value = 38.4>>: not valid TOML: Cannot overwrite a value"),
    ("goti_v2 = { value", "weight = { value",
     r"\[fixed_effects\] weight: 'weight' is already declared \(covariate\): every name is "
     r"declared once"),
    ("goti_v2 = { value", "exp = { value", r"fixed effect name 'exp' is a function"),
    ('vancomycin_cl2 = "goti_q"', 'clock_time_at_t0 = "goti_q"',
     r"clock_time_at_t0 is the clock time at t = 0, set by the scenario"),
    ("[[blocks]]", "[[circadian]]\nparam = \"vancomycin_cl9\"\n\n[[blocks]]",
     r"\[\[circadian\]\] #1 param: 'vancomycin_cl9' is not a parameter of this file's blocks"),
    ("[model]", "[model]\nname = \"x\"", r"\[model\] name: unknown key; expected: title, notes"),
    ("[references]", "[reference]", r"\[reference\]: unknown key \(did you mean 'references'"),
    ("[omega]\n", '[omega]\ncorrelations = [{ between = ["vancomycin_cl1", "vancomycin_v1"], '
                  'rho = 1.0 }]\n', r"correlations #1: the correlation is 1: expected between"),
    # the kinds of value: a table, a non-empty string, a name, the blocks as [[blocks]]
    ('title = "vancomycin, Goti 2018 (2 compartments; CrCL, weight, haemodialysis)"',
     'title = ""', r"x.toml:<<title = >>: \[model\] title: expected a non-empty string, got ''"),
    ("crcl = { unit", "crcl = 5\ncrcl2 = { unit",
     r"x.toml:<<crcl = 5>>: \[covariates\] crcl: expected a table, got 5"),
    ("goti_q = { value", '"goti-q" = { value',
     r"\[fixed_effects\] goti-q: fixed effect name 'goti-q': expected letters, digits and '_'"),
    ("[[blocks]]", "[blocks]", r"\[blocks\]: expected one or more \[\[blocks\]\] tables"),
    ('type = "mammillary"\n', "", r"\[\[blocks\]\] #1 type: missing; expected one of "
                                 r"mammillary, target_mediated"),
    ("[covariates]", '[[blocks]]\ntype = "effect_compartment"\nname = "ce"\n'
                     'driver = "later_cp"\n\n[[blocks]]\ntype = "mammillary"\ndrug = "later"\n'
                     'n_compartments = 1\n\n[covariates]',
     r"x.toml:<<later_cp>>: \[\[blocks\]\] #2 driver: 'later_cp' is an output of a later "
     r"block \(#3\): put that block first"),
    ("[covariates]", '[[circadian]]\nparam = "vancomycin_cl1"\nharmonics = 0\n\n[covariates]',
     r"\[\[circadian\]\] #1 harmonics: expected a whole number >= 1, got 0"),
    ("[covariates]", '[[circadian]]\nparam = "vancomycin_cl1"\nperiod_h = 0\n\n[covariates]',
     r"\[\[circadian\]\] #1 period_h: expected a period > 0 h, got 0\.0"),
    ("[model]", "circadian = 3\n\n[model]", r"\[circadian\]: expected \[\[circadian\]\] tables"),
    ('choices = ["yes", "no"]', 'choices = "yes"',
     r"\[covariates\.dialysis\] choices: expected a list of distinct strings, got 'yes'"),
    ('choices = ["yes", "no"]', 'choices = ["yes", "no"], default = "maybe"',
     r"\[covariates\.dialysis\] default: expected one of yes, no, got 'maybe'"),
    ("range = [0, 400]", "range = 400",
     r"\[covariates\.crcl\] range: expected \[lower, upper\] in mL/min, got 400"),
    # Omega's correlations
    ("[omega]\n", '[omega]\ncorrelations = { between = ["vancomycin_cl1", "vancomycin_v1"], '
                  'rho = 0.2 }\n', r"\[omega\] correlations: expected a list of tables"),
    ("[omega]\n", '[omega]\ncorrelations = [{ between = ["vancomycin_cl1", "vancomycin_cl1"], '
                  'rho = 0.2 }]\n',
     r"correlations #1 between: expected two different parameters of \[omega\] "
     r"\(vancomycin_cl1, vancomycin_v1, vancomycin_v2\)"),
    ("[omega]\n", '[omega]\ncorrelations = [{ between = ["vancomycin_cl1", "vancomycin_v1"], '
                  'rho = 0.2, covariance = 0.1 }]\n',
     r"correlations #1: give either rho \(a correlation\) or covariance"),
    ("[omega]\n", '[omega]\ncorrelations = [{ between = ["vancomycin_cl1", "vancomycin_v1"], '
                  'rho = 0.2 }, { between = ["vancomycin_v1", "vancomycin_cl1"], rho = 0.3 }]\n',
     r"correlations #2: the correlation of vancomycin_v1 and vancomycin_cl1 is given twice"),
    ("[omega]\n", '[omega]\ncorrelations = [{ between = ["vancomycin_cl1", "vancomycin_v1"], '
                  'rho = 0.95 }, { between = ["vancomycin_v1", "vancomycin_v2"], rho = 0.95 }, '
                  '{ between = ["vancomycin_cl1", "vancomycin_v2"], rho = -0.95 }]\n',
     r"x.toml:<<[omega]>>: \[omega\]: Omega is not positive definite"),
    ("[omega]\n", '[iov]\nvancomycin_q = { cv = 0.2 }\n\n[omega]\n',
     r"\[iov\] vancomycin_q: 'vancomycin_q' is not a parameter with a relation in "
     r"\[parameters\] \(did you mean 'vancomycin_v2'"),
    # relations and the names they use
    ('vancomycin_cl2 = "goti_q"', 'vancomycin_cl2 = "goti_q * vancomycin_cl2"',
     r"\[parameters\] vancomycin_cl2: the relation of 'vancomycin_cl2' uses 'vancomycin_cl2' "
     r"itself"),
    ("[parameters]", '[derived]\nvancomycin_cl1 = { relation = "1", unit = "L/h", doc = "x" }'
                     '\n\n[parameters]',
     r"\[derived\] vancomycin_cl1: 'vancomycin_cl1' is already a parameter of the blocks"),
    ("[parameters]", '[derived]\nq2 = { relation = "1", unit = "L/h" }\n\n[parameters]',
     r"x.toml:<<q2 = >>: \[derived\.q2\] doc: missing"),
    # residual error
    ("proportional = 0.227", "proportional = 0",
     r"\[residual_error\.vancomycin_cp\] proportional: expected a value > 0, got 0"),
    ("additive = 3.4\n", "additive = 3.4\nsd = 1\n",
     r"\[residual_error\.vancomycin_cp\] sd: unknown key; expected: kind, additive, "
     r"proportional, combine"),
])
def test_bad_files_are_refused_with_file_line_key_and_expectation(old, new, message):
    """Each mistake is named by file, line (when one line holds it), table and key."""
    assert old in _GOTI, old
    text = _GOTI.replace(old, new, 1)
    # <<fragment>> in a pattern stands for the number of the first line holding fragment
    message = re.sub(r"<<(.+?)>>", lambda m: str(_line(text, m[1])), message)
    with pytest.raises(ModelError, match=message):
        parse_model_file(text, source="x.toml", name="x")


def test_file_level_errors(tmp_path, capsys):
    """A file that is not UTF-8, a folder named .toml, a missing required table, an unknown
    library name (the message offers model files) and, from the command line, a bad file:
    exit status 2 and the reader's one line, nothing written."""
    from mpc_dose.model.modelfile import read_model_file

    latin = tmp_path / "latin.toml"
    latin.write_bytes(_GOTI.replace("haemodialysis", "h\u00e9modialyse").encode("latin-1"))
    with pytest.raises(ModelError, match=r"model file '.*latin.toml': not UTF-8 text"):
        read_model_file(latin)
    (tmp_path / "folder.toml").mkdir()
    with pytest.raises(ModelError, match=r"model file '.*folder.toml': cannot read it"):
        read_model_file(tmp_path / "folder.toml")
    start, end = _GOTI.index("[parameters]"), _GOTI.index("# Between-subject")
    with pytest.raises(ModelError, match=r"^x.toml: \[parameters\]: missing$"):
        parse_model_file(_GOTI[:start] + _GOTI[end:], source="x.toml", name="x")
    with pytest.raises(ModelError, match=r"unknown model 'vancomycin-gotti' \(did you mean "
                                         r"'vancomycin-goti'\?\).*or a model file ending in "
                                         r"\.toml"):
        load("vancomycin-gotti")
    bad = tmp_path / "bad.toml"
    bad.write_text(_GOTI.replace("min(crcl,", "min(crlc,"), encoding="utf-8")
    out = tmp_path / "out.csv"
    assert main(["simulate", "--model", str(bad), "--covariates",
                 "crcl=65,weight=70,dialysis=no", "--duration", "1h", "--out", str(out)]) == 2
    assert re.search(rf"bad.toml:{_line(_GOTI, 'vancomycin_cl1 = ')}: \[parameters\] "
                     r"vancomycin_cl1: unknown name 'crlc'", capsys.readouterr().err)
    assert not out.exists()


def test_simulate_command_with_a_file_gives_the_entry_simulation(tmp_path, capsys,
                                                                monkeypatch):
    """`mpc-dose simulate --model FILE` (relative to the working directory) writes the same
    CSV as with the library name."""
    monkeypatch.chdir(REPO / "scenarios")
    common = ["--covariates", "crcl=65,weight=70,dialysis=no", "--doses",
              "doses/vancomycin_q12h.csv", "--duration", "48h", "--step", "10min"]
    assert main(["simulate", "--model", "models/vancomycin-goti.toml", *common, "--out",
                 str(tmp_path / "a.csv")]) == 0
    assert main(["simulate", "--model", "vancomycin-goti", *common, "--out",
                 str(tmp_path / "b.csv")]) == 0
    capsys.readouterr()
    a, b = (tmp_path / "a.csv").read_text(), (tmp_path / "b.csv").read_text()
    assert a == b and a.count("\n") == 290


def test_relation_errors_name_the_patient():
    """A relation without a finite value for a patient is an error naming the relation and
    the covariates, not a NaN in the model."""
    text = _GOTI.replace('vancomycin_cl2 = "goti_q"', 'vancomycin_cl2 = "goti_q * log(crcl)"')
    pop = parse_model_file(text, source="x.toml", name="x").population
    with pytest.raises(ModelError, match=r"x.toml:\d+: \[parameters\] vancomycin_cl2: cannot "
                                         r"evaluate 'goti_q \* log\(crcl\)' for crcl = 0\.0, "
                                         r"weight = 70\.0, dialysis = 'no': log\(0\.0\)"):
        pop.typical_parameters({"crcl": 0, "weight": 70, "dialysis": "no"})


def test_variability_forms_and_residual_kinds():
    """cv, variance and sd give omega^2 = ln(1 + cv^2), the variance, sd^2; a covariance
    becomes its correlation; iov is independent; residual kinds map to ResidualError."""
    text = _GOTI.replace(
        "[omega]\nvancomycin_cl1 = { cv = 0.398, doc = \"CV 39.8 %\" }\n"
        "vancomycin_v1 = { cv = 0.816, doc = \"CV 81.6 %\" }\n"
        "vancomycin_v2 = { cv = 0.571, doc = \"CV 57.1 %\" }",
        "[omega]\nvancomycin_cl1 = { cv = 0.3 }\nvancomycin_v1 = { variance = 0.25 }\n"
        "vancomycin_v2 = { sd = 0.5 }\n"
        "correlations = [{ between = [\"vancomycin_v1\", \"vancomycin_cl1\"], covariance = 0.05 }]"
        "\n\n[iov]\nvancomycin_cl1 = { sd = 0.1, doc = \"IOV\" }")
    assert text != _GOTI
    pop = parse_model_file(text, source="x", name="x").population
    assert np.allclose(np.diag(pop.omega), [math.log1p(0.09), 0.25, 0.25], rtol=0, atol=1e-15)
    assert pop.omega[0, 1] == pytest.approx(0.05)
    assert pop.occasion_effects[0].omega2 == pytest.approx(0.01)
    kinds = {
        'kind = "additive"\nadditive = "500 ug/L"': ("quadrature", 0.5, 0.0),
        'kind = "proportional"\nproportional = "20 %"': ("quadrature", 0.0, 0.2),
        'kind = "combined"\ncombine = "quadrature"\nadditive = 1\nproportional = 0.1':
            ("quadrature", 1.0, 0.1),
        'kind = "exponential"\nsd = 0.2': ("exponential", 0.0, 0.2),
    }
    block = 'kind = "combined"\ncombine = "sum"\nadditive = 3.4\nproportional = 0.227'
    assert block in _GOTI
    for spec, (kind, additive, proportional) in kinds.items():
        r, = parse_model_file(_GOTI.replace(block, spec), source="x",
                              name="x").population.residual_errors
        assert r.kind == kind
        assert (r.additive, r.proportional) == pytest.approx((additive, proportional))
