"""The ``mpc-dose`` command line.

``mpc-dose models [NAME]``      list the model library, or one model (or model file) in detail
``mpc-dose simulate ...``       open-loop simulation of a model under a dosing table
``mpc-dose run SCENARIO ...``   one closed-loop run of a scenario for one patient
``mpc-dose mipd ...``           one patient's levels -> individual parameters and the next dose

Errors on input end the program with exit status 2 and one line naming the field, the value
and what was expected; nothing is written half.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .errors import ConfigError, MpcDoseError
from .units import parse_quantity

__all__ = ["main"]


def _key_values(text: str | None, flag: str) -> dict[str, str]:
    """Parse ``"a=1,b=x"`` into a dict, refusing malformed or repeated items."""
    if not text:
        return {}
    out: dict[str, str] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise MpcDoseError(f"{flag}: cannot read {item!r}; expected name=value")
        if key in out:
            raise MpcDoseError(f"{flag}: {key!r} given twice")
        out[key] = value
    return out


def _cmd_models(args: argparse.Namespace) -> int:
    from .model import library

    if args.name:
        lm = library.load(args.name)
        print(lm.model.describe())
        pop = lm.population
        print("  covariates:")
        for c in pop.covariates:
            kind = f"one of {', '.join(c.choices)}" if c.choices else f"[{c.unit}]"
            default = f" (default {c.default})" if c.default is not None else ""
            print(f"    {c.name} {kind}: {c.doc}{default}")
        print("  fixed effects:")
        for t in pop.thetas:
            print(f"    {t.name} = {t.value:g} {t.unit}: {t.doc}")
        if pop.random_effects:
            print("  between-subject variability (log-normal, omega^2 / CV):")
            for r in pop.random_effects:
                print(f"    {r.param}: {r.omega2:.4g} / {r.cv:.1%}")
        for r in pop.residual_errors:
            print(f"  residual error on {r.output}: additive {r.additive:g}, proportional "
                  f"{r.proportional:g} ({r.kind})")
        for e in lm.entries:
            for layout, read in e.table_layouts.items():
                print(f"  cohort table layout: [patient.table] layout = \"{layout}\" "
                      f"(its columns and units: the docstring of {read.__module__})")
        print("  references:")
        for ref in dict.fromkeys(lm.references):
            print(f"    - {ref}")
        for e in lm.entries:
            if e.notes:
                print(f"  notes ({e.name}): {e.notes}")
        return 0
    for e in library.ENTRIES.values():
        lm = library.load(e.name) if not e.requires else None
        print(f"{e.name}\n    {e.title}")
        if lm is not None:
            m = lm.model
            print("    inputs: " + ", ".join(f"{i.name} [{i.rate_unit}]" for i in m.inputs))
            print("    outputs: " + ", ".join(f"{o.name} [{o.unit}]" for o in m.outputs))
        else:
            print(f"    needs: {', '.join(e.requires)} (compose after a PK model with '+')")
        covs = ", ".join(c.name for c in e.population.covariates) or "none"
        print(f"    covariates: {covs}")
        print(f"    reference: {e.references[0]}")
    print("\nCompose with '+', e.g. propofol-eleveld+remifentanil-eleveld+bis-bouillon; "
          "details: mpc-dose models NAME")
    print("Your own model: a model file (.toml) is used wherever a name is, e.g. mpc-dose "
          "models my_model.toml; format: scenarios/models/README.md")
    return 0


def _cmd_simulate(args: argparse.Namespace) -> int:
    from .model import library
    from .model.simulation import simulate
    from .scenario import read_dosing_table

    lm = library.load(args.model)
    model = lm.model
    covariates = _key_values(args.covariates, "--covariates")
    overrides = _key_values(args.params, "--params")
    values: dict[str, float] = {}
    weight_kg = None
    if covariates or not lm.population.covariates:
        individual = lm.population.individual(covariates)
        values = individual.params
        weight_kg = individual.covariates.get("weight")
    elif not overrides:
        raise MpcDoseError(f"model {args.model!r} needs --covariates "
                           f"({', '.join(c.name for c in lm.population.covariates)}) or --params")
    values.update(_parameter_overrides(model, overrides))
    doses = read_dosing_table(args.doses, model, weight_kg=weight_kg) if args.doses else []
    duration_s = parse_quantity(args.duration, "s", what="--duration")
    step_s = parse_quantity(args.step, "s", what="--step")
    if not duration_s > 0 or not step_s > 0:
        raise MpcDoseError(f"--duration and --step must be > 0 s, got {duration_s} and {step_s}")
    n = int(np.floor(duration_s / step_s + 1e-9))
    times = np.arange(n + 1) * step_s
    if times[-1] < duration_s - 1e-9:
        times = np.append(times, duration_s)
    result = simulate(model, values, doses, times)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result.to_pandas().to_csv(out, index=False, float_format="%.10g")
    print(f"wrote {out} ({times.size} rows, {len(result.columns())} columns)")
    if args.plot is not None:
        from .plotting import plot_simulation

        png = Path(args.plot) if args.plot else out.with_suffix(".png")
        plot_simulation(result, png, title=f"{args.model}")
        print(f"wrote {png}")
    return 0


def _cmd_mipd(args: argparse.Namespace) -> int:
    from .clinic import MipdSettings, read_patient_history, run_mipd
    from .clinic.report import write_mipd
    from .control.dose_targets import ExposureTarget
    from .model import library

    lm = library.load(args.model)
    model = lm.model
    history = read_patient_history(args.data, lm, output=args.output, patient_id=args.id,
                                   lloq=None if args.lloq is None else parse_quantity(
                                       args.lloq, _output_unit(lm, args.output), what="--lloq",
                                       require_unit=True))
    unit = history.output_unit
    given: dict = {}   # only what was given: the defaults live in MipdSettings
    if args.target is not None:
        given["target"] = ExposureTarget.parse(args.target, unit)
    for flag, key in (("interval", "interval_s"), ("infusion", "infusion_s"),
                      ("start", "start_s")):
        if getattr(args, flag) is not None:
            given[key] = parse_quantity(getattr(args, flag), "s", what=f"--{flag}",
                                        require_unit=True)
    if args.lloq is not None:
        given["lloq"] = parse_quantity(args.lloq, unit, what="--lloq", require_unit=True)
    if args.round is not None:
        amount_unit = model.inputs[model.input_index(args.input)].amount_unit \
            if args.input in model.input_names else model.inputs[0].amount_unit
        given["round_step"] = parse_quantity(args.round, amount_unit, what="--round")
    if args.occasions:
        given["occasions_s"] = tuple(parse_quantity(t, "s", what="--occasions",
                                                    require_unit=True)
                                     for t in args.occasions.split(",") if t.strip())
    for flag, key in (("basis", "basis"), ("input", "input"), ("prior_weight", "prior_weight"),
                      ("level", "credible_level"), ("samples", "band_samples")):
        if getattr(args, flag) is not None:
            given[key] = getattr(args, flag)
    if args.no_occasions:
        given["estimate_occasions"] = False
    result = run_mipd(lm, history, MipdSettings(**given), np.random.default_rng(args.seed))
    paths = write_mipd(result, args.out)
    est = result.estimate
    print(f"{args.model}: {len(history.doses)} dose(s), {len(history.observations)} "
          f"level(s) [{unit}] from {Path(args.data).name}")
    print(f"fit: {'converged' if est.success else 'FAILED'} ({est.status}); eta "
          + ", ".join(f"{k} {v:.5f}" for k, v in est.eta.items()))
    print("parameters: " + ", ".join(f"{p.name} {p.value:.4g} {p.unit}"
                                     for p in result.parameters if p.eta is not None))
    rec = result.recommendation
    if rec is not None:
        if rec.success:
            print(f"recommended dose: {rec.dose:g} {rec.dose_unit} (exact "
                  f"{rec.dose_exact:.5g}); {result.settings.target.kind} at it "
                  f"{rec.achieved:.4g} {result.settings.target.unit}")
        else:
            print(f"no dose recommended ({rec.status}): {rec.message}")
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0 if est.success and (rec is None or rec.success) else 1


def _output_unit(lm, output: str | None) -> str:
    from .clinic import measured_output

    model = lm.model
    return model.outputs[model.output_index(measured_output(lm, output))].unit


def _cmd_run(args: argparse.Namespace) -> int:
    import json

    from .scenario import load_scenario
    from .trial.build import build_setup
    from .trial.closed_loop import run_closed_loop

    scenario = load_scenario(args.scenario)
    seed = scenario.scenario.seed if args.seed is None else args.seed
    if args.patient < 1:
        raise MpcDoseError(f"--patient: patients are numbered from 1, got {args.patient}")
    setup, patient = build_setup(scenario, args.patient - 1, seed)
    if args.realtime is not None:
        from dataclasses import replace

        setup = replace(setup, realtime_factor=args.realtime)
    def show(t_s, columns):  # minutes of wall time in real time: say how it goes
        measured = [f"{name.removeprefix('measured_')} {values[-1]:.4g}"
                    for name, values in columns.items()
                    if name.startswith("measured_") and values]
        mode = columns.get("controller_mode", [""])[-1:] or [""]
        print(f"t = {t_s:g} s of {setup.duration_s:g} s: " + ", ".join(measured)
              + f" [{mode[0]}]", flush=True)

    result = run_closed_loop(setup, progress=show if args.realtime is not None else None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    frame = result.to_pandas()
    frame.to_csv(out / "timeseries.csv", index=False, float_format="%.10g")
    with open(out / "events.csv", "w", encoding="utf-8") as f:
        f.write("time_s,kind,text\n")
        for t, kind, text in result.events:
            f.write(f"{t:.10g},{kind},\"{text.replace(chr(34), chr(39))}\"\n")
    (out / "patient.json").write_text(json.dumps({
        "scenario": scenario.scenario.name, "patient": args.patient, "seed": seed,
        "source": patient.source, "covariates": patient.covariates, "params": patient.params,
        "eta": patient.eta}, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    result.samples_frame().to_csv(out / "samples.csv", index=False, float_format="%.10g")
    result.deliveries_frame().to_csv(out / "deliveries.csv", index=False,
                                     float_format="%.10g")
    print(f"wrote {out / 'timeseries.csv'} ({len(frame)} rows), events.csv, samples.csv "
          f"(every reading at its sample time), deliveries.csv (every delivered rate "
          f"change), patient.json")
    if not args.no_plot:
        from .plotting import closed_loop_options, plot_closed_loop

        # the scenario's target, window and sensors, and every reading at its sample time
        plot_closed_loop(frame, out / "timeseries.png",
                         **closed_loop_options(scenario, setup.covariate_changes),
                         samples=result.samples_frame(), deliveries=result.deliveries_frame(),
                         title=f"{scenario.scenario.name}, patient {args.patient}, seed {seed}")
        print(f"wrote {out / 'timeseries.png'}")
    for column in frame.columns:
        if column.startswith("measured_"):
            values = frame[column]
            print(f"{column}: min {values.min():.4g}, max {values.max():.4g}, "
                  f"last {values.iloc[-1]:.4g}")
    _run_health(result, frame)
    if result.interrupted:
        print(f"interrupted at t = {float(frame.time_s.iloc[-1]) if len(frame) else 0:g} s: "
              f"the files hold the run until then")
        return 130
    return 0


def _run_health(result, frame) -> None:
    """What went wrong in a run, said at its end: alarms by code, time in FALLBACK, commands
    the pumps refused, deadline misses (a run whose pumps refused every command is not a
    success to stay quiet about)."""
    alarms: dict[str, int] = {}
    for _, kind, text in result.events:
        if kind == "alarm":
            code = text.split(":", 1)[0]
            alarms[code] = alarms.get(code, 0) + 1
    step = float(frame.time_s.iloc[1] - frame.time_s.iloc[0]) if len(frame) > 1 else 0.0
    fallback_s = float((frame["controller_mode"] == "FALLBACK").sum() * step) \
        if "controller_mode" in frame else 0.0
    end_s = float(frame.time_s.iloc[-1]) if len(frame) else 0.0
    print("alarms: " + (", ".join(f"{c} x{n}" for c, n in sorted(alarms.items()))
                        if alarms else "none"))
    print(f"time in FALLBACK: {fallback_s:g} s of {end_s:g} s")
    refused = result.refused_commands
    print("commands refused by the pumps: " + (
        ", ".join(f"{c} x{n}" for c, n in sorted(refused.items())) if refused else "none"))
    if result.deadline_misses:
        print(f"deadline misses: {result.deadline_misses}")


def _keys(args, *, server: bool):
    """CURVE keys from --keys (own secret file), --server-key (servers' public keys: FILE for
    all, ADDRESS=FILE for one) and, for a process that binds, --allow-keys (the public keys
    of the clients it lets in: files or folders of them). Printed at start-up."""
    allow = getattr(args, "allow_keys", None) or []
    if not getattr(args, "keys", None):
        if allow or getattr(args, "server_key", None):
            raise ConfigError("--allow-keys and --server-key need --keys (this process's own "
                              "secret key file)")
        return None
    from .transport.zmq_link import Keys, describe_keys

    if server and not allow:
        raise ConfigError("--keys without --allow-keys: a CURVE server lets in only the client "
                          "public keys it is given (deny by default); give --allow-keys "
                          "DIR_OR_FILE")
    if allow and not server:
        raise ConfigError(f"--allow-keys: {args.command} {getattr(args, 'role', '')} binds no "
                          f"socket (it is a client); give the servers' keys with --server-key")
    default, servers = None, {}
    for item in getattr(args, "server_key", None) or []:
        address, sep, path = item.rpartition("=")
        if sep and "://" in address:
            servers[address] = path
        elif default is None:
            default = item
        else:
            raise ConfigError(f"--server-key {item!r}: one default key file only; name the "
                              f"others ADDRESS=FILE")
    keys = Keys.load(args.keys, default, servers=servers, allow=allow)
    for line in describe_keys(keys):
        print(line, flush=True)
    return keys


def _pairs(items: Sequence[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items or ():
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise ConfigError(f"{flag} {item!r}: expected NAME=ADDRESS")
        out[name] = value
    return out


_SILENT_PEER = ("is the other process running, at that address? With CURVE keys, a wrong "
                "key looks exactly like silence: the server's --allow-keys must hold this "
                "client's public key, and the client's --server-key must be the server's")


def _cmd_serve(args) -> int:
    try:
        return _serve(args)
    except TimeoutError as err:
        raise MpcDoseError(f"{err}; {_SILENT_PEER}") from None


def _serve_sensor_bridge(args) -> int:
    from .serve.sensor_bridge import SensorBridgeProcess, load_sensor_bridge_config

    config = load_sensor_bridge_config(args.target)
    b = config.bridge
    # a CURVE server for its telemetry; with a Nightscout sink also a client of the
    # telemetry it follows (give those servers' keys with --server-key)
    bridge = SensorBridgeProcess(config, audit=args.audit, keys=_keys(args, server=True))
    device = config.device
    print(f"sensor bridge ({b.kind}): telemetry {b.telemetry}, stale after "
          f"{device.stale_after_s:g} s, link lost after {device.link_timeout_s:g} s",
          flush=True)
    return _run_bridge(bridge, args.duration)


def _run_bridge(bridge, duration_s: float | None) -> int:
    """Run a bridge process (pump, sensor, SDC) until *duration_s* or SIGTERM, then close
    it (its pumps stopped, its sockets closed)."""
    import signal

    signal.signal(signal.SIGTERM, lambda *_: bridge.stop())
    try:
        bridge.run(duration_s)
    finally:
        bridge.close()
    return 0


def _serve(args) -> int:
    from .scenario import load_scenario

    if args.role == "pump-bridge":
        from .serve.pump_bridge import PumpBridgeProcess, load_bridge_config

        config = load_bridge_config(args.target)
        bridge = PumpBridgeProcess(config, audit=args.audit, keys=_keys(args, server=True))
        print(f"pump bridge: commands {config.bridge.commands}, telemetry "
              f"{config.bridge.telemetry}, {len(config.pump)} pump(s), " + (
                  f"hardware watchdog {config.watchdog_s:g} s" if config.watchdog_s else
                  "NO hardware watchdog (no_hardware_watchdog = true)"), flush=True)
        return _run_bridge(bridge, args.duration)
    if args.role == "sensor-bridge":
        return _serve_sensor_bridge(args)
    if args.role == "sdc-bridge":
        return _serve_sdc_bridge(args)
    scenario = load_scenario(args.target)
    seed = scenario.scenario.seed if args.seed is None else args.seed
    if args.role == "plant":
        from .serve.plant import serve_plant

        result = serve_plant(scenario, args.patient - 1, seed, telemetry=args.telemetry,
                             commands=args.commands, external=_pairs(args.external,
                                                                     "--external"),
                             realtime_factor=args.realtime, audit=args.audit,
                             keys=_keys(args, server=True), wait_s=args.wait)
        if args.out:
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            result.to_pandas().to_csv(out, index=False, float_format="%.10g")
            print(f"wrote {out}")
        return 0
    _check_controller_options(args)
    if args.workers != 0:
        return _serve_host(args, scenario, seed)
    if args.solve_budget is not None or args.stagger is not None:
        raise ConfigError("--solve-budget and --stagger need worker processes: with "
                          "--workers 0 the controllers decide in the host's own process, "
                          "which cannot abandon a decision")
    from .serve.controller import serve_controller

    if args.ward:  # every controller in this one process
        ward = _ward(args, scenario)
        process = serve_controller(scenario, ward.patients, ward.telemetry, ward.pumps,
                                   plant_commands=ward.commands, sensors=ward.sensors,
                                   realtime=args.realtime is not None,
                                   duration_s=args.duration, audit=args.audit,
                                   keys=_keys(args, server=args.publish is not None),
                                   wait_s=args.wait, publish=args.publish)
        print(f"controller: {len(process.links)} patient(s) in one process, "
              f"{sum(len(link.cycle_s) for link in process.links)} cycles, missed acks "
              f"{sum(link.missed_acks for link in process.links)}")
        return 0

    ward = _one_patient(args, scenario, seed)
    process = serve_controller(scenario, ward.patients, ward.telemetry, ward.pumps,
                               plant_commands=ward.commands, sensors=ward.sensors,
                               realtime=args.realtime is not None,
                               duration_s=args.duration, audit=args.audit,
                               keys=_keys(args, server=args.publish is not None),
                               wait_s=args.wait, publish=args.publish)
    link = process.links[0]
    print(f"controller: {len(link.cycle_s)} cycles, missed acks {link.missed_acks}")
    return 0


def _check_controller_options(args) -> None:
    """The options of a controller without a plant, and of its run's length."""
    if args.realtime is None and args.no_plant:
        raise ConfigError("--no-plant needs --realtime 1: without a simulated plant nobody "
                          "sends the lock-step's ticks; the controller's own clock (UTC) "
                          "sets the instants")
    if args.realtime is None and args.duration is not None:
        raise ConfigError(f"--duration {args.duration:g} with serve controller needs "
                          f"--realtime (in lock-step the plant's end ends the run)")
    if args.ward and (args.no_plant or args.sensor):
        raise ConfigError("--no-plant and --sensor with --ward: give them in the ward file "
                          "(an empty commands cell, a sensors column)")


def _one_patient(args, scenario, seed):
    """``--patient`` with its addresses as a one-row ward."""
    from .serve.host import Ward

    pumps = _pairs(args.pump, "--pump")
    if args.no_plant:
        missing = sorted(p.pump for p in scenario.pump if p.pump not in pumps)
        if missing:
            raise ConfigError(f"--no-plant: pump(s) {', '.join(missing)} of the scenario "
                              f"have no --pump NAME=ADDRESS (without a plant every pump is "
                              f"behind a bridge)")
        routes, commands = pumps, None
    else:
        routes = {p.pump: args.commands for p in scenario.pump}
        routes.update(pumps)
        commands = args.commands
    return Ward([(args.patient - 1, seed)], [args.telemetry], [commands], [routes],
                [list(args.sensor or [])])


def _ward(args, scenario):
    from .serve.host import read_ward

    ward = read_ward(args.ward, scenario, args.seed)
    if args.realtime is None and None in ward.commands:
        raise ConfigError(f"--ward {args.ward!r}: a row without commands (no simulated "
                          f"plant) needs --realtime 1: nobody would send the lock-step's "
                          f"ticks")
    return ward


def _serve_host(args, scenario, seed) -> int:
    """``serve controller`` with the controllers in worker processes (hil/README.md, "A
    ward on one host")."""
    from .serve.host import serve_host

    if args.ward:
        if args.pump:
            raise ConfigError("--pump with --ward: give each pump's address in the ward "
                              "file's pump:NAME column")
        ward = _ward(args, scenario)
    else:
        ward = _one_patient(args, scenario, seed)
    host = serve_host(scenario, ward.patients, ward.telemetry, ward.pumps,
                      plant_commands=ward.commands, sensors=ward.sensors,
                      realtime=args.realtime is not None, duration_s=args.duration,
                      audit=args.audit, keys=_keys(args, server=args.publish is not None),
                      wait_s=args.wait, workers=args.workers,
                      solve_budget_s=args.solve_budget, stagger_s=args.stagger,
                      publish=args.publish)
    cycles = sum(len(link.cycle_s) for link in host.links)
    lost = sum(w.lost for w in host.pool.workers)
    print(f"controller host: {len(host.links)} patient(s) on {host.n_workers} worker "
          f"process(es), {cycles} cycles, missed acks "
          f"{sum(link.missed_acks for link in host.links)}, missed deadlines "
          f"{host.missed_deadlines}, decisions abandoned past the solve budget "
          f"{host.abandoned}" + (f", worker processes lost {lost}" if lost else ""))
    return 0


def _serve_sdc_bridge(args) -> int:
    from .serve.sdc_bridge import SdcBridgeProcess, load_sdc_bridge_config
    from .transport.sdc_link import require_sdc11073

    config = load_sdc_bridge_config(args.target)
    try:
        require_sdc11073()
    except ImportError as err:
        raise MpcDoseError(str(err)) from None
    b = config.bridge
    bridge = SdcBridgeProcess(config, audit=args.audit,
                              keys=_keys(args, server=True))
    print(f"sdc bridge: provider {b.address or f'{b.epr} (WS-Discovery on {b.adapter})'}, "
          f"telemetry {b.telemetry}, {len(config.metric)} metric(s), {len(config.pump)} "
          f"pump(s)" + (f", commands {b.commands}" if config.pump else ""), flush=True)
    return _run_bridge(bridge, args.duration)


def _cmd_trial(args) -> int:
    from .scenario import load_scenario
    from .trial.runner import run_trial

    scenario = load_scenario(args.scenario)
    seed = scenario.scenario.seed if args.seed is None else args.seed
    patients = _patient_range(args, scenario)
    with _executor(args) as executor:
        result = run_trial(args.scenario, args.out, patients=patients, seed=seed,
                           executor=executor, progress=not args.quiet, cohort=args.cohort)
    print(f"{len(result.metrics)} patients ({result.ran} run now) -> {args.out}/metrics.csv, "
          f"summary.csv, series/")
    summary = result.summary
    for name in summary.index[:12]:
        row = summary.loc[name]
        print(f"  {name:45s} {row['mean']:10.4g} +- {row['sd']:.3g}  "
              f"[{row['min']:.4g}, {row['max']:.4g}]")
    print(_trial_health(result.metrics))
    errors = [n for n in summary.index if n.startswith("estimate_error_")]
    if errors:  # how the controller's estimates converged as readings arrived
        print("  estimates (relative error |estimate / true - 1|: median, 90th percentile):")
        for name in errors:
            values = result.metrics[name].dropna()
            print(f"  {name:55s} {values.median():8.3f} {values.quantile(0.9):8.3f}")
    return 0


def _trial_health(metrics) -> str:
    """What went wrong across a trial, said whether or not it is among the first metrics:
    patients with alarms, time in FALLBACK, commands the pumps refused, deadline misses."""
    parts = []
    for column, what in (("alarms", "alarms"), ("fallback_time_s", "time in FALLBACK"),
                         ("commands_refused", "commands refused by the pumps"),
                         ("deadline_misses", "deadline misses")):
        if column in metrics:
            hit = metrics[column].fillna(0) > 0
            parts.append(f"{what}: {int(hit.sum())} of {len(metrics)} patients" if hit.any()
                         else f"{what}: none")
    return "  health: " + "; ".join(parts)


def _patient_range(args, scenario) -> range:
    """Patients --first .. --first + --patients - 1 (0-based range). Without --patients: every
    row of a --cohort file, else the first 10 of the scenario's cohort."""
    from .trial.build import cohort_size, with_cohort

    if args.first < 1:
        raise ConfigError(f"--first: patients are numbered from 1, got {args.first}")
    count = args.patients
    if count is None:
        count = cohort_size(with_cohort(scenario, args.cohort)) - (args.first - 1) \
            if args.cohort else 10
    if count < 1:
        raise ConfigError(f"--patients: expected >= 1, got {count}")
    return range(args.first - 1, args.first - 1 + count)


@contextlib.contextmanager
def _executor(args):
    """A Dask cluster's executor (--scheduler), a process pool (--workers > 1), or None
    (in this process); closed on the way out."""
    from concurrent.futures import ProcessPoolExecutor

    if args.scheduler:
        from distributed import Client

        try:
            client = Client(args.scheduler, timeout="10s")
        except (OSError, TimeoutError) as err:
            raise ConfigError(f"--scheduler {args.scheduler}: no Dask scheduler answered "
                              f"within 10 s ({type(err).__name__}); start one with "
                              f"`dask scheduler` and its workers with `dask worker ADDRESS`, "
                              f"or leave --scheduler out to use local processes") from None
        with client:
            yield client.get_executor()
    elif args.workers > 1:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # inherited by the workers
        with ProcessPoolExecutor(args.workers) as pool:
            yield pool
    else:
        yield None


def _cmd_compare(args) -> int:
    from .scenario import load_scenario
    from .trial.report import compare_table
    from .trial.runner import run_trial

    scenarios = [load_scenario(path) for path in args.scenarios]
    cohorts = {sc.scenario.streams_name for sc in scenarios}
    if len(cohorts) != 1:
        raise ConfigError(f"compare: the scenarios draw different patients (cohorts "
                          f"{sorted(cohorts)}); give them the same scenario.cohort")
    names = [sc.scenario.name for sc in scenarios]
    if len(set(names)) != len(names):
        raise ConfigError(f"compare: scenario names must differ, got {names}")
    seed = scenarios[0].scenario.seed if args.seed is None else args.seed
    patients = _patient_range(args, scenarios[0])
    out = Path(args.out)
    with _executor(args) as executor:
        for path, name in zip(args.scenarios, names):
            run_trial(path, out / name, patients=patients, seed=seed, executor=executor,
                      progress=not args.quiet, cohort=args.cohort)
    table = compare_table({name: out / name for name in names})
    table.to_csv(out / "comparison.csv", float_format="%.6g")
    print(table.to_string(float_format=lambda v: f"{v:.4g}"))
    print(f"wrote {out / 'comparison.csv'}; `mpc-dose report {out}` for the plots")
    return 0


def _cmd_tune(args) -> int:
    from .tune import run_sweep

    with _executor(args) as executor:
        result = run_sweep(args.scenario, args.space, args.out, executor=executor,
                           progress=not args.quiet, strategy=args.strategy,
                           settings=args.settings)
    table = result.table
    print(f"{len(table)} settings ({int(table.feasible.sum())} hold every limit, "
          f"{int(table.pareto.sum())} on the Pareto front) -> {args.out}/settings.csv")
    print((Path(args.out) / "recommendation.txt").read_text("utf-8").rstrip())
    print(f"wrote {args.out}/recommended.toml; `mpc-dose report {args.out}` for the plots")
    return 0


def _cmd_report(args) -> int:
    if (Path(args.results) / "sweep.json").exists():
        from .tune.report import write_tune_report as write_report
    else:
        from .trial.report import write_report

    path = write_report(args.results, args.out)
    print(f"wrote {path}")
    return 0


def _cmd_export(args) -> int:
    from .trial.report import nonmem_dataset

    data, sidecar = nonmem_dataset(args.trial, observe=args.observe, every_s=args.every)
    data.to_csv(args.nonmem, index=False)
    info = Path(args.nonmem).with_suffix(".txt")
    info.write_text(sidecar, encoding="utf-8")
    print(f"wrote {args.nonmem} ({len(data)} records, {data.ID.nunique()} patients) and "
          f"{info} (columns, units, covariate codes)")
    return 0


def _cmd_keys(args) -> int:
    from .transport.zmq_link import generate_keys

    public, secret = generate_keys(args.directory, args.name)
    print(f"wrote {public} (public: give it to the peers) and {secret} (secret: keep it "
          f"here, never in a repository)")
    return 0


def _cmd_log(args) -> int:
    from .audit import export_csv

    count = export_csv(args.database, args.out, process=args.process)
    print(f"wrote {args.out} ({count} rows)")
    return 0


def _cmd_monitor(args) -> int:
    from .monitor.state import loops_of

    addresses = loops_of(args.telemetry)
    if args.web:
        from .monitor.web import check_access, read_token, serve_web

        token = read_token(args.token)
        check_access(args.host, token)  # before any socket opens
        shown = f"[{args.host}]" if ":" in args.host else args.host
        print(f"web monitor: http://{shown}:{args.port}/" + ("?token=..." if token else "")
              + f" ({len(addresses)} telemetry address(es)"
              + (f", acknowledgements on {args.ack}" if args.ack else "")
              + ("" if args.audit else "; no --audit: alarms cannot be acknowledged") + ")",
              flush=True)
        serve_web(addresses, host=args.host, port=args.port, token=token,
                  keys=_keys(args, server=args.ack is not None), ack=args.ack,
                  audit=args.audit, window_s=args.window, duration_s=args.duration)
        return 0
    given = [flag for flag, value in (("--token", args.token), ("--ack", args.ack),
                                      ("--audit", args.audit), ("--allow-keys", args.allow_keys))
             if value]
    if given:
        raise ConfigError(f"{', '.join(given)}: only with --web (the page's options)")
    import zmq

    from .transport.zmq_link import TelemetryReader

    context = zmq.Context()
    end = None if args.duration is None else time.monotonic() + args.duration
    states: dict[str, str] = {}   # a heartbeat is shown when its sender's state changes
    try:
        reader = TelemetryReader(context, [address for _, address in addresses],
                                 keys=_keys(args, server=False))
        while end is None or time.monotonic() < end:
            for env in reader.drain(0.5):
                m = env.message
                t = "" if env.t_sim is None else f"t={env.t_sim:8.1f} s "
                if m.type == "measurement":
                    unit = "" if m.unit == "1" else f" {m.unit}"  # "1": dimensionless
                    print(f"{t}{env.src}: {m.var} = {m.value:.4g}{unit} [{m.quality}]")
                elif m.type == "pump_status":
                    print(f"{t}{env.src}: pump {m.pump} {m.state} {m.rate:.4g} {m.unit} "
                          f"mode {m.mode}")
                elif m.type == "alarm":
                    print(f"{t}{env.src}: ALARM {m.priority} {m.code}: {m.text}")
                elif m.type == "heartbeat" and m.state != "tick" and \
                        states.get(env.src) != m.state:
                    states[env.src] = m.state
                    print(f"{t}{env.src}: {m.role} {m.state}")
                elif m.type == "alarm_ack":
                    print(f"{t}{env.src}: ALARM ACKNOWLEDGED {m.code} of {m.alarm_src} by "
                          f"{m.operator}" + (f": {m.text}" if m.text else ""))
    except KeyboardInterrupt:
        pass
    finally:
        context.destroy(linger=0)
    return 0


def _parameter_overrides(model, given: dict[str, str]) -> dict[str, float]:
    """Individual parameter values by name, optionally with a unit suffix (``_L_per_h``)."""
    return dict(model.parameter_value(key, raw, where="--params") for key, raw in given.items())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mpc-dose", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list the model library, or show one model")
    p.add_argument("name", nargs="?", help="a library model (propofol-schnider), a model file "
                                           "(my_model.toml), or several joined by '+'")
    p.set_defaults(run=_cmd_models)

    p = sub.add_parser("simulate", help="open-loop simulation under a dosing table",
                       description="Simulate a model for one patient under a dosing "
                                   "table; writes a CSV with units in the column names.")
    p.add_argument("--model", required=True, help="library model or model file (.toml), "
                                                  "several joined by '+'")
    p.add_argument("--covariates", help="e.g. age=35,height_cm=170,weight_kg=70,sex=male "
                                        "(a name without unit suffix is in its declared unit)")
    p.add_argument("--params", help="individual parameter values overriding the typical ones, "
                                    "e.g. propofol_cl1=1.6 or propofol_cl1_L_per_h=96")
    p.add_argument("--doses", help="dosing CSV (time_<unit>, input, amount_<unit>, "
                                   "rate_<unit>, duration_<unit>, evid, addl, ii_<unit>)")
    p.add_argument("--duration", required=True, help="simulated time [s], or with a unit: 30min")
    p.add_argument("--step", default="10", help="output step [s], or with a unit (default 10 s)")
    p.add_argument("--out", required=True, help="CSV file to write")
    p.add_argument("--plot", nargs="?", const="", default=None,
                   help="also write a PNG (default: the CSV name with .png)")
    p.set_defaults(run=_cmd_simulate)

    p = sub.add_parser(
        "mipd", help="one patient's doses and levels -> individual parameters and a dose",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Model-informed precision dosing for one patient: the MAP estimate of "
                    "the individual parameters from the history in --data (with their "
                    "uncertainty from the posterior curvature), the predicted levels with a "
                    "credible band, and with --target the dose of a regimen that meets it. "
                    "Writes OUT/estimate.json, report.txt, prediction.csv, prediction.png. "
                    "Exit status 1 when the fit or the dose search failed (the files say "
                    "why), 2 for bad input.",
        epilog="""data layouts:
  dosing table: time_<unit>,input,amount_<unit>,duration_<unit>,evid,dv_<unit>,<covariates>
                (evid 1 dose, 0 level; optional blq 0/1, occasion; covariates named as
                `mpc-dose models M` lists them, a later value changes it from that time)
  NONMEM:       ID,TIME,AMT,RATE,EVID,MDV,DV,CMT,<COVARIATES> with the sidecar .txt of
                `mpc-dose export --nonmem` (units and codes); optional BLQ, OCC

targets (levels in the output's unit unless a unit is given):
  auc24=400          AUC over 24 h = 400 (output unit x h): 24 h / interval x AUC(interval)
  trough=15          level at the end of the interval, before the next dose
  conc=20@6h         level 6 h after the start of the dose
  time_above=10:0.6  60 % of the interval above 10 (also 10mg/L:60%)
judged --basis steady-state (default: the regimen repeated), next (after the history) or
first-dose (a drug-naive patient)""")
    p.add_argument("--model", required=True, help="library model (or model file)")
    p.add_argument("--data", required=True, help="the patient's history (CSV)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--output", default=None,
                   help="the model output the levels measure (default: the only one with a "
                        "residual error)")
    p.add_argument("--id", default=None, help="NONMEM layout: the patient ID to read")
    p.add_argument("--target", default=None,
                   help="auc24=V, trough=V, conc=V@TIME or time_above=LEVEL:FRACTION")
    p.add_argument("--interval", default=None, help="dosing interval with its unit, e.g. 12h")
    p.add_argument("--infusion", default=None,
                   help="infusion time with its unit, e.g. 1h (0h: a bolus)")
    p.add_argument("--round", default=None,
                   help="dose step, in the input's amount unit or with a unit (250, 250mg)")
    p.add_argument("--basis", default=None, choices=["steady-state", "next", "first-dose"],
                   help="where the target is judged (default steady-state)")
    p.add_argument("--start", default=None,
                   help="first dose of the regimen, e.g. 48h (default: one interval after "
                        "the last dose, or the end of the record if later)")
    p.add_argument("--input", default=None, help="the input dosed (default: the only one)")
    p.add_argument("--lloq", default=None,
                   help="limit of quantification with its unit, e.g. 2mg/L: levels below it "
                        "(and blq rows) enter by Beal's M3")
    p.add_argument("--prior-weight", type=float, default=None,
                   help="weight of the population prior: 1 MAP (default), 0 maximum "
                        "likelihood, between: a flattened prior")
    p.add_argument("--occasions", default=None,
                   help="starts of new occasions (inter-occasion variability), e.g. 24h,48h")
    p.add_argument("--no-occasions", action="store_true",
                   help="estimate no occasion effects even if the model declares them")
    p.add_argument("--level", type=float, default=None,
                   help="probability of the intervals and the band (default 0.95)")
    p.add_argument("--samples", type=int, default=None,
                   help="draws of the random effects for the band (default 400)")
    p.add_argument("--seed", type=int, default=0, help="seed of the band's draws (default 0)")
    p.set_defaults(run=_cmd_mipd)

    p = sub.add_parser("run", help="one closed-loop run of a scenario for one patient",
                       description="Run one patient of a scenario in closed loop; writes "
                                   "DIR/timeseries.csv, events.csv, samples.csv, "
                                   "deliveries.csv, patient.json and a PNG.")
    p.add_argument("scenario", help="scenario TOML file")
    p.add_argument("--patient", type=int, default=1, help="patient number, from 1 (default 1)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: the scenario's)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--realtime", type=float, default=None, metavar="FACTOR",
                   help="run against the wall clock: FACTOR wall seconds per simulated second")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.set_defaults(run=_cmd_run)

    p = sub.add_parser("serve", help="run one part of the loop as a process over ZeroMQ",
                       description="plant SCENARIO | controller SCENARIO (one patient, or a ward "
                                   "of them with --ward: the controllers in --workers "
                                   "processes) | pump-bridge CONFIG | sensor-bridge CONFIG | "
                                   "sdc-bridge CONFIG")
    p.add_argument("role", choices=["plant", "controller", "pump-bridge", "sensor-bridge",
                                    "sdc-bridge"])
    p.add_argument("target", help="scenario TOML (plant, controller) or bridge config TOML")
    p.add_argument("--patient", type=int, default=1, help="patient number, from 1")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--telemetry", default="tcp://127.0.0.1:5560",
                   help="the plant's telemetry (PUB) address")
    p.add_argument("--commands", default="tcp://127.0.0.1:5561",
                   help="the plant's command (ROUTER) address")
    p.add_argument("--pump", action="append", metavar="NAME=ADDRESS",
                   help="controller: send this pump's commands to a bridge")
    p.add_argument("--external", action="append", metavar="NAME=ADDRESS",
                   help="plant: this pump is a bridge's; follow its telemetry at ADDRESS")
    p.add_argument("--sensor", action="append", metavar="ADDRESS",
                   help="controller: also follow this telemetry (a sensor bridge, an SDC "
                        "bridge, a pump bridge's telemetry): its readings, alarms and pump "
                        "status reach the patient's controller (repeatable)")
    p.add_argument("--no-plant", action="store_true",
                   help="controller: a real patient, no simulated plant: --telemetry is a "
                        "device bridge's, every pump behind --pump, with --realtime 1")
    p.add_argument("--publish", default=None, metavar="ADDRESS",
                   help="controller: publish each decision's plan, prediction, mode and "
                        "alarms as telemetry (PUB) at ADDRESS, for `mpc-dose monitor`")
    p.add_argument("--realtime", type=float, default=None, metavar="FACTOR",
                   help="against the wall clock (default: simulated, lock-step)")
    p.add_argument("--duration", type=float, default=None,
                   help="pump-bridge, sensor-bridge, sdc-bridge, controller --realtime: "
                        "stop after [s] (controller default: the scenario's duration)")
    p.add_argument("--wait", type=float, default=30.0,
                   help="plant, controller: how long to wait for the other side at start [s]")
    p.add_argument("--audit", default=None, help="SQLite audit log to append to")
    p.add_argument("--out", default=None, help="plant: CSV of the recorded series")
    p.add_argument("--ward", default=None, metavar="CSV",
                   help="controller: serve many patients, one row each (columns patient, "
                        "seed, telemetry, commands, optional pump:NAME); instead of "
                        "--patient/--telemetry/--commands")
    p.add_argument("--workers", type=int, default=None,
                   help="controller: worker processes that run the patients' controllers "
                        "(default: the CPU count, at most one per patient; 0: in this "
                        "process, without solve budget or stagger)")
    p.add_argument("--solve-budget", type=float, default=None, metavar="SECONDS",
                   help="controller: a decision not back within this is abandoned for the "
                        "shifted previous plan (else the supervisor's fallback); below the "
                        "period (default: half of it in real time, none in lock-step)")
    p.add_argument("--stagger", type=float, default=None, metavar="SECONDS",
                   help="controller, real time: spread the patients' control instants over "
                        "this (0 to the period; default: the period), so first solves do "
                        "not all come at once")
    p.add_argument("--keys", default=None, help="own CURVE secret key file (NAME.key_secret)")
    p.add_argument("--allow-keys", action="append", metavar="DIR_OR_FILE",
                   help="plant, pump-bridge, sensor-bridge, sdc-bridge, controller --publish "
                        "with --keys: public key files (or folders of *.key files) of the "
                        "clients let in; everyone else is refused")
    p.add_argument("--server-key", action="append", metavar="[ADDRESS=]FILE",
                   help="with --keys: a server's public key file (for every server, or for "
                        "the one at ADDRESS)")
    p.set_defaults(run=_cmd_serve)

    p = sub.add_parser("trial", help="closed-loop trial over a cohort",
                       description="Run a scenario for many patients; per-patient series "
                                   "(Parquet) and metrics as each finishes; rerun the same "
                                   "command to resume a killed trial.")
    p.add_argument("scenario")
    p.add_argument("--patients", type=int, default=None,
                   help="how many (default: every row of --cohort, else 10)")
    p.add_argument("--first", type=int, default=1, help="first patient number (default 1)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="worker processes (default: the CPUs)")
    p.add_argument("--scheduler", default=None, help="Dask scheduler address (instead of "
                                                     "local processes)")
    p.add_argument("--out", required=True, help="results folder")
    p.add_argument("--cohort", default=None, help="CSV of individual patients (the columns "
                                                   "of the scenario's [patient.table])")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_cmd_trial)

    p = sub.add_parser("compare", help="several controllers on the same patients",
                       description="Run each scenario (same scenario.cohort: same patients, "
                                   "noise, disturbances) into OUT/<name>; writes "
                                   "OUT/comparison.csv.")
    p.add_argument("scenarios", nargs="+")
    p.add_argument("--patients", type=int, default=None,
                   help="how many (default: every row of --cohort, else 10)")
    p.add_argument("--first", type=int, default=1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--scheduler", default=None)
    p.add_argument("--cohort", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=_cmd_compare)

    p = sub.add_parser("tune", help="sweep controller settings over a training cohort",
                       description="Run every setting of SPACE (scenario keys to vary, "
                                   "objectives, limits, strategy, training and held-out "
                                   "patients) as a trial; writes OUT/settings.csv, the Pareto "
                                   "front, OUT/recommended.toml; rerun to resume.")
    p.add_argument("scenario")
    p.add_argument("--space", required=True, help="the space file (TOML)")
    p.add_argument("--out", required=True)
    p.add_argument("--strategy", choices=["grid", "random", "sobol", "optuna"], default=None,
                   help="instead of the space file's")
    p.add_argument("--settings", type=int, default=None, help="instead of the space file's")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--scheduler", default=None, help="Dask scheduler address")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=_cmd_tune)

    p = sub.add_parser("report", help="self-contained HTML report of a trial, comparison or "
                                      "tuning sweep")
    p.add_argument("results", help="a trial, comparison or sweep folder")
    p.add_argument("--out", default=None, help="HTML file (default RESULTS/report.html)")
    p.set_defaults(run=_cmd_report)

    p = sub.add_parser("export", help="a trial as a NONMEM-style dataset")
    p.add_argument("trial", help="a trial folder")
    p.add_argument("--nonmem", required=True, help="CSV to write")
    p.add_argument("--observe", default=None, help="measured column (default: the first)")
    p.add_argument("--every", type=float, default=None, help="one observation every [s]")
    p.set_defaults(run=_cmd_export)

    p = sub.add_parser("keys", help="generate a CURVE key pair")
    p.add_argument("directory")
    p.add_argument("name")
    p.set_defaults(run=_cmd_keys)

    p = sub.add_parser("log", help="audit log tools")
    p.add_argument("action", choices=["export"])
    p.add_argument("database")
    p.add_argument("--out", required=True, help="CSV file to write")
    p.add_argument("--process", default=None, help="only this process's rows")
    p.set_defaults(run=_cmd_log)

    p = sub.add_parser("monitor", help="live values, modes and alarms from telemetry",
                       description="Print the loops' telemetry, or with --web serve a page "
                                   "that shows each loop live (measured and predicted output "
                                   "with the target band, planned and delivered rates, mode, "
                                   "alarms to acknowledge, link health, deadline misses).")
    p.add_argument("telemetry", nargs="+", metavar="[LOOP=]ADDRESS",
                   help="telemetry (PUB) addresses: plant, pump bridges, sensors, a "
                        "controller's --publish; LOOP= groups addresses into one loop of "
                        "the page (default: all in one)")
    p.add_argument("--duration", type=float, default=None, help="stop after [s]")
    p.add_argument("--web", action="store_true", help="serve the live page instead of "
                                                      "printing lines")
    p.add_argument("--host", default="127.0.0.1",
                   help="--web: the address to serve on (default loopback; any other needs "
                        "--token)")
    p.add_argument("--port", type=int, default=8080, help="--web: the TCP port (default 8080)")
    p.add_argument("--token", default=None, metavar="TOKEN|@FILE",
                   help="--web: access token every request must carry (open "
                        "/?token=TOKEN once); @FILE reads it from a file")
    p.add_argument("--ack", default=None, metavar="ADDRESS",
                   help="--web: publish alarm acknowledgements (alarm_ack) on this PUB "
                        "address")
    p.add_argument("--audit", default=None,
                   help="--web: SQLite audit log for acknowledgements (without it the page "
                        "cannot acknowledge)")
    p.add_argument("--window", type=float, default=None,
                   help="--web: history shown per loop [s of the loop's clock] (default "
                        "30 min)")
    p.add_argument("--allow-keys", action="append", metavar="DIR_OR_FILE",
                   help="--web --ack with --keys: public keys of the clients let in to the "
                        "acknowledgement socket")
    p.add_argument("--keys", default=None, help="own CURVE secret key file")
    p.add_argument("--server-key", action="append", metavar="[ADDRESS=]FILE",
                   help="a publisher's public key file (for all, or for the one at ADDRESS)")
    p.set_defaults(run=_cmd_monitor)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except MpcDoseError as err:
        print(f"mpc-dose {args.command}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head`: not an error of ours
        sys.stderr.close()
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
