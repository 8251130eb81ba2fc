"""Scenario files and tables: the layer that reads files (with trial/ and the CLI).

Unknown keys and columns, wrong types and wrong units are errors naming the place.
"""

from .dosing_table import doses_from_rows, read_dosing_table
from .schema import (MODEL_KEYS, PATH_KEYS, Scenario, load_scenario, parse_scenario,
                     read_scenario_data, with_overrides)

__all__ = ["read_dosing_table", "doses_from_rows", "Scenario", "load_scenario",
           "parse_scenario", "read_scenario_data", "with_overrides", "PATH_KEYS",
           "MODEL_KEYS"]
