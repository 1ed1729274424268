"""The files service's command channel: how the CLI, the gateway (OctoPrint's REST API) and the slicing service
store, list and change files.

A ROUTER socket owned by the files service (``files.commands``, by default an ipc socket in the node's 0700
runtime directory), with the printer channel's framing (``zevents.wire`` control frames: command + msgpack map;
reply OK/ERR + map; an ``id`` in the request is echoed).  Never the bus: only local programs that can open the
socket change files.  Every path is a storage path ("folder/name.gcode", relative, ``/``-separated); ``storage``
is ``local`` (default) or ``sdcard`` (the printer's SD card, through the printer link's channel).

Commands (argument maps):
  LIST   {path?: "", recursive?: false, storage?}      -> {files: [entry...]}  (entry: name, path, type, typePath,
                                                          origin, size, date, hash, analysis, prints, ...)
  INFO   {path, storage?}                               -> {file: entry}  (with history and statistics)
  UPLOAD {source, path?, storage?, overwrite?: true, remove_source?: false, select?: false, print?: false,
          user?, userdata?, display?, fire_upload?: true}
         Store the file at the absolute path ``source`` (a file this process can read) as ``path`` (default: the
         source's name at the root).  ``remove_source: true`` moves it instead of copying (the gateway writes the
         HTTP body to a temp file beside the uploads folder and hands it over this way; the slicing service its
         output).  ``select``/``print`` select or start it on the printer afterwards.  Events, in OctoPrint's
         order: FileAdded, UpdatedFiles, (FileSelected, PrintStarted... from the printer), Upload (unless
         ``fire_upload`` is false, e.g. for slicer output, which OctoPrint adds without an Upload event).
         -> {storage, path, name, select, print, effective_select, effective_print, done: true}
  REMOVE {path, storage?}                 -> {}        FileRemoved, UpdatedFiles
  COPY   {source, destination}            -> {path}    FileAdded{copy}, UpdatedFiles (FolderAdded for a folder)
  MOVE   {source, destination}            -> {path}    FileRemoved{move}, FileAdded{move}, FileMoved, UpdatedFiles
                                                       (FolderRemoved, FolderAdded, FolderMoved for a folder)
  MKDIR  {path}                           -> {}        FolderAdded, UpdatedFiles
  RMDIR  {path, recursive?: false}        -> {}        FolderRemoved, UpdatedFiles
  ANALYSE {path}                          -> {queued}  analysis at high priority (MetadataAnalysisStarted/Finished)
  STATUS {}                               -> {printing, analysis: {paused, pending}, uploads, watched}
A destination that is an existing folder means "into it, under the same name".  Refusals change nothing: bad paths
(``..``, absolute, NUL/control characters, names too long), an existing destination, the file being printed, a type
that is neither G-code nor a model.  A refusal is ERR with ``error`` (a sentence) and ``code``, which a gateway maps
to OctoPrint's HTTP status: ``invalid`` 400, ``not_found`` 404, ``exists`` 409, ``busy`` 409, ``unsupported_type``
415, ``printer`` (the printer link refused or did not answer).  A ChannelError's ``reply`` holds that map.
"""
from __future__ import annotations

from zevents.printer.channel import ChannelError, CommandClient

COMMANDS = ("LIST", "INFO", "UPLOAD", "REMOVE", "COPY", "MOVE", "MKDIR", "RMDIR", "ANALYSE", "STATUS")
STORAGES = ("local", "sdcard")

__all__ = ["COMMANDS", "ChannelError", "FilesClient", "endpoint"]


def endpoint(config) -> str:
    return config.endpoint("files", "commands", "files.sock")


class FilesClient(CommandClient):
    commands = COMMANDS
    service = "the files service"
    start_hint = "zevents run` (files.enabled: true) or `zevents files serve"
