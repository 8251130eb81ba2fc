"""The live monitor of ``mpc-dose monitor --web``: what the loops' telemetry says, in a
browser.

:mod:`.state` is the picture (envelopes in, a JSON-ready view out; no I/O, no web stack);
:mod:`.web` serves it (Starlette on uvicorn, server-sent events, uPlot charts) and reads the
telemetry sockets. Only the CLI imports this package, and only for ``--web``.
"""
