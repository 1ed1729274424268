#!/usr/bin/env python3
"""A hook for the tests: appends one JSON line (argv, ZEVENTS_*/HOOK_* environment, stdin, cwd) to $HOOK_RECORD."""
import json
import os
import sys

line = json.dumps({
    "argv": sys.argv[1:],
    "env": {k: v for k, v in os.environ.items() if k.startswith(("ZEVENTS_", "HOOK_"))},
    "stdin": sys.stdin.read(),
    "cwd": os.getcwd(),
}) + "\n"
fd = os.open(os.environ["HOOK_RECORD"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
os.write(fd, line.encode())  # one write on an O_APPEND file: concurrent hooks don't interleave lines
os.close(fd)
