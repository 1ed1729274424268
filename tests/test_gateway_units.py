"""The gateway's logic in-process, without a node: the printer view's flags in every state the link publishes, the
push socket's frame decoding, the login throttle's windows, login sessions going stale, and the user store (hashes,
keys, app keys, file modes).  Time-dependent parts run on a fake clock patched into the module (no sleeps)."""
from __future__ import annotations

import json
import stat

import pytest

from zevents.gateway import auth, push, users
from zevents.gateway.auth import RateLimiter, Sessions
from zevents.gateway.printer_view import PrinterView
from zevents.gateway.users import UserError, UserStore
from zevents.printer.link import STATE_STRINGS


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(auth.time, "monotonic", fake)
    return fake


# --- PrinterView: OctoPrint's 11 flags --------------------------------------------------------------------------

FLAG_NAMES = ("operational", "printing", "cancelling", "pausing", "resuming", "finishing", "closedOrError", "error",
              "paused", "ready", "sdReady")
# OctoPrint 1.11.8's flags by state, written out from octoprint/util/comm.py (OPERATIONAL_STATES, PRINTING_STATES,
# isClosedOrError, isError, isBusy) and printer/standard.py (closedOrError also when offline; ready = operational,
# not busy, not streaming).  Columns in FLAG_NAMES' order; sdReady follows operational here (the card is only
# reachable through a connected printer).
T, F = True, False
EXPECTED_FLAGS = {
    #                   oper print cancl pausg resmg finsh clsOE error pausd ready sdRdy
    "OFFLINE":           (F,   F,    F,    F,    F,    F,    T,    F,    F,    F,    F),
    "OPEN_SERIAL":       (F,   F,    F,    F,    F,    F,    F,    F,    F,    F,    F),
    "DETECT_SERIAL":     (F,   F,    F,    F,    F,    F,    F,    F,    F,    F,    F),
    "CONNECTING":        (F,   F,    F,    F,    F,    F,    F,    F,    F,    F,    F),
    "OPERATIONAL":       (T,   F,    F,    F,    F,    F,    F,    F,    F,    T,    T),
    "STARTING":          (T,   T,    F,    F,    F,    F,    F,    F,    F,    F,    T),
    "PRINTING":          (T,   T,    F,    F,    F,    F,    F,    F,    F,    F,    T),
    "PAUSING":           (T,   T,    F,    T,    F,    F,    F,    F,    F,    F,    T),
    "PAUSED":            (T,   F,    F,    F,    F,    F,    F,    F,    T,    F,    T),
    "CANCELLING":        (T,   T,    T,    F,    F,    F,    F,    F,    F,    F,    T),
    "RESUMING":          (T,   T,    F,    F,    T,    F,    F,    F,    F,    F,    T),
    "FINISHING":         (T,   T,    F,    F,    F,    T,    F,    F,    F,    F,    T),
    "CLOSED":            (F,   F,    F,    F,    F,    F,    T,    F,    F,    F,    F),
    "ERROR":             (F,   F,    F,    F,    F,    F,    T,    T,    F,    F,    F),
    "CLOSED_WITH_ERROR": (F,   F,    F,    F,    F,    F,    T,    T,    F,    F,    F),
    "TRANSFERING_FILE":  (T,   F,    F,    F,    F,    F,    F,    F,    F,    F,    T),
}


def test_the_flag_table_covers_every_state_the_link_publishes():
    assert set(EXPECTED_FLAGS) == set(STATE_STRINGS)


@pytest.mark.parametrize("state_id", sorted(EXPECTED_FLAGS))
def test_printer_view_flags_in_every_state(state_id):
    view = PrinterView()
    view.apply("PrinterStateChanged", {"state_id": state_id, "state_string": STATE_STRINGS[state_id]})
    state = view.state()
    assert list(state["flags"]) == list(FLAG_NAMES)                  # all 11, always (Cura indexes them)
    assert state["flags"] == dict(zip(FLAG_NAMES, EXPECTED_FLAGS[state_id]))
    assert state["text"] == STATE_STRINGS[state_id] == view.job()["state"]


def test_printer_view_error_text_and_disconnect():
    view = PrinterView()
    assert view.state() == {"text": "Offline", "flags": dict(zip(FLAG_NAMES, EXPECTED_FLAGS["OFFLINE"])),
                            "error": ""}
    view.apply("PrinterStateChanged", {"state_id": "OPERATIONAL", "state_string": "Operational"})
    view.apply("Temperature", {"tools": {"T0": [210.0, 215.0]}, "bed": [60.0, 60.0]})
    view.apply("Error", {"error": "Heater decoupled"})
    view.apply("PrinterStateChanged", {"state_id": "ERROR", "state_string": "Error"})
    assert view.state()["error"] == "Heater decoupled"
    assert view.temperature() == {"tool0": {"actual": 210.0, "target": 215.0, "offset": 0},
                                  "bed": {"actual": 60.0, "target": 60.0, "offset": 0}}
    view.apply("PrinterStateChanged", {"state_id": "CLOSED_WITH_ERROR", "state_string": "Offline after error"})
    assert view.temperature() == {}                                   # no readings from a closed port
    view.apply("Disconnected", {})
    assert view.state()["text"] == "Offline" and view.state()["flags"]["closedOrError"]
    view.apply("PrinterStateChanged", {"state_id": "OPERATIONAL", "state_string": "Operational"})
    assert view.state()["error"] == ""                                # a good state clears the old error


# --- push._decode: what clients send on the socket ------------------------------------------------------------

@pytest.mark.parametrize("data, sockjs, expected", [
    # SockJS: a JSON array of JSON strings, each an object
    (json.dumps([json.dumps({"auth": "bob:s"}), json.dumps({"throttle": 2})]), True,
     [{"auth": "bob:s"}, {"throttle": 2}]),
    (json.dumps(json.dumps({"auth": "bob:s"})), True, [{"auth": "bob:s"}]),       # one JSON string, not in a list
    (json.dumps([{"auth": "bob:s"}]), True, []),                                   # objects, not strings: ignored
    (json.dumps([json.dumps([1, 2]), "not json", json.dumps({"a": 1})]), True, [{"a": 1}]),
    (json.dumps([]), True, []),
    ("a[", True, []),                                                              # not JSON at all
    # the raw socket: one plain JSON object per frame
    (json.dumps({"auth": "bob:s", "subscribe": {"state": False}}), False,
     [{"auth": "bob:s", "subscribe": {"state": False}}]),
    (json.dumps([json.dumps({"auth": "bob:s"})]), False, []),                      # SockJS framing on the raw one
    (json.dumps("x"), False, []),
    ("{", False, []),
])
def test_socket_frame_decoding(data, sockjs, expected):
    assert push._decode(data, sockjs) == expected


# --- RateLimiter: 3 a minute, 5 in 10 minutes, 10 an hour ------------------------------------------------------

def hits(limiter: RateLimiter, clock: FakeClock, client: str, times: list) -> None:
    for when in times:
        clock.now = 1000.0 + when
        limiter.hit(client)


def at(limiter: RateLimiter, clock: FakeClock, when: float, client: str = "10.0.0.1") -> bool:
    clock.now = 1000.0 + when
    return limiter.blocked(client)


def test_rate_limiter_minute_window(clock):
    limiter = RateLimiter()
    hits(limiter, clock, "10.0.0.1", [0, 1])
    assert not at(limiter, clock, 2)
    hits(limiter, clock, "10.0.0.1", [2])
    assert at(limiter, clock, 3) and at(limiter, clock, 60)
    assert not at(limiter, clock, 61)                                 # the first hit left the minute
    assert not at(limiter, clock, 3, client="10.0.0.2")               # per client address


def test_rate_limiter_ten_minute_and_hour_windows(clock):
    limiter = RateLimiter()
    hits(limiter, clock, "10.0.0.1", [0, 1, 2, 100, 101])             # 5 in 10 minutes, never 3 in one minute
    assert at(limiter, clock, 102) and at(limiter, clock, 599)
    assert not at(limiter, clock, 605)                                # 0, 1 and 2 left the 10 minutes
    hits(limiter, clock, "10.0.0.1", [605, 606, 700, 1300, 1301])     # 10 in the hour, never 5 in 10 minutes
    assert at(limiter, clock, 1302) and at(limiter, clock, 3600)
    assert not at(limiter, clock, 3700)                               # 0..100 left the hour: 7 remain


def test_rate_limiter_disabled_never_blocks(clock):
    limiter = RateLimiter(enabled=False)
    hits(limiter, clock, "10.0.0.1", range(20))
    assert not at(limiter, clock, 20)


# --- Sessions: stale after session_stale_after seconds without use ----------------------------------------------

def test_sessions_go_stale_without_use(clock):
    sessions = Sessions(stale_after=900)
    token = sessions.new("bob")
    assert len(token) == 64 and sessions.user(token) == "bob"
    clock.now += 899
    assert sessions.user(token) == "bob"                              # use keeps it alive...
    clock.now += 899
    assert sessions.user(token, touch=False) == "bob"                 # ...a look without touch does not
    clock.now += 2
    assert sessions.user(token) is None                               # 901 s since its last use
    assert sessions.user(token) is None and sessions.user(None) is None and sessions.user("nope") is None


def test_sessions_end_and_prune(clock):
    sessions = Sessions(stale_after=60)
    bob1, bob2, carol = sessions.new("bob"), sessions.new("bob"), sessions.new("carol")
    assert len({bob1, bob2, carol}) == 3
    assert sessions.end(bob1) == "bob" and sessions.user(bob1) is None and sessions.end(bob1) is None
    sessions.end_user("bob")
    assert sessions.user(bob2) is None and sessions.user(carol) == "carol"
    clock.now += 61
    sessions.new("dave")                                              # a new session prunes the stale ones
    assert carol not in sessions._sessions


# --- UserStore ------------------------------------------------------------------------------------------------

@pytest.fixture
def store(tmp_path):
    return UserStore(tmp_path)


def test_passwords_are_argon2_hashes_and_checked(store):
    store.add("alice", "alice-secret", admin=True)
    store.add("bob", "bob-secret")
    stored = (store.path).read_text()
    assert "alice-secret" not in stored and "bob-secret" not in stored
    assert store.get("alice").password.startswith("$argon2id$")
    assert store.get("alice").password != store.get("bob").password
    assert store.check_password("alice", "alice-secret").name == "alice"
    assert store.check_password("alice", "bob-secret") is None
    assert store.check_password("nobody", "alice-secret") is None
    assert store.check_password("alice", "") is None
    assert store.get("alice").admin and not store.get("bob").admin
    store.set_password("bob", "new-secret")
    assert store.check_password("bob", "bob-secret") is None and store.check_password("bob", "new-secret")


def test_bad_users_are_refused_with_nothing_written(store):
    store.add("alice", "pw")
    before = store.path.read_bytes()
    for name, password in (("alice", "pw"), ("bad name", "pw"), ("../x", "pw"), ("", "pw"), ("carol", "")):
        with pytest.raises(UserError):
            store.add(name, password)
    with pytest.raises(UserError, match="unknown group"):
        store.add("dave", "pw", groups=("wizards",))
    assert store.path.read_bytes() == before


def test_api_keys(store):
    store.add("alice", "pw", admin=True)
    store.add("bob", "pw")
    assert store.user_for_key("") == (None, None)
    key = store.new_apikey("bob")
    user, how = store.user_for_key(key)
    assert (user.name, how) == ("bob", "apikey")
    assert store.user_for_key(key[:-1]) == (None, None) and store.user_for_key(key + "x") == (None, None)
    newer = store.new_apikey("bob")
    assert newer != key and store.user_for_key(key) == (None, None)    # the old key stops working
    assert store.user_for_key(newer)[0].name == "bob"


def test_key_lookup_compares_every_key_in_constant_time(store, monkeypatch):
    """No early exit on a match and no == on keys: every stored key goes through hmac.compare_digest, whichever
    (if any) matches, so the time taken says nothing about which key (or how much of one) was right."""
    for name in ("alice", "bob", "carol"):
        store.add(name, "pw")
        store.new_apikey(name)
    store.grant_appkey("alice", "Cura")
    store.grant_appkey("bob", "Home Assistant")
    compared = []
    real = users.hmac.compare_digest

    def recording(a, b):
        compared.append(a)
        return real(a, b)
    monkeypatch.setattr(users.hmac, "compare_digest", recording)
    first_key = store.get("alice").apikey
    for key in (first_key, "wrong", store.appkeys()[0]["key"]):
        compared.clear()
        store.user_for_key(key)
        assert len(compared) == 5, key                               # 3 user keys + 2 app keys, every time


def test_app_keys_one_per_user_and_app_case_insensitively(store):
    store.add("alice", "pw")
    store.add("bob", "pw")
    key = store.grant_appkey("alice", "Home Assistant")
    assert store.grant_appkey("alice", "home assistant") == key      # same user, same app: the same key
    assert store.grant_appkey("alice", "HOME ASSISTANT") == key
    others = {store.grant_appkey("bob", "Home Assistant"), store.grant_appkey("alice", "Cura")}
    assert key not in others and len(others) == 2
    assert len(store.appkeys()) == 3
    user, how = store.user_for_key(key)
    assert (user.name, how) == ("alice", "appkey")
    with pytest.raises(UserError):
        store.grant_appkey("nobody", "Cura")
    assert store.revoke_appkey("alice", "HOME assistant") and store.user_for_key(key) == (None, None)
    assert not store.revoke_appkey("alice", "Home Assistant")
    store.remove("bob")                                               # a removed user's app keys go too
    assert [k["user"] for k in store.appkeys()] == ["alice"]


def test_inactive_users_keys_do_not_work(store):
    store.add("bob", "pw")
    key = store.new_apikey("bob")
    app_key = store.grant_appkey("bob", "Cura")
    store.get("bob").active = False
    store._save()
    assert store.user_for_key(key) == (None, None) and store.user_for_key(app_key) == (None, None)
    assert store.check_password("bob", "pw") is None


def test_files_are_private_and_reread_when_another_process_changes_them(store, tmp_path):
    store.add("alice", "pw")
    store.grant_appkey("alice", "Cura")
    for path in (store.path, store.keys_path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    other = UserStore(tmp_path)                                       # what `zevents user ...` does meanwhile
    key = other.new_apikey("alice")
    other.add("bob", "pw")
    assert store.user_for_key(key)[0].name == "alice"
    assert {u.name for u in store.users()} == {"alice", "bob"}
    assert not list(tmp_path.glob("*.tmp*"))                          # atomic writes leave no temp files
