"""The timelapse's config sections, registered with :mod:`zevents.config`, and what they mean once merged.

Three sections feed it:

* ``webcam:`` — OctoPrint's, unchanged (copy it from OctoPrint's config.yaml): the capture type, fps, post-roll,
  renderAfterPrint, the ffmpeg command lines, and the snapshot URL/timeout of OctoPrint before 1.9;
* ``plugins.classicwebcam:`` — where OctoPrint 1.9+ keeps the snapshot URL and timeout (wins over ``webcam:``);
* ``timelapse:`` — ours: the ``layer`` mode and several modes at once, named cameras (per printer, HTTP with auth
  or a command), retries, frame size limits, render niceness, timeouts and attempts, the virtual camera.

Deliberate differences from OctoPrint (README "Timelapse"): ``webcam.ffmpeg`` null means ``ffmpeg`` on PATH
(OctoPrint disables timelapse); ``watermark`` is accepted and ignored (we have no logo to stamp); with
``webcam.timelapse.type: off`` the mode is ``layer`` as soon as a camera is configured (``timelapse.modes: []`` or
``timelapse.enabled: false`` turn capture off).
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field

from zevents import config as zconfig
from zevents.config import NUMBER, OPT_STR, PATH, URL, Key, check_text

MODES = ("layer", "zchange", "timed")
RENDER_AFTER = ("off", "always", "success", "failure", "never")
VIRTUAL = "virtual"
DEFAULT_COMMANDLINE = ('{ffmpeg} -framerate {fps} -i "{input}" -vcodec {videocodec} -threads {threads} -b:v {bitrate} '
                       '-f {containerformat} -y {filters} "{output}"')
DEFAULT_THUMBNAIL_COMMANDLINE = '{ffmpeg} -sseof -1 -i "{input}" -update 1 -q:v 0.7 "{output}"'


def _bitrate(value):
    import re

    return None if re.fullmatch(r"\d+(\.\d+)?[kKmM]?", str(value)) else \
        f"must be a bitrate like 10000k or 5M, not {value!r}"


# OctoPrint's WebcamConfig (1.11.8), every key, old (< 1.9) snapshot keys included; stream keys are accepted for
# a copied config.yaml and unused (we take snapshots, we show no stream).
def _ice_servers(value):
    if isinstance(value, list) and not all(isinstance(item, str) for item in value):
        return "must be a list of STUN/TURN URLs"
    return None


def _list_of(kind, what: str):
    def check(value):
        if isinstance(value, list) and not all(isinstance(item, kind) for item in value):
            return f"must be a list of {what}"
        return None
    return check


WEBCAM_SCHEMA = {
    "webcamEnabled": bool, "timelapseEnabled": bool,
    "ffmpeg": PATH, "ffmpegThreads": Key(int, min=1, max=64), "ffmpegVideoCodec": Key(str, check=check_text),
    "bitrate": Key((str, int), check=_bitrate), "watermark": bool,
    "ffmpegCommandline": Key(str, check=check_text), "ffmpegThumbnailCommandline": Key(str, check=check_text),
    "cleanTmpAfterDays": Key(int, min=0, max=36500), "renderAfterPrintDelay": Key(NUMBER, min=0, max=86400),
    "defaultWebcam": Key(str, check=check_text), "snapshotWebcam": Key(str, check=check_text),
    "snapshot": URL, "snapshotTimeout": Key(NUMBER, min=0.1, max=600), "snapshotSslValidation": bool,
    "stream": URL, "streamRatio": Key(OPT_STR, choices=(None, "16:9", "4:3")),
    "streamTimeout": Key(NUMBER, min=0, max=600),
    "streamWebrtcIceServers": Key((list, str), check=_ice_servers),
    "cacheBuster": bool, "flipH": bool, "flipV": bool, "rotate90": bool,
    "timelapse": {
        # YAML 1.1 reads a bare `off` as false: OctoPrint's own loader does too, so false means off.
        "type": Key((str, bool), check=lambda v: None if v in ("off", "zchange", "timed", False) else
                    f"must be one of 'off', 'zchange', 'timed', not {v!r}"),
        "fps": Key(int, min=1, max=240),
        "postRoll": Key(int, min=0, max=3600),
        "renderAfterPrint": Key(str, choices=RENDER_AFTER),
        "options": {
            "interval": Key((int, float, type(None)), min=1, max=86400),
            "retractionZHop": Key((int, float, type(None)), min=0, max=100),
            "minDelay": Key((int, float, type(None)), min=0, max=86400),
            "capturePostRoll": (bool, type(None)),
        },
    },
}

CLASSICWEBCAM_KEYS = {
    "snapshot": URL, "snapshotTimeout": Key(NUMBER, min=0.1, max=600), "snapshotSslValidation": bool,
    "stream": URL, "streamRatio": Key(OPT_STR, choices=(None, "16:9", "4:3")),
    "streamTimeout": Key(NUMBER, min=0, max=600),
    "streamWebrtcIceServers": Key((list, str), check=_ice_servers),
    "cacheBuster": bool, "flipH": bool, "flipV": bool, "rotate90": bool,
}

CAMERA_KEYS = {
    "name": str, "printer": OPT_STR, "snapshot": OPT_STR, "command": (list, type(None)),
    "timeout": Key(NUMBER, min=0.1, max=600), "retries": Key(int, min=0, max=20),
    "retry_backoff": Key(NUMBER, min=0, max=60), "auth": Key(str, choices=("none", "basic", "digest")),
    "username": OPT_STR, "password": OPT_STR, "ssl_validation": bool,
}

TIMELAPSE_SCHEMA = {
    "enabled": bool,
    "modes": Key((list, type(None)), check=_list_of(str, "mode names (layer, zchange, timed)")),
    "cameras": Key(list, check=_list_of(dict, "camera mappings (name, snapshot or command, ...)")),
    "timeout": Key(NUMBER, min=0.1, max=600),
    "retries": Key(int, min=0, max=20),
    "retry_backoff": Key(NUMBER, min=0, max=60),
    "min_frame_bytes": Key(int, min=1, max=1 << 30),
    "max_frame_bytes": Key(int, min=1024, max=1 << 31),
    "render_while_printing": bool,
    "nice": Key(int, min=0, max=19),
    "render_timeout": Key(NUMBER, min=1, max=7 * 86400),
    "render_attempts": Key(int, min=1, max=20),
    "virtual_camera": {"port": Key(int, min=0, max=65535), "width": Key(int, min=64, max=4096),
                       "height": Key(int, min=64, max=4096)},
}


def _check_modes(config, modes, problems):
    if modes is None:
        return
    for index, mode in enumerate(modes):
        if mode not in MODES:
            problems.append(config.error(f"must be one of {', '.join(MODES)}, not {mode!r}", "timelapse", "modes",
                                         index))


def _check_camera(config, index, camera, problems):
    keys = ("timelapse", "cameras", index)
    if not isinstance(camera, dict):
        problems.append(config.error("a camera must be a mapping (name, snapshot or command, ...)", *keys))
        return
    problems.extend(zconfig._validate_schema(config, camera, CAMERA_KEYS, keys))
    if bool(camera.get("snapshot")) == bool(camera.get("command")):
        problems.append(config.error("a camera needs exactly one of snapshot (a URL, or 'virtual') and command",
                                     *keys))
    url = camera.get("snapshot")
    if isinstance(url, str) and url and url != VIRTUAL and not url.startswith(("http://", "https://")):
        problems.append(config.error(f"snapshot must be an http(s):// URL or 'virtual', not {url!r}",
                                     *keys, "snapshot"))
    command = camera.get("command")
    if isinstance(command, list) and (not command or not all(isinstance(word, str) and word for word in command)):
        problems.append(config.error("command must be a non-empty list of words (argv, no shell), e.g. "
                                     "[libcamera-still, -o, '-']", *keys, "command"))
    if camera.get("auth") in ("basic", "digest") and not camera.get("username"):
        problems.append(config.error(f"auth {camera['auth']} needs a username", *keys, "auth"))


def validate_timelapse(config, section) -> list:
    problems = []
    section = section or {}
    _check_modes(config, section.get("modes"), problems)
    names = set()
    for index, camera in enumerate(section.get("cameras") or []):
        _check_camera(config, index, camera, problems)
        name = camera.get("name") if isinstance(camera, dict) else None
        if name in names:
            problems.append(config.error(f"two cameras are named {name!r}", "timelapse", "cameras", index, "name"))
        names.add(name)
    low, high = section.get("min_frame_bytes"), section.get("max_frame_bytes")
    if isinstance(low, int) and isinstance(high, int) and low >= high:
        problems.append(config.error("must be smaller than max_frame_bytes", "timelapse", "min_frame_bytes"))
    return problems


def validate_webcam(config, section) -> list:
    problems = []
    line = (section or {}).get("ffmpegCommandline")
    if isinstance(line, str):
        for needed in ("{ffmpeg}", "{input}", "{output}"):
            if needed not in line:
                problems.append(config.error(f"the command line must contain {needed}", "webcam",
                                             "ffmpegCommandline"))
    return problems


def validate_plugins(config, section, _previous=None) -> list:
    """``plugins:`` holds every OctoPrint plugin's settings; only ``classicwebcam`` is ours to check."""
    problems = []
    classic = (section or {}).get("classicwebcam")
    if classic is not None:
        if not isinstance(classic, dict):
            problems.append(config.error("must be a mapping", "plugins", "classicwebcam"))
        else:
            problems.extend(zconfig._validate_schema(config, classic, CLASSICWEBCAM_KEYS,
                                                     ("plugins", "classicwebcam")))
    if _previous is not None:
        problems.extend(_previous(config, section))
    return problems


def _register():
    zconfig.register_section("webcam", WEBCAM_SCHEMA, validate_webcam)
    zconfig.register_section("timelapse", TIMELAPSE_SCHEMA, validate_timelapse)
    # Another service may check its own plugins.<id> too: chain its validator rather than replace it.
    previous = zconfig.SECTION_VALIDATORS.get("plugins")
    if getattr(previous, "__name__", "") == "validate_plugins":
        previous = getattr(previous, "previous", None)

    def chained(config, section):
        return validate_plugins(config, section, previous)

    chained.__name__ = "validate_plugins"
    chained.previous = previous
    zconfig.register_section("plugins", dict, chained)


_register()


# --- the merged meaning -------------------------------------------------------------------------------------------

@dataclass
class Camera:
    name: str
    printer: str | None = None
    snapshot: str | None = None
    command: list | None = None
    timeout: float = 5.0
    retries: int = 2
    retry_backoff: float = 0.25
    auth: str = "none"
    username: str | None = None
    password: str | None = None
    ssl_validation: bool = True


@dataclass
class Settings:
    enabled: bool
    modes: tuple
    cameras: list
    fps: int
    post_roll: int
    render_after: str
    interval: float
    zhop: float
    min_delay: float
    ffmpeg: str | None
    threads: int
    codec: str
    bitrate: str
    commandline: str
    thumbnail_commandline: str
    clean_after_days: int
    render_delay: float
    flip_h: bool
    flip_v: bool
    rotate90: bool
    min_frame_bytes: int
    max_frame_bytes: int
    render_while_printing: bool
    nice: int
    render_timeout: float
    render_attempts: int
    virtual_camera: dict = field(default_factory=dict)

    def camera_for(self, printer: str | None) -> Camera | None:
        """The printer's own camera, else one for any printer."""
        for camera in self.cameras:
            if camera.printer is not None and camera.printer == printer:
                return camera
        for camera in self.cameras:
            if camera.printer is None:
                return camera
        return None

    @property
    def extension(self) -> str:
        return "mpg" if self.codec == "mpeg2video" else "mp4"

    @property
    def container(self) -> str:
        return "vob" if self.codec == "mpeg2video" else "mp4"

    def should_render(self, success: bool) -> bool:
        """OctoPrint's renderAfterPrint: always, success, failure; off (and the API's "never") render nothing."""
        return self.render_after == "always" or (self.render_after == "success" and success) or \
            (self.render_after == "failure" and not success)


def _implicit_camera(config, webcam: dict, section: dict) -> Camera | None:
    """OctoPrint's one snapshot webcam: plugins.classicwebcam (≥ 1.9), else webcam.snapshot (older), else the
    virtual camera when the printer is the virtual one."""
    classic = (config.get("plugins", "classicwebcam") or {})
    url = classic.get("snapshot") or webcam.get("snapshot")
    timeout = classic.get("snapshotTimeout") if classic.get("snapshot") else webcam.get("snapshotTimeout")
    verify = classic.get("snapshotSslValidation") if classic.get("snapshot") else webcam.get("snapshotSslValidation")
    if not url:
        from zevents.printer.settings import printer_sections  # several printers: any virtual one films

        if any(str(printer.get("port") or "").upper() == "VIRTUAL" for printer in printer_sections(config)):
            url = VIRTUAL
    if not url:
        return None
    return Camera(name="classic", snapshot=url, timeout=float(timeout or section.get("timeout") or 5.0),
                  retries=int(section.get("retries", 2)), retry_backoff=float(section.get("retry_backoff", 0.25)),
                  ssl_validation=True if verify is None else bool(verify))


def resolve(config) -> Settings:
    webcam = config.get("webcam") or {}
    section = config.get("timelapse") or {}
    tl = webcam.get("timelapse") or {}
    options = tl.get("options") or {}
    cameras = []
    for index, raw in enumerate(section.get("cameras") or []):
        merged = {"timeout": section.get("timeout", 5.0), "retries": section.get("retries", 2),
                  "retry_backoff": section.get("retry_backoff", 0.25), "name": f"camera{index}"}
        merged.update({k: v for k, v in raw.items() if v is not None})
        cameras.append(Camera(**merged))
    implicit = _implicit_camera(config, webcam, section)
    if implicit is not None and not any(c.printer is None for c in cameras):
        cameras.append(implicit)
    modes = section.get("modes")
    if modes is None:
        modes = [tl["type"]] if tl.get("type") in ("zchange", "timed") else ["layer"]
    # OctoPrint's precondition too: no snapshot camera, no timelapse.
    enabled = bool(section.get("enabled", True)) and bool(webcam.get("timelapseEnabled", True)) and bool(modes) \
        and bool(cameras)
    ffmpeg = webcam.get("ffmpeg") or shutil.which("ffmpeg")
    interval = options.get("interval")
    return Settings(
        enabled=enabled, modes=tuple(dict.fromkeys(modes)), cameras=cameras,
        fps=int(tl.get("fps", 25)), post_roll=int(tl.get("postRoll", 0)),
        render_after=str(tl.get("renderAfterPrint", "always")),
        interval=max(1.0, float(10 if interval is None else interval)),
        zhop=float(options.get("retractionZHop") or 0), min_delay=float(
            5 if options.get("minDelay") is None else options["minDelay"]),
        ffmpeg=ffmpeg, threads=int(webcam.get("ffmpegThreads", 1)),
        codec=str(webcam.get("ffmpegVideoCodec") or "libx264"), bitrate=str(webcam.get("bitrate") or "10000k"),
        commandline=webcam.get("ffmpegCommandline") or DEFAULT_COMMANDLINE,
        thumbnail_commandline=webcam.get("ffmpegThumbnailCommandline") or DEFAULT_THUMBNAIL_COMMANDLINE,
        clean_after_days=int(webcam.get("cleanTmpAfterDays", 7)),
        render_delay=float(webcam.get("renderAfterPrintDelay") or 0),
        flip_h=bool(webcam.get("flipH") or (config.get("plugins", "classicwebcam", "flipH") or False)),
        flip_v=bool(webcam.get("flipV") or (config.get("plugins", "classicwebcam", "flipV") or False)),
        rotate90=bool(webcam.get("rotate90") or (config.get("plugins", "classicwebcam", "rotate90") or False)),
        min_frame_bytes=int(section.get("min_frame_bytes", 100)),
        max_frame_bytes=int(section.get("max_frame_bytes", 20_000_000)),
        render_while_printing=bool(section.get("render_while_printing", False)),
        nice=int(section.get("nice", 10)), render_timeout=float(section.get("render_timeout", 3600)),
        render_attempts=int(section.get("render_attempts", 3)),
        virtual_camera=dict(section.get("virtual_camera") or {}),
    )
