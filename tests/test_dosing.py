"""Dosing records (NONMEM AMT/RATE/DUR semantics) and the dosing-table reader."""

import numpy as np
import pytest

from mpc_dose.errors import ConfigError
from mpc_dose.model.dosing import Dose, schedule
from mpc_dose.model.library import load
from mpc_dose.scenario import read_dosing_table


@pytest.mark.parametrize("kwargs, expected", [
    ({"amount": 100}, (100, 0, 0)),
    ({"amount": 100, "rate": 0}, (100, 0, 0)),
    ({"amount": 100, "rate": 2}, (100, 2, 50)),
    ({"amount": 100, "duration_s": 25}, (100, 4, 25)),
    ({"rate": 2, "duration_s": 30}, (60, 2, 30)),
    ({"amount": 60, "rate": 2, "duration_s": 30}, (60, 2, 30)),
])
def test_nonmem_semantics(kwargs, expected):
    """Two of amount, rate and duration define an infusion; amount alone is a bolus."""
    d = Dose.from_record(0, "drug", **kwargs)
    assert (d.amount, d.rate, d.duration_s) == pytest.approx(expected)


@pytest.mark.parametrize("kwargs, match", [
    ({}, "give an amount"),
    ({"amount": -1}, "amount must be a finite number >= 0, got -1"),
    ({"amount": float("inf")}, "amount must be a finite number"),
    ({"amount": 50, "rate": 2, "duration_s": 30}, "differs from rate x duration"),
    ({"rate": 2}, "give an amount"),
    ({"amount": "lots"}, "amount must be a number, got 'lots'"),
])
def test_impossible_doses_are_named(kwargs, match):
    """An impossible dose record is an error naming the field and value."""
    with pytest.raises(ConfigError, match=match):
        Dose.from_record(0, "drug", **kwargs)


def test_schedule_sums_overlapping_infusions(schnider):
    """Overlapping infusions add; boluses are jumps of the bolus state at their time."""
    p = schnider.model.parameter_vector(schnider.population.typical_parameters(
        {"age": 35, "height": 170, "weight": 70, "sex": "male"}))
    plan = schedule(schnider.model, p, [Dose.infusion(0, "propofol", 1.0, 100),
                                        Dose.infusion(50, "propofol", 0.5, 100),
                                        Dose.bolus(60, "propofol", 20)])
    assert list(plan.breaks) == [0, 50, 60, 100, 150]
    assert list(plan.rates[:, 0]) == [1.0, 1.5, 1.5, 0.5, 0.0]
    assert plan.jumps[2, schnider.model.state_index("propofol_a1")] == 20


def _write(tmp_path, text, name="doses.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_table_units_are_converted(tmp_path):
    """Columns carry units: minutes, micrograms per kg and per minute are converted."""
    model = load("propofol-schnider+remifentanil-minto+bis-bouillon").model
    path = _write(tmp_path, "# comment line\n"
                  "time_min,input,amount_mg_per_kg,rate_ug_per_kg_per_min,duration_min\n"
                  "0,propofol,2,,0.5\n"
                  "0.5,propofol,,150,10\n"
                  "1,remifentanil,0.001,,\n")
    doses = read_dosing_table(path, model, weight_kg=80)
    assert doses[0] == Dose(0.0, "propofol", 160.0, 160 / 30, 30.0)
    assert doses[1].time_s == 30 and doses[1].rate == pytest.approx(150e-3 * 80 / 60)
    assert doses[2] == Dose(60.0, "remifentanil", pytest.approx(80.0))


def test_additional_doses(tmp_path):
    """``addl`` repeats a dose every ``ii``."""
    model = load("vancomycin-goti").model
    path = _write(tmp_path, "time_h,amount_g,duration_h,addl,ii_h\n0,1,1,3,12\n")
    doses = read_dosing_table(path, model)
    assert [d.time_s / 3600 for d in doses] == [0, 12, 24, 36]
    assert all(d.amount == 1000 and d.duration_s == 3600 for d in doses)


def test_observation_records_are_skipped(tmp_path):
    """evid 0 rows (NONMEM observations) are skipped, evid 1 rows are doses."""
    model = load("vancomycin-goti").model
    path = _write(tmp_path, "time_h,evid,amount_mg\n0,1,1000\n2,0,\n")
    assert len(read_dosing_table(path, model)) == 1


@pytest.mark.parametrize("text, match", [
    ("time,amount_mg\n0,100\n", "column 'time' has no unit"),
    ("time_fortnight,amount_mg\n0,100\n", "unknown unit 'fortnight'"),
    ("time_h,amount_L\n0,100\n", "cannot be converted"),
    ("time_h,amount_mg,dose_mg\n0,100,1\n", "unknown column 'dose_mg'"),
    ("amount_mg\n100\n", "no time column"),
    ("time_h,amount_mg\n0,abc\n", "row 1: amount_mg = 'abc' is not a number"),
    ("time_h,amount_mg\n0,-5\n", "row 1: amount must be a finite number >= 0, got -5"),
    ("time_h,input,amount_mg\n0,vanco,100\n", "did you mean 'vancomycin'"),
    ("time_h,amount_mg,evid\n0,100,4\n", "evid = 4 is not supported"),
    ("time_h,amount_mg_per_kg\n0,15\n", "give the patient's weight"),
    ("time_h,amount_mg\n0,100,5\n", "more values than columns"),
    ("", "is empty"),
])
def test_malformed_tables_are_named(tmp_path, text, match):
    """A malformed dosing table raises an error naming the row, column and value."""
    with pytest.raises(ConfigError, match=match):
        read_dosing_table(_write(tmp_path, text), load("vancomycin-goti").model)


def test_missing_file(tmp_path):
    """A missing dosing file is an error naming it."""
    with pytest.raises(ConfigError, match="cannot read it"):
        read_dosing_table(tmp_path / "nope.csv", load("vancomycin-goti").model)


def test_input_column_needed_with_several_inputs(tmp_path):
    """With two drugs the table must say which input each row doses."""
    model = load("propofol-schnider+remifentanil-minto+bis-bouillon").model
    with pytest.raises(ConfigError, match="no input column"):
        read_dosing_table(_write(tmp_path, "time_s,amount_mg\n0,1\n"), model)
    assert np.isfinite(read_dosing_table(_write(tmp_path, "time_s,input,amount_mg\n0,propofol,1\n"),
                                         model)[0].amount)
