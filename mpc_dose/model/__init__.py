"""PK/PD models compiled to CasADi functions ``f(t, x, u, p)`` and ``h(t, x, u, p)``.

Pure layer: CasADi, numpy and scipy only. No simpy, no zmq, no files, no global randomness
(random draws take a ``numpy.random.Generator``).
"""

from .spec import Block, Cosinor, Input, Model, Output, Param, State
from .pk import mammillary, target_mediated
from .links import effect_compartment, transit_chain
from .pd import (bouillon_bis, emax_effect, friberg_myelosuppression, indirect_response,
                 linear_effect)

__all__ = ["Block", "Cosinor", "Input", "Model", "Output", "Param", "State", "mammillary",
           "target_mediated", "effect_compartment", "transit_chain", "bouillon_bis",
           "emax_effect", "friberg_myelosuppression", "indirect_response", "linear_effect"]
