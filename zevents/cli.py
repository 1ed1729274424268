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
def parse(files: List[str] = typer.Argument(..., help="G-code files."),
          as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
          summary: bool = typer.Option(False, "--summary", help="Counts per event, layers, max Z.")):
    """Print the events of G-code files (as sent lines), or a summary."""
    from zevents import analysis

    raise typer.Exit(analysis.run_parse(files, as_json, summary))


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
