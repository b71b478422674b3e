#!/bin/bash
# ${host}: restart this host's munin-node, as `systemctl restart munin-node` does on a real host
# (munin-node reads its plugin list at start only). Written by `igops lab up`.
set -eu
export PATH=${path} LANG=C.UTF-8
export ${marker_env}='${state_root}'
pid_file='${pid_file}'
if [ -s "$$pid_file" ]; then
    old=$$(cat "$$pid_file")
    kill "$$old" 2>/dev/null || true
    for _ in $$(seq 100); do kill -0 "$$old" 2>/dev/null || break; sleep 0.05; done
    rm -f "$$pid_file"
fi
cd /
setsid ${command} </dev/null >>'${log_file}' 2>&1 &
for _ in $$(seq 200); do
    if [ -s "$$pid_file" ] && exec 3<>/dev/tcp/${address}/${port} 2>/dev/null; then exit 0; fi
    sleep 0.05
done
echo "munin-node on ${host} did not come back; see ${log_file}" >&2
exit 1
