"""An example user controller for `kind = "python"` scenarios: on-off propofol.

A factory receives the inputs it sets, the control period and the scenario's
``[controller.python.options]``, and returns either an object with ``decide(t_s, readings)``
(see mpc_dose.control.base.Controller) or a function ``(t_s, readings) -> {input: rate}``
with rates in the input's amount unit per second.
"""


def bang_bang(inputs, period_s, high_rate=1.0, threshold=55.0, measured="bis"):
    def decide(t_s, readings):
        reading = readings.get(measured)
        awake = reading is None or reading.quality != "valid" or reading.value > threshold
        return {name: (high_rate if awake else 0.0) for name in inputs}

    return decide
