"""The `zevents` command: thin typer adapters (options → config → module.run).  No logic lives here.

Every command imports its module lazily so that a quick command (`zevents fire`) starts fast.
"""
from __future__ import annotations

import sys
from typing import List, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="zevents: 3D-printer events on a ZeroMQ bus.")
config_app = typer.Typer(no_args_is_help=True, help="Check configuration files.")
app.add_typer(config_app, name="config")

ConfigOption = typer.Option(None, "--config", "-c", help="Config file (YAML); default: the embedded default.",
                            envvar="ZEVENTS_CONFIG")


def fail(message: str, code: int = 2) -> "typer.Exit":
    """One clear line on stderr and a non-zero exit."""
    typer.echo(f"zevents: {message}", err=True)
    return typer.Exit(code)


def load_config(path: Optional[str]):
    from zevents.config import ConfigError, load

    try:
        return load(path)
    except ConfigError as exc:
        raise fail(f"config error: {exc}")


@app.command()
def events(as_json: bool = typer.Option(False, "--json", help="One JSON document instead of a table.")):
    """List the event catalogue: name, group, payload keys."""
    from zevents.catalogue_view import run

    raise typer.Exit(run(as_json))


@app.command()
def broker(config: Optional[str] = ConfigOption):
    """Run the broker: the node's single sequencer (ingest → publish, replay ring, snapshots, heartbeats)."""
    from zevents import broker as broker_mod

    raise typer.Exit(broker_mod.run(load_config(config)))


keys_app = typer.Typer(no_args_is_help=True, help="CURVE keys for bus.curve (encrypted, authenticated bus).")
app.add_typer(keys_app, name="keys")


@keys_app.command("new")
def keys_new():
    """Print a new CURVE key pair (public and secret) for bus.curve."""
    from zevents import curve

    typer.echo(curve.keys_new(), nl=False)


@app.command()
def fire(event: str = typer.Argument(..., help="Event name, e.g. PrintStarted or a custom name."),
         payload: Optional[str] = typer.Option(None, "--payload", "-p", help="Payload as a JSON object."),
         src: str = typer.Option("user", "--src", help="Who caused the event."),
         timeout: float = typer.Option(5.0, "--timeout", help="Seconds to wait for the broker."),
         config: Optional[str] = ConfigOption):
    """Publish one event; exits 0 once the broker has it."""
    from zevents import bus

    raise typer.Exit(bus.run_fire(load_config(config), event, payload, src, timeout))


@app.command()
def tail(prefixes: Optional[List[str]] = typer.Argument(None, help="Topic prefixes (group or group/Event)."),
         as_json: bool = typer.Option(False, "--json", help="One JSON object per line."),
         count: Optional[int] = typer.Option(None, "--count", "-n", help="Exit 0 after this many events."),
         timeout: Optional[float] = typer.Option(None, "--timeout", help="Exit 1 if no event for this long."),
         since: Optional[int] = typer.Option(None, "--since", help="Replay the ring from this seq first."),
         config: Optional[str] = ConfigOption):
    """Print events as they come."""
    from zevents import bus

    raise typer.Exit(bus.run_tail(load_config(config), prefixes or [], as_json, count, timeout, since))


@app.command()
def run(config: Optional[str] = ConfigOption,
        demo: bool = typer.Option(False, "--demo", help="Also print a bundled sample file on the virtual printer."),
        port: Optional[str] = typer.Option(None, "--port", help="Serial port of a real printer (default: virtual)."),
        baud: Optional[int] = typer.Option(None, "--baud", help="Baud rate of the printer (0: auto)."),
        data_dir: Optional[str] = typer.Option(None, "--data-dir", help="Where files, timelapses, logs go."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="Don't show the events in the terminal.")):
    """Run a whole node: broker, printer link, hooks and the other services, supervised."""
    from zevents import node

    cfg = load_config(config)
    if port is not None:
        cfg.data["printer"]["port"] = port
    if baud is not None:
        cfg.data["printer"]["baudrate"] = baud
    if data_dir is not None:
        cfg.data["data_dir"] = data_dir
    if demo:
        from zevents import demo as demo_mod

        demo_mod.prepare(cfg)
    raise typer.Exit(node.run(cfg, demo=demo, show=not quiet))


@app.command()
def status(as_json: bool = typer.Option(False, "--json", help="One JSON document instead of tables."),
           config: Optional[str] = ConfigOption):
    """Show the node: each service (pid, uptime, restarts), the printer, the bus."""
    from zevents import node_status

    raise typer.Exit(node_status.run(load_config(config), as_json))


@app.command()
def parse(files: List[str] = typer.Argument(..., help="G-code files."),
          as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
          summary: bool = typer.Option(False, "--summary", help="Counts per event, layers, max Z.")):
    """Print the events of G-code files (as sent lines), or a summary."""
    from zevents import analysis

    raise typer.Exit(analysis.run_parse(files, as_json, summary))


hooks_app = typer.Typer(help="Event hooks: OctoPrint's events.subscriptions, run from the bus.")
app.add_typer(hooks_app, name="hooks")


@hooks_app.callback(invoke_without_command=True)
def hooks(ctx: typer.Context, config: Optional[str] = ConfigOption):
    """Run the hooks service (no subcommand); SIGHUP or a change of the config file reloads it."""
    ctx.obj = config
    if ctx.invoked_subcommand is not None:
        return
    from zevents.hooks import service as hooks_mod

    raise typer.Exit(hooks_mod.run(load_config(config)))


@hooks_app.command("test")
def hooks_test(ctx: typer.Context,
               event: str = typer.Argument(..., help="Event name, e.g. PrintDone."),
               payload: Optional[str] = typer.Option(None, "--payload", "-p", help="Payload as a JSON object."),
               run: bool = typer.Option(False, "--run", help="Run the matching hooks and print their results."),
               config: Optional[str] = ConfigOption):
    """Show which subscriptions match EVENT and the exact argv (or G-code) each would run."""
    from zevents.hooks import service as hooks_mod

    raise typer.Exit(hooks_mod.run_test(load_config(config or ctx.obj), event, payload, run))


@app.command()
def printer(port: Optional[str] = typer.Option(None, "--port", help="Serial device, pyserial URL or AUTO "
                                                                   "(default: printer.port)."),
            virtual: bool = typer.Option(False, "--virtual", help="Run the built-in virtual printer and use it."),
            baud: Optional[int] = typer.Option(None, "--baud", help="Baud rate; 0 detects it."),
            config: Optional[str] = ConfigOption):
    """Run the printer link: serial protocol, print jobs, command channel, printer events."""
    from zevents.printer import service

    if port and virtual:
        raise fail("give --port or --virtual, not both")
    raise typer.Exit(service.run(load_config(config), port=port, baud=baud, virtual=virtual))


@app.command("print")
def print_file(file: str = typer.Argument(..., help="Local G-code file to print."),
               config: Optional[str] = ConfigOption):
    """Select a local file and print it on the running link."""
    from zevents.printer import service

    raise typer.Exit(service.run_print(load_config(config), file))


@app.command()
def pause(config: Optional[str] = ConfigOption):
    """Pause the running print (prints the head position)."""
    from zevents.printer import service

    raise typer.Exit(service.run_control(load_config(config), "pause"))


@app.command()
def resume(config: Optional[str] = ConfigOption):
    """Resume the paused print."""
    from zevents.printer import service

    raise typer.Exit(service.run_control(load_config(config), "resume"))


@app.command()
def cancel(config: Optional[str] = ConfigOption):
    """Cancel the running print."""
    from zevents.printer import service

    raise typer.Exit(service.run_control(load_config(config), "cancel"))


@app.command()
def send(lines: List[str] = typer.Argument(..., help="G-code lines, one per argument."),
         config: Optional[str] = ConfigOption):
    """Send G-code to the printer through the running link."""
    from zevents.printer import service

    raise typer.Exit(service.run_send(load_config(config), lines))


@app.command()
def sd(action: str = typer.Argument(..., help="ls, upload or print."),
       name: Optional[str] = typer.Argument(None, help="upload: the local file; print: the SD file name."),
       remote: Optional[str] = typer.Option(None, "--as", help="upload: the name on the SD card (8.3)."),
       no_wait: bool = typer.Option(False, "--no-wait", help="upload: return once the transfer has started."),
       config: Optional[str] = ConfigOption):
    """The printer's SD card: list it, upload a local file to it, print a file from it."""
    from zevents.printer import service

    if action == "print":
        raise typer.Exit(service.run_sd(load_config(config), "print", remote=name))
    raise typer.Exit(service.run_sd(load_config(config), action, file=name, remote=remote, wait=not no_wait))


@app.command("virtual-printer")
def virtual_printer(link: Optional[str] = typer.Option(None, "--link", help="Also make this symlink to the device."),
                    firmware: str = typer.Option("marlin", "--firmware",
                                                 help="Reply formats: marlin, prusa, klipper, rrf, smoothie, "
                                                      "repetier."),
                    speed: float = typer.Option(100.0, "--speed", help="Simulated time factor; 0 = instant."),
                    tools: int = typer.Option(1, "--tools", help="Number of extruders."),
                    sd_dir: Optional[str] = typer.Option(None, "--sd-dir", help="Directory backing the SD card "
                                                                               "(default: a temporary one)."),
                    faults: Optional[List[str]] = typer.Option(None, "--fault", help="Fault to inject, repeatable: "
                                                               "KIND, KIND@LINE or KIND@N<number>, then :key=value,... e.g. "
                                                               "drop_line@100, silent@N20:seconds=3."),
                    crlf: bool = typer.Option(False, "--crlf", help="End replies with CRLF instead of LF."),
                    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what the printer does.")):
    """Run a simulated Marlin-like printer on a pseudo-terminal; prints its device path, serves until SIGTERM."""
    from zevents.printer import virtual

    raise typer.Exit(virtual.run(link=link, firmware=firmware, speed=speed, tools=tools, sd_dir=sd_dir,
                                 faults=faults or [], crlf=True if crlf else None, verbose=verbose))


@config_app.command("check")
def config_check(file: str = typer.Argument(..., help="Config file to validate.")):
    """Validate a config file; every problem with its file, line and key."""
    from zevents.config import check

    problems = check(file)
    for problem in problems:
        typer.echo(str(problem), err=True)
    if problems:
        raise typer.Exit(1)
    typer.echo(f"{file}: OK")


def main():
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
