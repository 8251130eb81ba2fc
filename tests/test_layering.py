"""Architecture: model/ stays pure (no simpy, no zmq), as DESIGN requires."""

import subprocess
import sys


def test_model_layer_imports_without_simpy_or_zmq():
    """Importing the model library and simulating pulls in neither simpy nor zmq."""
    code = ("import sys; import mpc_dose.model.library as lib; import mpc_dose.model.simulation; "
            "lib.load('propofol-schnider'); "
            "bad = [m for m in ('simpy', 'zmq') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
