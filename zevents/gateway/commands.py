"""`zevents user ...` and `zevents gateway ...`: the gateway's commands behind the CLI's adapters.

Users and keys are files (:mod:`zevents.gateway.users`), so they are changed without a running gateway (which sees
the change at its next request); app-key decisions and online checks go to the running gateway's channel.
"""
from __future__ import annotations

import getpass
import json
import sys

from zevents.gateway.users import UserError, UserStore


def _fail(message: str, code: int = 2) -> int:
    print(f"zevents: {message}", file=sys.stderr)
    return code


def _password(prompt: bool) -> str:
    """From a prompt (twice) on a terminal, else the first line of stdin."""
    if sys.stdin.isatty() and prompt:
        first = getpass.getpass("Password: ")
        if getpass.getpass("Password (again): ") != first:
            raise UserError("the passwords differ")
        return first
    line = sys.stdin.readline()
    return line.rstrip("\r\n")


def _store(config) -> UserStore:
    return UserStore(config.data_dir)


def run_add(config, name: str, admin: bool) -> int:
    try:
        user = _store(config).add(name, _password(True), admin=admin)
    except UserError as exc:
        return _fail(str(exc))
    print(f"user {user.name} added ({', '.join(user.groups)})", file=sys.stderr)
    return 0


def run_rm(config, name: str) -> int:
    try:
        _store(config).remove(name)
    except UserError as exc:
        return _fail(str(exc))
    return 0


def run_passwd(config, name: str) -> int:
    try:
        _store(config).set_password(name, _password(True))
    except UserError as exc:
        return _fail(str(exc))
    return 0


def run_apikey(config, name: str, show: bool) -> int:
    store = _store(config)
    try:
        if show:
            user = store.get(name)
            if user is None:
                raise UserError(f"no user {name!r}")
            if not user.apikey:
                raise UserError(f"user {name!r} has no API key yet (`zevents user apikey {name}` makes one)")
            print(user.apikey)
        else:
            print(store.new_apikey(name))
    except UserError as exc:
        return _fail(str(exc))
    return 0


def run_ls(config, as_json: bool) -> int:
    store = _store(config)
    users = [{"name": u.name, "groups": list(u.groups), "active": u.active, "apikey": bool(u.apikey),
              "appkeys": [k["app"] for k in store.appkeys() if k["user"] == u.name]} for u in store.users()]
    if as_json:
        print(json.dumps(users))
        return 0
    for user in users:
        keys = f"  app keys: {', '.join(user['appkeys'])}" if user["appkeys"] else ""
        print(f"{user['name']:<20} {','.join(user['groups']):<16} {'api key' if user['apikey'] else '':<8}{keys}")
    return 0


def _gateway(config, command: str, args: dict) -> tuple[int, dict | None]:
    from zevents.gateway.service import GatewayClient
    from zevents.printer.channel import ChannelError

    client = GatewayClient(config)
    try:
        return 0, client.request(command, args, timeout=30.0)
    except ChannelError as exc:
        return _fail(str(exc), 1), None
    finally:
        client.close()


def run_appkey_ls(config, as_json: bool) -> int:
    code, reply = _gateway(config, "APPKEYS", {})
    if code:
        return code
    if as_json:
        print(json.dumps(reply["pending"]))
        return 0
    if not reply["pending"]:
        print("no app-key requests are waiting (a request expires 5 s after its app stops polling)",
              file=sys.stderr)
    for item in reply["pending"]:
        who = f" for user {item['user_id']}" if item.get("user_id") else ""
        print(f"{item['user_token']}  {item['app_id']!r}{who} from {item['remote_address']}")
    return 0


def run_appkey_decide(config, token: str, user: str, approve: bool) -> int:
    code, reply = _gateway(config, "APPKEY_DECIDE", {"token": token, "user": user, "approve": approve})
    if code:
        return code
    verb = "approved" if approve else "denied"
    print(f"{reply['app']!r} {verb} for {reply['user']}", file=sys.stderr)
    return 0


def run_online_check(config, as_json: bool) -> int:
    code, reply = _gateway(config, "ONLINE_CHECK", {})
    if code:
        return code
    print(json.dumps(reply) if as_json else ("online" if reply["online"] else
                                            f"offline (connection: {reply['connection']}, "
                                            f"resolution: {reply['resolution']})"))
    return 0 if reply["online"] else 1
