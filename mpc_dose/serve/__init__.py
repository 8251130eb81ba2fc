"""The loop across processes: plant, controller and pump bridge as programs over ZeroMQ
(``mpc-dose serve ...``). Each program wires nodes (no I/O) to the transport (sockets) and
records what it does in the audit log."""
