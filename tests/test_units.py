"""Units: parsing, conversion and the column-name spelling."""

import pytest

from mpc_dose.errors import UnitError
from mpc_dose.units import (GLUCOSE, INSULIN, convert, convert_substance, parse_quantity,
                            parse_unit, split_unit_suffix,
                            token_to_unit, unit_to_token)


@pytest.mark.parametrize("value, src, dst, expected", [
    (1.0, "ug/mL", "mg/L", 1.0),
    (1.0, "ng/mL", "ug/L", 1.0),
    (2.0, "L/min", "L/h", 120.0),
    (1.0, "h", "s", 3600.0),
    (150.0, "ug/min", "mg/h", 9.0),
    (1.0, "1/min", "1/s", 1 / 60),
    (154.32358352941, "lb", "kg", 70.0),
    (1.7, "m", "cm", 170.0),
    (50.0, "%", "1", 0.5),
    (4.0, "10^9/L", "1/mL", 4e6),
    (1.0, "kPa", "mmHg", 7.500616827),
])
def test_conversions(value, src, dst, expected):
    """Conversions between units of one dimension are exact up to rounding."""
    assert convert(value, src, dst) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("src, dst", [("mg", "L"), ("mg/L", "mg"), ("L/min", "1/min"),
                                      ("mmHg", "1")])
def test_dimension_mismatch_is_an_error(src, dst):
    """Units of different dimensions never convert silently."""
    with pytest.raises(UnitError, match="cannot be converted"):
        convert(1.0, src, dst, what="field x")


@pytest.mark.parametrize("text, match", [("mgg", "unknown unit 'mgg'"),
                                         ("mcgg/L", "unknown unit 'mcgg'"),
                                         ("mg//L", "empty denominator"),
                                         ("furlong", "unknown unit 'furlong'")])
def test_unknown_units_are_errors(text, match):
    """An unknown unit is an error naming it, never a guess."""
    with pytest.raises(UnitError, match=match):
        parse_unit(text)


def test_aliases_are_mapped_not_guessed():
    """Common clinical spellings (ml, mcg, hr) are accepted as exact aliases."""
    assert parse_unit("mcg/ml").factor == parse_unit("ug/mL").factor
    assert parse_unit("hr").factor == 3600.0


@pytest.mark.parametrize("unit, token", [("ug/mL", "ug_per_mL"), ("mg/kg/h", "mg_per_kg_per_h"),
                                         ("1/min", "per_min"), ("L/min", "L_per_min"),
                                         ("10^9/L", "1e9_per_L"), ("m^2", "m2"), ("%", "pct"),
                                         ("mmHg", "mmHg")])
def test_column_tokens_round_trip(unit, token):
    """A unit spelled into a column name reads back to the same unit."""
    assert unit_to_token(unit) == token
    assert parse_unit(token_to_unit(token)).factor == pytest.approx(parse_unit(unit).factor)


def test_split_unit_suffix_prefers_the_longest_declared_name():
    """``crcl_mL_per_min`` splits into the covariate and its unit."""
    assert split_unit_suffix("crcl_mL_per_min", ["crcl", "cr"]) == ("crcl", "mL/min")
    assert split_unit_suffix("weight", ["weight"]) == ("weight", None)
    assert split_unit_suffix("other", ["weight"]) == ("other", None)


@pytest.mark.parametrize("text, expected", [("1800", 1800.0), ("30min", 1800.0),
                                            ("0.5 h", 1800.0), ("1e3", 1000.0)])
def test_parse_quantity(text, expected):
    """Flags take seconds, or a number with an explicit unit."""
    assert parse_quantity(text, "s", what="--duration") == pytest.approx(expected)


def test_parse_quantity_rejects_wrong_dimension():
    """A duration given in milligrams is refused with the flag named."""
    with pytest.raises(UnitError, match="--duration"):
        parse_quantity("30mg", "s", what="--duration")


@pytest.mark.parametrize("text", ["mL/h/0", "uL/min/0.001*0", "1e400*mL/h", "0*mL/h",
                                  "10^400/L", "10^-99999999999/L", "mL^0", "m^9999",
                                  "1/mL^-999/h", "*".join(["10^30"] * 11) + "*L"])
def test_degenerate_factors_are_errors_not_crashes(text):
    """Issue 14.2: a zero, infinite or overflowing factor is a UnitError naming the unit,
    never a ZeroDivisionError or OverflowError (the grammar also reads scenario files)."""
    with pytest.raises(UnitError, match="unit "):
        parse_unit(text)


def test_the_largest_cell_counts_still_parse():
    """The bounds leave room for what models use (10^9/L, m^2, mL/h/1 as a factor)."""
    assert parse_unit("10^9/L").factor == pytest.approx(1e9)
    assert parse_unit("10^30/L").factor == pytest.approx(1e30)
    assert parse_unit("m^2").dimension == (("length", 2),)
    assert parse_unit("mL/h/1").factor == parse_unit("mL/h").factor


@pytest.mark.parametrize("value, src, dst, expected", [
    (1.0, "U/h", "mU/min", 1000 / 60),
    (1.0, "IU", "U", 1.0),
    (10.0, "uU/mL", "mU/L", 10.0),
    (1.0, "nmol", "pmol", 1000.0),
    (45.0, "g", "mg", 45000.0),  # grams of carbohydrate are an ordinary mass
])
def test_insulin_and_carbohydrate_units(value, src, dst, expected):
    """Insulin units convert among themselves; carbohydrate grams are a mass."""
    assert convert(value, src, dst) == pytest.approx(expected, rel=1e-12)


def test_insulin_units_are_not_an_amount_of_substance():
    """U is an activity unit: it never converts to moles without naming insulin."""
    with pytest.raises(UnitError, match=r"'U' \(insulin\) cannot be converted to 'pmol'"):
        convert(1.0, "U", "pmol", what="bolus")


@pytest.mark.parametrize("value, src, dst, expected", [
    (1.0, "U", "pmol", 6000.0),           # 6.00 nmol/U (Volund 1993; Knopp 2019)
    (1.0, "uU/mL", "pmol/L", 6.0),
    (600.0, "pmol/L", "mU/L", 100.0),
    (1.0, "U", "ug", 6e-9 * 5808 * 1e9 / 1e3),  # 6 nmol x 5808 g/mol = 34.85 ug
])
def test_insulin_units_to_moles(value, src, dst, expected):
    """Insulin converts between U and moles (or mass) through 6.00 nmol/U and 5808 g/mol."""
    assert convert_substance(value, src, dst, INSULIN) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("value, src, dst, expected", [
    (1.0, "mmol/L", "mg/dL", 18.016),
    (100.0, "mg/dL", "mmol/L", 100 / 18.016),
    (70.0, "mg/dL", "mmol/L", 3.885435),
    (1.0, "mmol/L", "mmol/L", 1.0),
    (1.0, "g", "mmol", 1000 / 180.16),
])
def test_glucose_mass_and_molar_units(value, src, dst, expected):
    """Glucose converts between mg/dL and mmol/L through 180.16 g/mol."""
    assert convert_substance(value, src, dst, GLUCOSE) == pytest.approx(expected, rel=1e-6)


def test_substance_conversion_keeps_other_dimensions_apart():
    """Naming the substance bridges mass and moles only: concentration to amount fails."""
    with pytest.raises(UnitError, match="'mmol/L'.*cannot be converted to 'mg'.*not even as "
                                        "glucose"):
        convert_substance(5.0, "mmol/L", "mg", GLUCOSE, what="glucose")


def test_glucose_has_no_insulin_units():
    """U is refused for a substance that has no activity unit, naming the field."""
    with pytest.raises(UnitError, match="meal: unit 'U' is an insulin unit; glucose has none"):
        convert_substance(1.0, "U", "mmol", GLUCOSE, what="meal")
