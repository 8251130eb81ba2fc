"""The scenario key reference (docs/scenario-keys.md) is what the schema says now: it is
generated from the schema, and a change to either without regenerating fails here."""

from __future__ import annotations

import difflib

from mpc_dose.scenario import reference, schema


def test_the_committed_reference_is_what_the_generator_writes_now():
    committed = reference.DEFAULT_PATH.read_text("utf-8") if reference.DEFAULT_PATH.exists() \
        else ""
    generated = reference.render()
    if committed != generated:
        diff = "".join(list(difflib.unified_diff(
            committed.splitlines(keepends=True), generated.splitlines(keepends=True),
            "docs/scenario-keys.md (committed)", "generated from the schema now"))[:40])
        raise AssertionError(f"docs/scenario-keys.md is out of date with "
                             f"mpc_dose/scenario/schema.py: regenerate it with "
                             f"`{reference.REGENERATE}` and commit it.\n{diff}")


def test_every_key_of_every_table_is_listed():
    """Each schema table has its section and each of its keys a row (quantities by their
    pattern, e.g. max_rate_<unit>); the loader's own fields are not keys."""
    text = reference.render()
    for cls, header in [(schema.ScenarioInfo, "[scenario]"), (schema.PumpSpec, "[[pump]]"),
                        (schema.SensorSpec, "[[sensor]]"),
                        (schema.NMPCSpec, "[controller.nmpc]"),
                        (schema.EstimatorSpec, "[controller.nmpc.estimator]"),
                        (schema.SafetySpec, "[controller.safety]"),
                        (schema.MetricsSpec, "[metrics]")]:
        section = text.split(f"## `{header}`\n", 1)[1].split("\n## ", 1)[0]
        for name, info in cls.model_fields.items():
            if "Spec" not in str(info.annotation):  # a table of its own
                assert f"| `{name}` |" in section, (header, name)
    nmpc_input = text.split("## `[controller.nmpc.input.NAME]`\n", 1)[1].split("\n## ", 1)[0]
    for name in schema.NMPCInputSpec.QUANTITIES:
        assert f"| `{name}_<unit>` | number | in the key: " in nmpc_input
    assert "`base_dir`" not in text and "`quantities`" not in text


def _section(table: str) -> dict[str, str]:
    """The rows of one table of the reference (a key name recurs across tables)."""
    rows, inside = {}, False
    for line in reference.render().splitlines():
        if line.startswith("## "):
            inside = line.strip("# `[]") == table
        elif inside and line.startswith("| `"):
            rows[line.split(" | ")[0]] = line
    return rows


def test_units_defaults_limits_and_comments_come_from_the_schema():
    rows = {line.split(" | ")[0]: line for line in reference.render().splitlines()
            if line.startswith("| `")}
    assert rows["| `max_rate_ml_per_h`"].startswith(
        "| `max_rate_ml_per_h` | number | mL/h | 1200.0 | > 0 | the pump's highest rate")
    assert "| h (clock time of day) | none | >= 0, < 24 | the clock time of day at t = 0" \
        in rows["| `start_clock_h`"]
    assert "| required |" in rows["| `duration_s`"]
    assert "see `dose_interval_s`" in _section("controller.nmpc")["| `infusion_s`"]
    assert '| "steps" or "linear" | ' in rows["| `kind`"]    # the last [[disturbance]] kind


def test_every_key_has_a_meaning_and_a_value_in_an_output_unit_says_so():
    """A field added to the schema without its #: comment (nor a group comment naming it)
    fails here; a number that may carry its unit in the value ("70 mmHg") is typed so, and
    its unit column is never empty."""
    rows = [line.split(" | ") for line in reference.render().splitlines()
            if line.startswith("| `")]
    assert len(rows) > 150
    unexplained = [r[0] for r in rows if not r[5].rstrip(" |")]
    assert not unexplained, f"keys without a meaning (add a #: comment in schema.py): " \
        f"{unexplained}"
    quantities = [r for r in rows if r[1] == "number or string with a unit"]
    assert len(quantities) > 20
    assert all(r[2] for r in quantities), [r[0] for r in quantities if not r[2]]
    by_key = {r[0]: r for r in rows}
    assert by_key["| `drift_per_h`"][2] == "output unit per h"   # the comment's, not "per h"
    nmpc = {k: v.split(" | ") for k, v in _section("controller.nmpc").items()}
    assert nmpc["| `auc_target`"][2] == "its unit x h"           # from its group's comment
    assert by_key["| `auc_weight`"][2] == ""                     # a weight has none
