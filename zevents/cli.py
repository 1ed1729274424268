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


def show_version(value: bool):
    if value:
        from zevents import __version__

        typer.echo(f"zevents {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(version: bool = typer.Option(False, "--version", callback=show_version, is_eager=True,
                                              help="Print the version and exit.")):
    """zevents: 3D-printer events on a ZeroMQ bus."""


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


PrinterOption = typer.Option(None, "--printer", help="Which printer of the node (its name; required when the "
                                                     "config lists several).")


def load_printer_config(path: Optional[str], printer: Optional[str]):
    """The config as the named printer sees it (its section as printer:); a clear error when the name is wrong, or
    missing among several printers."""
    from zevents.printer.settings import PrinterChoiceError, printer_config

    try:
        return printer_config(load_config(path), printer)
    except PrinterChoiceError as exc:
        raise fail(str(exc))


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
         custom: bool = typer.Option(False, "--custom", help="Publish EVENT as a custom event even when it looks "
                                                               "like a slip of a catalogue name."),
         config: Optional[str] = ConfigOption):
    """Publish one event; exits 0 once the broker has it.  A name one letter (or only case) away from a catalogue
    event is refused with a "did you mean"."""
    from zevents import bus

    raise typer.Exit(bus.run_fire(load_config(config), event, payload, src, timeout, custom))


@app.command()
def tail(prefixes: Optional[List[str]] = typer.Argument(None, help="Groups (print), topics (print/PrintDone) or "
                                                                     "event names (PrintDone); default: all."),
         as_json: bool = typer.Option(False, "--json", help="One JSON object per line."),
         count: Optional[int] = typer.Option(None, "--count", "-n", help="Exit 0 after this many events."),
         timeout: Optional[float] = typer.Option(None, "--timeout", help="Exit 1 if no event for this long."),
         since: Optional[List[str]] = typer.Option(None, "--since", help="First replay the ring from this seq on "
                                                   "(inclusive): SEQ for every group or GROUP:SEQ; repeatable."),
         heartbeats: bool = typer.Option(False, "--heartbeats", help="Also show sys/Heartbeat (once a second)."),
         config: Optional[str] = ConfigOption):
    """Print events as they come."""
    from zevents import bus

    raise typer.Exit(bus.run_tail(load_config(config), prefixes or [], as_json, count, timeout, since, heartbeats))


@app.command()
def run(config: Optional[str] = ConfigOption,
        demo: bool = typer.Option(False, "--demo", help="Also print a bundled sample file on the virtual printer."),
        port: Optional[str] = typer.Option(None, "--port", help="Serial port of a real printer (default: virtual)."),
        baud: Optional[int] = typer.Option(None, "--baud", help="Baud rate of the printer (0: auto)."),
        data_dir: Optional[str] = typer.Option(None, "--data-dir", help="Data directory (default: "
                                              "$XDG_DATA_HOME/zevents, i.e. ~/.local/share/zevents): the virtual "
                                              "printer's SD card (virtual-sd/), the demo's sample (demo/), and what "
                                              "the services that store files keep."),
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

        try:
            demo_mod.prepare(cfg)
        except demo_mod.DemoError as exc:
            raise fail(str(exc))
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


@app.command()
def analyse(files: List[str] = typer.Argument(..., help="G-code files."),
            as_json: bool = typer.Option(False, "--json", help="One JSON object per line."),
            profile: Optional[str] = typer.Option(None, "--profile",
                                                  help="Printer profile for the limits the file does not set."),
            thumbnails: Optional[str] = typer.Option(None, "--thumbnails", metavar="DIR",
                                                     help="Save the embedded thumbnails in DIR.")):
    """Metadata analysis: print time planned as firmware does, filament, layers, slicer header, thumbnails."""
    from zevents import analysis

    raise typer.Exit(analysis.run_analyse(files, as_json, profile, thumbnails))


hooks_app = typer.Typer(help="Event hooks: OctoPrint's events.subscriptions, run from the bus.  `zevents hooks` alone "
                             "runs the hooks service; `zevents hooks test EVENT` shows what would run.")
app.add_typer(hooks_app, name="hooks")


@hooks_app.callback(invoke_without_command=True)
def hooks(ctx: typer.Context, config: Optional[str] = ConfigOption):
    """Run the hooks service (no subcommand); SIGHUP or a change of the config file reloads it."""
    ctx.obj = config
    if ctx.invoked_subcommand is not None:
        return
    from zevents.hooks import service as hooks_mod
    from zevents.service import run_exclusive

    raise typer.Exit(run_exclusive(load_config(config), "hooks", hooks_mod.run))


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
            config: Optional[str] = ConfigOption, printer: Optional[str] = PrinterOption):
    """Run the printer link: serial protocol, print jobs, command channel, printer events."""
    from zevents.printer import service
    from zevents.printer.settings import service_name
    from zevents.service import run_exclusive

    if port and virtual:
        raise fail("give --port or --virtual, not both")
    cfg, name = load_config(config), "printer"
    view = load_printer_config(config, printer)  # refuses an unknown name, or none among several
    if cfg.get("printers"):  # one of a list: run as the node would (printer:NAME, its own channel and header)
        cfg, name = view, service_name(cfg, view.get("printer"))
    raise typer.Exit(run_exclusive(cfg, name, service.run, port=port, baud=baud, virtual=virtual,
                                   service_name=name))


@app.command("print")
def print_file(file: str = typer.Argument(..., help="Local G-code file to print."),
               config: Optional[str] = ConfigOption, printer: Optional[str] = PrinterOption):
    """Select a local file and print it on the running link."""
    from zevents.printer import service

    raise typer.Exit(service.run_print(load_printer_config(config, printer), file))


@app.command()
def connect(port: Optional[str] = typer.Option(None, "--port", help="Serial device, pyserial URL or AUTO "
                                                                    "(default: the link's port)."),
            baud: Optional[int] = typer.Option(None, "--baud", help="Baud rate; 0 detects it."),
            config: Optional[str] = ConfigOption, printer: Optional[str] = PrinterOption):
    """Connect the running printer link to the printer."""
    from zevents.printer import service

    raise typer.Exit(service.run_connect(load_printer_config(config, printer), port=port, baud=baud))


@app.command()
def disconnect(config: Optional[str] = ConfigOption, printer: Optional[str] = PrinterOption):
    """Disconnect the running printer link (no automatic reconnect until `zevents connect`)."""
    from zevents.printer import service

    raise typer.Exit(service.run_disconnect(load_printer_config(config, printer)))


@app.command()
def pause(config: Optional[str] = ConfigOption, printer: Optional[str] = PrinterOption):
    """Pause the running print (prints the head position)."""
    from zevents.printer import service

    raise typer.Exit(service.run_control(load_printer_config(config, printer), "pause"))


@app.command()
def resume(config: Optional[str] = ConfigOption, printer: Optional[str] = PrinterOption):
    """Resume the paused print."""
    from zevents.printer import service

    raise typer.Exit(service.run_control(load_printer_config(config, printer), "resume"))


@app.command()
def cancel(config: Optional[str] = ConfigOption, printer: Optional[str] = PrinterOption):
    """Cancel the running print."""
    from zevents.printer import service

    raise typer.Exit(service.run_control(load_printer_config(config, printer), "cancel"))


@app.command()
def send(lines: List[str] = typer.Argument(..., help="G-code: `M109 S0` is one line; several lines are several "
                                                  "quoted arguments ('G28' 'G1 X10'), or - to read them from stdin."),
         config: Optional[str] = ConfigOption, printer: Optional[str] = PrinterOption):
    """Send G-code through the running link; prints the firmware's answers, exits 1 if it refused a line."""
    from zevents.printer import service

    raise typer.Exit(service.run_send(load_printer_config(config, printer), lines))


@app.command()
def sd(action: str = typer.Argument(..., help="ls, upload or print."),
       name: Optional[str] = typer.Argument(None, help="upload: the local file; print: the SD file name."),
       remote: Optional[str] = typer.Option(None, "--as", help="upload: the name on the SD card (8.3)."),
       no_wait: bool = typer.Option(False, "--no-wait", help="upload: return once the transfer has started."),
       config: Optional[str] = ConfigOption, printer: Optional[str] = PrinterOption):
    """The printer's SD card: list it, upload a local file to it, print a file from it."""
    from zevents.printer import service

    cfg = load_printer_config(config, printer)
    if action == "print":
        raise typer.Exit(service.run_sd(cfg, "print", remote=name))
    raise typer.Exit(service.run_sd(cfg, action, file=name, remote=remote, wait=not no_wait))


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


profile_app = typer.Typer(no_args_is_help=True, help="Printer profiles (OctoPrint's format): bed, extruders, "
                                                      "axes, motion limits.")
app.add_typer(profile_app, name="profile")


@profile_app.command("ls")
def profile_ls(as_json: bool = typer.Option(False, "--json", help="One JSON document instead of a table."),
               config: Optional[str] = ConfigOption):
    """List the printer profiles, marking the default and the printer's current one."""
    from zevents.printer import profile_commands

    raise typer.Exit(profile_commands.run_ls(load_config(config), as_json))


@profile_app.command("show")
def profile_show(identifier: Optional[str] = typer.Argument(None, help="Profile id (default: the default one)."),
                 as_json: bool = typer.Option(False, "--json", help="JSON instead of YAML."),
                 config: Optional[str] = ConfigOption):
    """Print one profile, merged over the built-in default as it is used."""
    from zevents.printer import profile_commands

    raise typer.Exit(profile_commands.run_show(load_config(config), identifier, as_json))


@profile_app.command("add")
def profile_add(file: str = typer.Argument(..., help="A profile as YAML or JSON (OctoPrint's keys; missing keys "
                                                     "come from the default)."),
                identifier: Optional[str] = typer.Option(None, "--id", help="Store it under this id."),
                overwrite: bool = typer.Option(False, "--overwrite", help="Replace a profile with the same id."),
                config: Optional[str] = ConfigOption):
    """Add a printer profile (PrinterProfileAdded, or PrinterProfileModified with --overwrite)."""
    from zevents.printer import profile_commands

    raise typer.Exit(profile_commands.run_add(load_config(config), file, identifier, overwrite))


@profile_app.command("edit")
def profile_edit(identifier: str = typer.Argument(..., help="Profile id."),
                 assignments: List[str] = typer.Argument(..., help="KEY=VALUE, e.g. volume.width=250 "
                                                                   "extruder.nozzleDiameter=0.6."),
                 config: Optional[str] = ConfigOption):
    """Change keys of a profile (PrinterProfileModified); the whole profile is checked before it is saved."""
    from zevents.printer import profile_commands

    raise typer.Exit(profile_commands.run_edit(load_config(config), identifier, assignments))


@profile_app.command("rm")
def profile_rm(identifier: str = typer.Argument(..., help="Profile id."), config: Optional[str] = ConfigOption):
    """Remove a profile (PrinterProfileDeleted); the default and the current profile cannot be removed."""
    from zevents.printer import profile_commands

    raise typer.Exit(profile_commands.run_rm(load_config(config), identifier))


@profile_app.command("default")
def profile_default(identifier: Optional[str] = typer.Argument(None, help="Make this profile the default; without "
                                                                         "it, print the default's id."),
                    config: Optional[str] = ConfigOption):
    """Show or set the default printer profile."""
    from zevents.printer import profile_commands

    raise typer.Exit(profile_commands.run_default(load_config(config), identifier))
# --- timelapse ---------------------------------------------------------------------------------------------------
timelapse_app = typer.Typer(no_args_is_help=True, help="Timelapse movies and unrendered frames.")
app.add_typer(timelapse_app, name="timelapse")


@timelapse_app.command("ls")
def timelapse_ls(as_json: bool = typer.Option(False, "--json", help="One JSON document."),
                 config: Optional[str] = ConfigOption):
    """Movies and unrendered jobs (frames waiting, failed renders)."""
    from zevents.timelapse import commands

    raise typer.Exit(commands.run_ls(load_config(config), as_json))


@timelapse_app.command("render")
def timelapse_render(job: str = typer.Argument(..., help="An unrendered job (`zevents timelapse ls`)."),
                     force: bool = typer.Option(False, "--force", help="Render even while the printer prints."),
                     config: Optional[str] = ConfigOption):
    """Render a job's frames into a movie now; prints the movie's path."""
    from zevents.timelapse import commands

    raise typer.Exit(commands.run_render(load_config(config), job, force))


@timelapse_app.command("rm")
def timelapse_rm(name: str = typer.Argument(..., help="A movie or an unrendered job."),
                 config: Optional[str] = ConfigOption):
    """Delete a movie (and its thumbnail) or an unrendered job's frames."""
    from zevents.timelapse import commands

    raise typer.Exit(commands.run_rm(load_config(config), name))


@app.command()
def snapshot(out: Optional[str] = typer.Option(None, "--out", "-o", help="Where to write it (default snapshot.jpg)."),
             printer: Optional[str] = typer.Option(None, "--printer", help="Whose camera (timelapse.cameras)."),
             config: Optional[str] = ConfigOption):
    """Take one frame now from the configured camera, to test it."""
    from zevents.timelapse import commands

    raise typer.Exit(commands.run_snapshot(load_config(config), out, printer))
# --- files (zevents/files/): storage, watched folder, analysis queue ------------------------------------------------

files_app = typer.Typer(no_args_is_help=True, help="Stored files (local uploads and the SD card) through the files "
                                                   "service.")
app.add_typer(files_app, name="files")
StorageOption = typer.Option("local", "--storage", help="local (the uploads folder) or sdcard (the printer's).")


def _files_exit(fn_name: str, config, *args):
    from zevents.files import commands

    raise typer.Exit(getattr(commands, fn_name)(load_config(config), *args))


@files_app.command("serve")
def files_serve(config: Optional[str] = ConfigOption):
    """Run the files service (what `zevents run` starts when files.enabled is true)."""
    from zevents.files import service as files_mod

    raise typer.Exit(files_mod.run(load_config(config)))


@files_app.command("ls")
def files_ls(path: str = typer.Argument("", help="A folder (default: the root)."),
             recursive: bool = typer.Option(False, "--recursive", "-r", help="Include subfolders."),
             as_json: bool = typer.Option(False, "--json", help="One JSON list."),
             storage: str = StorageOption, config: Optional[str] = ConfigOption,
             printer: Optional[str] = PrinterOption):
    """List stored files and folders."""
    if storage == "sdcard" or printer:  # whose SD card: named among several printers
        printer = load_printer_config(config, printer).get("printer", "name")
    _files_exit("run_ls", config, path, recursive, as_json, storage, printer)


@files_app.command("upload")
def files_upload(file: str = typer.Argument(..., help="The local file to store."),
                 folder: Optional[str] = typer.Option(None, "--path", help="The folder to store it in "
                                                                           "(sdcard: its name there)."),
                 select: bool = typer.Option(False, "--select", help="Select it for printing."),
                 start: bool = typer.Option(False, "--print", help="Start printing it."),
                 storage: str = StorageOption, config: Optional[str] = ConfigOption,
                 printer: Optional[str] = PrinterOption):
    """Store a file (fires FileAdded, UpdatedFiles and Upload, like OctoPrint's upload API)."""
    if select or start or storage == "sdcard" or printer:  # the printer it goes to: named among several
        printer = load_printer_config(config, printer).get("printer", "name")
    _files_exit("run_upload", config, file, folder, select, start, storage, printer)


@files_app.command("rm")
def files_rm(path: str, storage: str = StorageOption, config: Optional[str] = ConfigOption):
    """Remove a stored file."""
    _files_exit("run_simple", config, "REMOVE", {"path": path, "storage": storage}, "removed {storage}:{path}")


@files_app.command("mv")
def files_mv(source: str, destination: str, config: Optional[str] = ConfigOption):
    """Move or rename a file or folder (into DESTINATION if it is a folder)."""
    _files_exit("run_simple", config, "MOVE", {"source": source, "destination": destination},
                "moved {source} to {path}")


@files_app.command("cp")
def files_cp(source: str, destination: str, config: Optional[str] = ConfigOption):
    """Copy a file or folder (into DESTINATION if it is a folder)."""
    _files_exit("run_simple", config, "COPY", {"source": source, "destination": destination},
                "copied {source} to {path}")


@files_app.command("mkdir")
def files_mkdir(path: str, config: Optional[str] = ConfigOption):
    """Create a folder."""
    _files_exit("run_simple", config, "MKDIR", {"path": path}, "created {path}/")


@files_app.command("rmdir")
def files_rmdir(path: str, recursive: bool = typer.Option(False, "--recursive", "-r",
                                                          help="Also remove everything inside."),
                config: Optional[str] = ConfigOption):
    """Remove a folder (an empty one, unless --recursive)."""
    _files_exit("run_simple", config, "RMDIR", {"path": path, "recursive": recursive}, "removed {path}/")


@files_app.command("info")
def files_info(path: str, as_json: bool = typer.Option(False, "--json", help="One JSON object."),
               storage: str = StorageOption, config: Optional[str] = ConfigOption):
    """A file's metadata, analysis and print history."""
    _files_exit("run_info", config, path, as_json, storage)


@app.command()
def slicers(as_json: bool = typer.Option(False, "--json", help="One JSON document."),
            config: Optional[str] = ConfigOption):
    """List the slicers found on this machine with their versions, or how to install them."""
    from zevents.slicing import commands

    raise typer.Exit(commands.run_slicers(load_config(config), as_json))


@app.command("slice")
def slice_model(model: str = typer.Argument(..., help="An STL, 3MF or OBJ file (stored first), or a model's path "
                                                      "in storage; `slice cancel DEST` cancels a job."),
                cancel_dest: Optional[str] = typer.Argument(None, help="With `cancel`: the job's destination."),
                slicer: Optional[str] = typer.Option(None, "--slicer", help="prusaslicer, slic3r or curaengine."),
                profile: Optional[str] = typer.Option(None, "--profile", help="Slicing profile (default: the "
                                                                             "slicer's default)."),
                printer_profile: Optional[str] = typer.Option(None, "--printer-profile", help="Printer profile "
                                                              "(default: the printer's)."),
                dest: Optional[str] = typer.Option(None, "--dest", help="Storage path of the G-code (default: the "
                                                                       "model's, as .gcode)."),
                select: bool = typer.Option(False, "--select", help="Select the G-code for printing when done."),
                start: bool = typer.Option(False, "--print", help="Print the G-code when done."),
                timeout: Optional[float] = typer.Option(None, "--timeout", help="Stop waiting after this long."),
                config: Optional[str] = ConfigOption, printer: Optional[str] = PrinterOption):
    """Slice a model into storage (SlicingStarted/Progress/Done), analysed and ready to print."""
    from zevents.slicing import commands

    if model == "cancel" and cancel_dest:
        raise typer.Exit(commands.run_cancel(load_config(config), cancel_dest))
    if cancel_dest:
        raise fail(f"unexpected argument {cancel_dest!r} (did you mean `zevents slice cancel DEST`?)")
    if select or start or printer:  # the printer it goes to (and whose profile): named among several
        printer = load_printer_config(config, printer).get("printer", "name")
    raise typer.Exit(commands.run_slice(load_config(config), model, slicer, profile, printer_profile, dest, select,
                                        start, timeout, printer))


slicing_app = typer.Typer(no_args_is_help=True, help="The slicing service and its profiles.")
app.add_typer(slicing_app, name="slicing")
slicing_profile_app = typer.Typer(no_args_is_help=True, help="Slicing profiles per slicer.")
slicing_app.add_typer(slicing_profile_app, name="profile")


@slicing_app.command("serve")
def slicing_serve(config: Optional[str] = ConfigOption):
    """Run the slicing service alone (`zevents run` starts it with the node)."""
    from zevents.slicing import service

    raise typer.Exit(service.run(load_config(config)))


@slicing_profile_app.command("add")
def slicing_profile_add(slicer: str = typer.Argument(..., help="prusaslicer, slic3r or curaengine."),
                        name: str = typer.Argument(..., help="Profile name."),
                        file: str = typer.Argument(..., help="PrusaSlicer/Slic3r .ini or config bundle; Cura "
                                                             ".def.json or {definition, settings} JSON."),
                        print_preset: Optional[str] = typer.Option(None, "--print", help="Bundle: print preset."),
                        printer_preset: Optional[str] = typer.Option(None, "--printer", help="Bundle: printer "
                                                                                            "preset."),
                        filament_preset: Optional[str] = typer.Option(None, "--filament", help="Bundle: filament "
                                                                                              "preset."),
                        settings: Optional[List[str]] = typer.Option(None, "--set", help="KEY=VALUE on top, "
                                                                                         "repeatable."),
                        config: Optional[str] = ConfigOption):
    """Add (or replace) a slicing profile: SlicingProfileAdded or SlicingProfileModified."""
    from zevents.slicing import commands

    presets = {k: v for k, v in (("print", print_preset), ("printer", printer_preset),
                                 ("filament", filament_preset)) if v}
    raise typer.Exit(commands.run_profile_add(load_config(config), slicer, name, file, presets, settings or []))


@slicing_profile_app.command("ls")
def slicing_profile_ls(slicer: Optional[str] = typer.Argument(None, help="Only this slicer's."),
                       as_json: bool = typer.Option(False, "--json", help="One JSON document."),
                       config: Optional[str] = ConfigOption):
    """List the slicing profiles, marking each slicer's default."""
    from zevents.slicing import commands

    raise typer.Exit(commands.run_profile_ls(load_config(config), slicer, as_json))


@slicing_profile_app.command("show")
def slicing_profile_show(slicer: str = typer.Argument(..., help="prusaslicer, slic3r or curaengine."),
                         name: Optional[str] = typer.Argument(None, help="Profile name (default: the default)."),
                         config: Optional[str] = ConfigOption):
    """Print a slicing profile as the slicer loads it."""
    from zevents.slicing import commands

    raise typer.Exit(commands.run_profile_show(load_config(config), slicer, name))


@slicing_profile_app.command("rm")
def slicing_profile_rm(slicer: str = typer.Argument(..., help="prusaslicer, slic3r or curaengine."),
                       name: str = typer.Argument(..., help="Profile name."), config: Optional[str] = ConfigOption):
    """Remove a slicing profile (SlicingProfileDeleted)."""
    from zevents.slicing import commands

    raise typer.Exit(commands.run_profile_rm(load_config(config), slicer, name))


@slicing_profile_app.command("default")
def slicing_profile_default(slicer: str = typer.Argument(..., help="prusaslicer, slic3r or curaengine."),
                            name: Optional[str] = typer.Argument(None, help="Make it the default; without it, "
                                                                            "print the default."),
                            config: Optional[str] = ConfigOption):
    """Show or set a slicer's default profile."""
    from zevents.slicing import commands

    raise typer.Exit(commands.run_profile_default(load_config(config), slicer, name))


gateway_app = typer.Typer(no_args_is_help=True, help="The gateway: OctoPrint's REST API and push socket.")
app.add_typer(gateway_app, name="gateway")
user_app = typer.Typer(no_args_is_help=True, help="Users and API keys of the gateway.")
app.add_typer(user_app, name="user")
appkey_app = typer.Typer(no_args_is_help=True, help="Application keys asked for by Home Assistant, Cura, ...")
user_app.add_typer(appkey_app, name="appkey")


@gateway_app.command("serve")
def gateway_serve(config: Optional[str] = ConfigOption):
    """Run the gateway alone (`zevents run` starts it with the node)."""
    from zevents.gateway import service

    raise typer.Exit(service.run(load_config(config)))


@gateway_app.command("online-check")
def gateway_online_check(as_json: bool = typer.Option(False, "--json", help="One JSON document."),
                         config: Optional[str] = ConfigOption):
    """Run the online check now (server.onlineCheck); ConnectivityChanged if the answer changed."""
    from zevents.gateway import commands

    raise typer.Exit(commands.run_online_check(load_config(config), as_json))


@user_app.command("add")
def user_add(name: str = typer.Argument(..., help="User name."),
             admin: bool = typer.Option(False, "--admin", help="Also in the admins group (every permission)."),
             config: Optional[str] = ConfigOption):
    """Add a user; the password comes from a prompt, or from the first line of stdin."""
    from zevents.gateway import commands

    raise typer.Exit(commands.run_add(load_config(config), name, admin))


@user_app.command("rm")
def user_rm(name: str = typer.Argument(..., help="User name."), config: Optional[str] = ConfigOption):
    """Remove a user and the app keys they granted."""
    from zevents.gateway import commands

    raise typer.Exit(commands.run_rm(load_config(config), name))


@user_app.command("passwd")
def user_passwd(name: str = typer.Argument(..., help="User name."), config: Optional[str] = ConfigOption):
    """Set a user's password (prompt, or the first line of stdin)."""
    from zevents.gateway import commands

    raise typer.Exit(commands.run_passwd(load_config(config), name))


@user_app.command("apikey")
def user_apikey(name: str = typer.Argument(..., help="User name."),
                show: bool = typer.Option(False, "--show", help="Print the current key instead of a new one."),
                config: Optional[str] = ConfigOption):
    """Make (and print) a new API key for a user; the old one stops working."""
    from zevents.gateway import commands

    raise typer.Exit(commands.run_apikey(load_config(config), name, show))


@user_app.command("ls")
def user_ls(as_json: bool = typer.Option(False, "--json", help="One JSON document."),
            config: Optional[str] = ConfigOption):
    """List the users, their groups and keys."""
    from zevents.gateway import commands

    raise typer.Exit(commands.run_ls(load_config(config), as_json))


@appkey_app.command("ls")
def appkey_ls(as_json: bool = typer.Option(False, "--json", help="One JSON document."),
              config: Optional[str] = ConfigOption):
    """The app-key requests waiting for a decision (from the running gateway)."""
    from zevents.gateway import commands

    raise typer.Exit(commands.run_appkey_ls(load_config(config), as_json))


@appkey_app.command("approve")
def appkey_approve(token: str = typer.Argument(..., help="The request's token (`zevents user appkey ls`)."),
                   user: str = typer.Option(..., "--user", "-u", help="The user the key acts as."),
                   config: Optional[str] = ConfigOption):
    """Approve an app-key request: the app gets a key acting as --user."""
    from zevents.gateway import commands

    raise typer.Exit(commands.run_appkey_decide(load_config(config), token, user, True))


@appkey_app.command("deny")
def appkey_deny(token: str = typer.Argument(..., help="The request's token."),
                user: str = typer.Option(..., "--user", "-u", help="Who decides."),
                config: Optional[str] = ConfigOption):
    """Deny an app-key request."""
    from zevents.gateway import commands

    raise typer.Exit(commands.run_appkey_decide(load_config(config), token, user, False))
@app.command()
def mqtt(config: Optional[str] = ConfigOption):
    """Run the MQTT bridge: events, retained state and Home Assistant discovery on the mqtt.url broker."""
    from zevents.bridges import service as mqtt_service

    raise typer.Exit(mqtt_service.run(load_config(config)))


@app.command()
def farm(mqtt_url: Optional[str] = typer.Option(None, "--mqtt", help="Broker URL (default: mqtt.url)."),
         as_json: bool = typer.Option(False, "--json", help="Print the farm once as JSON and exit."),
         once: bool = typer.Option(False, "--once", help="Print the table once and exit."),
         timeout: float = typer.Option(10.0, "--timeout", help="Seconds to wait for the broker."),
         config: Optional[str] = ConfigOption):
    """Every printer of every node on the MQTT broker (from the bridges' retained state): a live table."""
    from zevents.bridges import farm as farm_mod

    raise typer.Exit(farm_mod.run(load_config(config), mqtt_url, as_json, once, timeout))


@config_app.command("check")
def config_check(file: str = typer.Argument(..., help="Config file to validate.")):
    """Validate a config file; every problem with its file, line and key (warnings too: they do not fail it)."""
    from zevents.config import check

    problems = check(file, warnings=True)
    errors = [problem for problem in problems if not problem.warning]
    for problem in errors + [problem for problem in problems if problem.warning]:
        typer.echo(f"{'warning: ' if problem.warning else ''}{problem}", err=True)
    if errors:
        raise typer.Exit(1)
    warned = len(problems)
    typer.echo(f"{file}: OK" + (f" ({warned} warning{'s' if warned > 1 else ''})" if warned else ""))


def main():
    try:
        app(prog_name="zevents")  # `python -m zevents` too: help says what a user types
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
