"""The library's building material: an entry (one published model) and the composition of
entries into one model (``"propofol-schnider+remifentanil-minto+bis-bouillon"``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from ...errors import ModelError, closest
from ..population import Covariate, PopulationModel
from ..spec import Block, Cosinor, Model, Output

__all__ = ["LibraryEntry", "LibraryModel", "AGE", "HEIGHT", "WEIGHT", "SEX", "compose"]

# Covariates shared by many entries: declared once so composed models agree on them.
AGE = Covariate("age", "yr", "age", 0.0, 120.0)
HEIGHT = Covariate("height", "cm", "body height", 40.0, 250.0)
WEIGHT = Covariate("weight", "kg", "total body weight", 0.5, 350.0)
SEX = Covariate("sex", "", "sex", choices=("male", "female"))


@dataclass(frozen=True)
class LibraryEntry:
    """One published model: structure (blocks), population statistics and references.

    *blocks* builds the entry's blocks given the outputs of the entries before it in a
    composition (by name); *requires* names the outputs it needs from them.
    """

    name: str
    title: str
    references: tuple[str, ...]
    blocks: Callable[[Mapping[str, Output]], Sequence[Block]]
    population: PopulationModel
    requires: tuple[str, ...] = ()
    circadian: tuple[Cosinor, ...] = ()
    notes: str = ""
    #: an insulin model's steady-state basal: ``basal_insulin(params, glucose [mmol/L])`` ->
    #: the constant rate [U/h] that holds that glucose, rhythm off (model/therapy.py derives
    #: a patient's pump settings from it); None: not an insulin model
    basal_insulin: Callable[[Mapping[str, float], float], float] | None = None
    #: cohort-table layouts the entry reads besides plain columns (``[patient.table] layout``):
    #: name -> ``read(row, where=...)``, one table row -> covariates and parameters by name
    #: (declared units), e.g. ``"simglucose"`` for simglucose's vpatient_params.csv
    table_layouts: Mapping[str, Callable[..., dict[str, float]]] = field(default_factory=dict)


@dataclass(frozen=True)
class LibraryModel:
    """A compiled composition of library entries: the :class:`Model` and its population."""

    name: str
    entries: tuple[LibraryEntry, ...]
    model: Model
    population: PopulationModel

    @property
    def references(self) -> list[str]:
        return [r for e in self.entries for r in e.references]


def compose(name: str, entries: Sequence[LibraryEntry]) -> LibraryModel:
    """Build one :class:`LibraryModel` from *entries*, in order.

    Raises
    ------
    ModelError
        When an entry needs an output that no earlier entry provides.
    """
    available: dict[str, Output] = {}
    blocks: list[Block] = []
    for entry in entries:
        missing = [r for r in entry.requires if r not in available]
        if missing:
            raise ModelError(f"model {entry.name!r} needs {', '.join(missing)} from a model "
                             f"before it in {name!r}{closest(missing[0], available)}; "
                             f"e.g. put a propofol and a remifentanil model first")
        built = list(entry.blocks(available))
        for block in built:
            for out in block.outputs:
                available[out.name] = out
        blocks += built
    population = entries[0].population
    for entry in entries[1:]:
        population = population.merge(entry.population)
    model = Model(name, blocks, circadian=[c for e in entries for c in e.circadian],
                  doc=" + ".join(e.title for e in entries))
    return LibraryModel(name, tuple(entries), model, population)
