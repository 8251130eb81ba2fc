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


def _imports_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "; import sys; print(' '.join("
                          "sorted(sys.modules)))"], check=True, capture_output=True, text=True)
    return set(out.stdout.split())


def test_protocol_is_sans_io():
    """protocol/ (messages, codec, session, New Era codec) needs no sockets, serial ports,
    simulation or numerics: a device bridge in another language can mirror it."""
    loaded = _imports_after("import mpc_dose.protocol.codec, mpc_dose.protocol.session, "
                            "mpc_dose.protocol.newera")
    assert not loaded & {"zmq", "serial", "simpy", "numpy", "casadi", "socket"}


def test_nodes_touch_no_transport():
    """node/ turns messages into messages: it never imports zmq or pyserial."""
    loaded = _imports_after("import mpc_dose.node, mpc_dose.node.pump_bridge")
    assert not loaded & {"zmq", "serial"}
    assert not any(m.startswith(("mpc_dose.transport", "mpc_dose.serve")) for m in loaded)


def test_transport_knows_only_the_protocol():
    loaded = _imports_after("import mpc_dose.transport.zmq_link, "
                            "mpc_dose.transport.serial_link, mpc_dose.transport.chaos")
    assert not any(m.startswith(("mpc_dose.node", "mpc_dose.control", "mpc_dose.plant",
                                 "mpc_dose.model", "mpc_dose.trial")) for m in loaded)


def test_trials_do_not_know_tuning():
    """tune/ builds on trial/, never the reverse."""
    loaded = _imports_after("import mpc_dose.trial.runner, mpc_dose.trial.report, "
                            "mpc_dose.trial.build")
    assert not any(m.startswith(("mpc_dose.tune", "mpc_dose.serve", "mpc_dose.cli"))
                   for m in loaded)


def test_clinic_knows_model_and_control_not_plants_trials_or_transports():
    """clinic/ (mpc-dose mipd) builds on model/ and control/: no simpy, zmq, plant, trial,
    serve."""
    loaded = _imports_after("import mpc_dose.clinic, mpc_dose.clinic.report")
    assert not loaded & {"simpy", "zmq"}
    assert not any(m.startswith(("mpc_dose.plant", "mpc_dose.trial", "mpc_dose.serve",
                                 "mpc_dose.transport", "mpc_dose.node")) for m in loaded)


def test_monitor_state_is_sans_io_and_the_web_stack_stays_out_of_the_rest():
    """monitor/state.py (the monitor's picture) needs no sockets or web stack; monitor/web.py
    reads telemetry through transport/ only (no node, control, plant, model, trial or
    serve); and nothing loads the web stack unless `monitor --web` asks for it."""
    loaded = _imports_after("import mpc_dose.monitor.state")
    assert not loaded & {"zmq", "starlette", "uvicorn", "socket", "numpy", "casadi"}
    loaded = _imports_after("import mpc_dose.monitor.web")
    assert not any(m.startswith(("mpc_dose.node", "mpc_dose.control", "mpc_dose.plant",
                                 "mpc_dose.model", "mpc_dose.trial", "mpc_dose.serve"))
                   for m in loaded)
    loaded = _imports_after("import mpc_dose.cli, mpc_dose.serve.controller")
    assert not loaded & {"starlette", "uvicorn", "sse_starlette"}
    assert not any(m.startswith("mpc_dose.monitor") for m in loaded)
