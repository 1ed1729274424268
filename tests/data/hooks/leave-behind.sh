#!/bin/sh
# A hook that leaves 53 processes behind and exits at once (or hangs when $3 is "hang"): a background child, one that
# left for a session of its own (setsid), the child of such a one, and 50 more background children.  Each writes its
# pid to $1; they live $2 seconds (default 1000).
pids=$1
life=${2:-1000}
sleep "$life" & echo $! >> "$pids"
setsid sh -c "echo \$\$ >> '$pids'; exec sleep $life" &
setsid sh -c "sleep $life & echo \$! >> '$pids'; wait" &
for i in $(seq 50); do sleep "$life" & echo $! >> "$pids"; done
while [ "$(wc -l < "$pids")" -lt 53 ]; do sleep 0.01; done
if [ "$3" = hang ]; then sleep 1000; fi
