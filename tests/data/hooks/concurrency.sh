#!/bin/bash
# A slow hook for the tests: counts how many copies run at once (under flock) and records its argument.
# $1: a directory holding `lock`, `now` (running now), `max` (most at once) and `done` (one line per run).
d=$1
exec 9>>"$d/lock"
flock 9
read -r n < "$d/now"; n=$((n + 1)); echo "$n" > "$d/now"
read -r m < "$d/max"; if [ "$n" -gt "$m" ]; then echo "$n" > "$d/max"; fi
flock -u 9
sleep "${HOOK_SLEEP:-0.02}"
flock 9
read -r n < "$d/now"; echo $((n - 1)) > "$d/now"
echo "$2" >> "$d/done"
flock -u 9
