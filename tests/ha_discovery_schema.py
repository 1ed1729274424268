"""A check of Home Assistant MQTT discovery messages, written from Home Assistant's documented discovery schema
(MQTT integration: "Discovery messages", the abbreviation tables, and the sensor / binary_sensor / button platform
options with their device classes and units).  Only what zevents publishes is covered: those three components.

``check_discovery(topic, payload)`` raises DiscoveryError with the reason when Home Assistant would refuse (or
mis-read) the message.
"""
from __future__ import annotations

import re

TOPIC = re.compile(r"(?P<prefix>[^/+#]+)/(?P<component>[^/]+)/(?:(?P<node_id>[a-zA-Z0-9_-]+)/)?"
                   r"(?P<object_id>[a-zA-Z0-9_-]+)/config\Z")

# The documented abbreviations of the keys used by these platforms (and the full names they stand for).
ABBREVIATIONS = {
    "avty": "availability", "avty_mode": "availability_mode", "avty_t": "availability_topic",
    "avty_tpl": "availability_template", "cmd_t": "command_topic", "cmd_tpl": "command_template",
    "dev": "device", "dev_cla": "device_class", "en": "enabled_by_default", "enc": "encoding",
    "ent_cat": "entity_category", "ent_pic": "entity_picture", "exp_aft": "expire_after",
    "frc_upd": "force_update", "ic": "icon", "json_attr_t": "json_attributes_topic",
    "json_attr_tpl": "json_attributes_template", "obj_id": "object_id", "off_dly": "off_delay",
    "opt": "optimistic", "pl_avail": "payload_available", "pl_not_avail": "payload_not_available",
    "pl_on": "payload_on", "pl_off": "payload_off", "pl_prs": "payload_press", "qos": "qos", "ret": "retain",
    "stat_t": "state_topic", "stat_cla": "state_class", "sug_dsp_prc": "suggested_display_precision",
    "uniq_id": "unique_id", "unit_of_meas": "unit_of_measurement", "val_tpl": "value_template",
    "lrst_t": "last_reset_topic", "lrst_val_tpl": "last_reset_value_template", "pl_avail_t": None,
}
DEVICE_ABBREVIATIONS = {
    "cns": "connections", "ids": "identifiers", "name": "name", "mf": "manufacturer", "mdl": "model",
    "mdl_id": "model_id", "sw": "sw_version", "hw": "hw_version", "sa": "suggested_area",
    "cu": "configuration_url", "via_device": "via_device", "sn": "serial_number",
}
AVAILABILITY_ABBREVIATIONS = {"t": "topic", "pl_avail": "payload_available", "pl_not_avail": "payload_not_available",
                              "val_tpl": "value_template"}

COMMON = {"availability", "availability_mode", "availability_topic", "availability_template", "device",
          "enabled_by_default", "encoding", "entity_category", "entity_picture", "icon", "json_attributes_topic",
          "json_attributes_template", "name", "object_id", "default_entity_id", "qos", "unique_id",
          "payload_available", "payload_not_available", "platform"}
PLATFORMS = {
    "sensor": {"keys": COMMON | {"state_topic", "device_class", "state_class", "unit_of_measurement",
                                 "value_template", "expire_after", "force_update", "suggested_display_precision",
                                 "last_reset_value_template", "options"},
               "required": {"state_topic"}},
    "binary_sensor": {"keys": COMMON | {"state_topic", "device_class", "value_template", "payload_on", "payload_off",
                                        "expire_after", "force_update", "off_delay"},
                      "required": {"state_topic"}},
    "button": {"keys": COMMON | {"command_topic", "command_template", "device_class", "payload_press", "retain"},
               "required": {"command_topic"}},
}
DEVICE_CLASSES = {
    "sensor": {"apparent_power", "aqi", "area", "atmospheric_pressure", "battery", "blood_glucose_concentration",
               "carbon_dioxide", "carbon_monoxide", "conductivity", "current", "data_rate", "data_size", "date",
               "distance", "duration", "energy", "energy_distance", "energy_storage", "enum", "frequency", "gas",
               "humidity", "illuminance", "irradiance", "moisture", "monetary", "nitrogen_dioxide",
               "nitrogen_monoxide", "nitrous_oxide", "ozone", "ph", "pm1", "pm10", "pm25", "power_factor", "power",
               "precipitation", "precipitation_intensity", "pressure", "reactive_energy", "reactive_power",
               "signal_strength", "sound_pressure", "speed", "sulphur_dioxide", "temperature", "timestamp",
               "volatile_organic_compounds", "volatile_organic_compounds_parts", "voltage", "volume",
               "volume_flow_rate", "volume_storage", "water", "weight", "wind_direction", "wind_speed"},
    "binary_sensor": {"battery", "battery_charging", "carbon_monoxide", "cold", "connectivity", "door",
                      "garage_door", "gas", "heat", "light", "lock", "moisture", "motion", "moving", "occupancy",
                      "opening", "plug", "power", "presence", "problem", "running", "safety", "smoke", "sound",
                      "tamper", "update", "vibration", "window"},
    "button": {"identify", "restart", "update"},
}
# The units Home Assistant accepts for the device classes zevents uses.
UNITS = {"temperature": {"°C", "°F", "K"}, "duration": {"d", "h", "min", "s", "ms", "µs"}}
STATE_CLASSES = {"measurement", "measurement_angle", "total", "total_increasing"}
STRING_KEYS = {"name", "unique_id", "object_id", "icon", "value_template", "payload_on", "payload_off",
               "payload_press", "unit_of_measurement", "json_attributes_template", "command_template",
               "payload_available", "payload_not_available", "availability_template"}


class DiscoveryError(ValueError):
    pass


def _expand(payload: dict, table: dict, what: str) -> dict:
    out = {}
    for key, value in payload.items():
        full = table.get(key, key)
        if full is None:
            raise DiscoveryError(f"{what}: {key!r} is not a key")
        if full in out:
            raise DiscoveryError(f"{what}: {key!r} given twice (abbreviated and in full)")
        out[full] = value
    return out


def _topic(value, base, key: str, publish: bool) -> str:
    if not isinstance(value, str) or not value:
        raise DiscoveryError(f"{key} must be a non-empty string, not {value!r}")
    if base is not None:
        if value.startswith("~"):
            value = base + value[1:]
        elif value.endswith("~"):
            value = value[:-1] + base
    if "\0" in value or len(value.encode()) > 65535:
        raise DiscoveryError(f"{key}: not a valid MQTT topic: {value!r}")
    if publish and ("+" in value or "#" in value):
        raise DiscoveryError(f"{key}: a topic to publish to may not hold wildcards: {value!r}")
    for level in value.split("/"):
        if ("+" in level and level != "+") or ("#" in level and level != "#"):
            raise DiscoveryError(f"{key}: a wildcard must fill a whole level: {value!r}")
    return value


def check_discovery(topic: str, payload: dict) -> dict:
    """The expanded config when Home Assistant accepts ``payload`` on ``topic``; DiscoveryError otherwise."""
    match = TOPIC.match(topic)
    if match is None:
        raise DiscoveryError(f"not a discovery topic (<prefix>/<component>/[<node_id>/]<object_id>/config, ids of "
                             f"[a-zA-Z0-9_-]): {topic!r}")
    component = match["component"]
    if component not in PLATFORMS:
        raise DiscoveryError(f"component {component!r} is not one of {', '.join(PLATFORMS)}")
    if not isinstance(payload, dict):
        raise DiscoveryError("the payload must be a JSON object")
    base = payload.get("~")
    if base is not None and not isinstance(base, str):
        raise DiscoveryError("'~' must be a string")
    config = _expand({k: v for k, v in payload.items() if k != "~"}, ABBREVIATIONS, topic)
    platform = PLATFORMS[component]
    unknown = set(config) - platform["keys"]
    if unknown:
        raise DiscoveryError(f"{component}: extra keys not allowed: {', '.join(sorted(unknown))}")
    missing = platform["required"] - set(config)
    if missing:
        raise DiscoveryError(f"{component}: required key(s) missing: {', '.join(sorted(missing))}")
    for key, value in config.items():
        if key.endswith("_topic"):
            config[key] = _topic(value, base, key, publish=key == "command_topic")
        elif key in STRING_KEYS and value is not None and not isinstance(value, str):
            raise DiscoveryError(f"{key} must be a string, not {value!r}")
    if "name" in config and config["name"] is not None and not isinstance(config["name"], str):
        raise DiscoveryError("name must be a string or null")
    if "icon" in config and not re.match(r"^[a-z0-9-]+:[a-z0-9-]+\Z", config["icon"]):
        raise DiscoveryError(f"icon must look like 'mdi:name', not {config['icon']!r}")
    if "qos" in config and config["qos"] not in (0, 1, 2):
        raise DiscoveryError("qos must be 0, 1 or 2")
    device_class = config.get("device_class")
    if device_class is not None and device_class not in DEVICE_CLASSES[component]:
        raise DiscoveryError(f"{component}: unknown device_class {device_class!r}")
    unit = config.get("unit_of_measurement")
    if device_class in UNITS and unit is not None and unit not in UNITS[device_class]:
        raise DiscoveryError(f"unit {unit!r} is not a unit of device_class {device_class!r}")
    if "state_class" in config and config["state_class"] not in STATE_CLASSES:
        raise DiscoveryError(f"unknown state_class {config['state_class']!r}")
    if "entity_category" in config and config["entity_category"] not in ("config", "diagnostic"):
        raise DiscoveryError(f"unknown entity_category {config['entity_category']!r}")
    if config.get("availability_mode", "latest") not in ("all", "any", "latest"):
        raise DiscoveryError(f"unknown availability_mode {config['availability_mode']!r}")
    if "availability" in config and "availability_topic" in config:
        raise DiscoveryError("availability and availability_topic are exclusive")
    availability = config.get("availability")
    if availability is not None:
        if not isinstance(availability, list) or not availability:
            raise DiscoveryError("availability must be a non-empty list")
        for index, item in enumerate(availability):
            if not isinstance(item, dict):
                raise DiscoveryError(f"availability[{index}] must be an object")
            item = _expand(item, AVAILABILITY_ABBREVIATIONS, f"availability[{index}]")
            if set(item) - set(AVAILABILITY_ABBREVIATIONS.values()):
                raise DiscoveryError(f"availability[{index}]: extra keys not allowed")
            if "topic" not in item:
                raise DiscoveryError(f"availability[{index}]: required key 'topic' missing")
            _topic(item["topic"], base, f"availability[{index}].topic", publish=False)
    device = config.get("device")
    if device is not None:
        if not isinstance(device, dict):
            raise DiscoveryError("device must be an object")
        device = _expand(device, DEVICE_ABBREVIATIONS, "device")
        if set(device) - set(DEVICE_ABBREVIATIONS.values()):
            raise DiscoveryError("device: extra keys not allowed")
        if not device.get("identifiers") and not device.get("connections"):
            raise DiscoveryError("device: identifiers or connections required")
        identifiers = device.get("identifiers")
        if identifiers is not None and not isinstance(identifiers, (str, list)):
            raise DiscoveryError("device.identifiers must be a string or a list")
        if "unique_id" not in config:
            raise DiscoveryError("an entity with device information needs a unique_id")
    return config
