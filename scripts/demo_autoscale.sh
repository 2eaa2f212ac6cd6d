#!/usr/bin/env bash
# The autoscaling part of the demo, on a fleet that is already deployed (scripts/demo.sh deploys inventories/local).
# It enqueues a burst of slow jobs and runs playbooks/autoscale.yml every DEMO_AUTOSCALE_INTERVAL seconds, as the
# timer of the autoscaler role would. It prints each decision line as it happens, and stops once the pool has
# scaled out, drained the backlog and scaled back in.
#
#   scripts/demo_autoscale.sh                     the local fleet (inventories/local, hosts sko-*)
#   scripts/demo_autoscale.sh /tmp/as4/inventory  another set of test hosts, with the same pools
#
# Settings (environment):
#   DEMO_AUTOSCALE_POOL      pool to watch; it must serve the queue "slow" (default bulk)
#   DEMO_AUTOSCALE_JOBS      slow jobs in the burst (default 400)
#   DEMO_AUTOSCALE_SECONDS   run time of each slow job in seconds (default 1)
#   DEMO_AUTOSCALE_INTERVAL  seconds between two runs (default 12)
#   DEMO_AUTOSCALE_TIMEOUT   seconds after which the demo stops anyway (default 600)
#
# The demo shortens the watched pool's scale-in stabilization window to 30 s and its scale-in cooldown to 20 s for
# these runs only (extra vars), so the scale-in comes within a few minutes of the burst; the deployed settings
# are left as they are.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PATH="$ROOT/.venv/bin:$PATH"
export CONTAINERS_CONF="$ROOT/tests/hosts/containers.conf"
export ANSIBLE_CONFIG="$ROOT/ansible.cfg"
export ANSIBLE_NOCOLOR=1

inventory="${1:-inventories/local}"
pool="${DEMO_AUTOSCALE_POOL:-bulk}"
jobs="${DEMO_AUTOSCALE_JOBS:-400}"
seconds="${DEMO_AUTOSCALE_SECONDS:-1}"
interval="${DEMO_AUTOSCALE_INTERVAL:-12}"
timeout="${DEMO_AUTOSCALE_TIMEOUT:-600}"
for setting in "DEMO_AUTOSCALE_JOBS=$jobs" "DEMO_AUTOSCALE_INTERVAL=$interval" "DEMO_AUTOSCALE_TIMEOUT=$timeout"; do
  case "${setting#*=}" in
    ''|*[!0-9]*) echo "${setting} is invalid; give a whole number" >&2; exit 2 ;;
  esac
done
if [ ! -e "$inventory" ]; then
  echo "inventory $inventory not found; deploy the local fleet with scripts/demo.sh first, or pass an inventory" >&2
  exit 2
fi

step() { printf '\n==> %s\n' "$*"; }
stamp() { date +%H:%M:%S; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
chmod 700 "$work"

# The control host reaches the Redis container by its address, which the inventory does not know. The pools come
# from the inventory too: the group_vars that every host of the group "all" gets.
ansible-inventory -i "$inventory" --list > "$work/inventory.json"
redis_host="$(python -c '
import json, sys
inventory = json.load(open(sys.argv[1]))
print((inventory.get("redis", {}).get("hosts") or [""])[0])' "$work/inventory.json")"
if [ -z "$redis_host" ]; then
  echo "inventory $inventory has no host in the group redis" >&2
  exit 2
fi
fleet() { python scripts/local_fleet.py --redis-container "$redis_host" "$@"; }
redis_url="$(fleet url)"

# Extra vars of the runs: the Redis URL (it carries the password, so a file only this user reads) and the
# watched pool with a short scale-in window.
python - "$work/inventory.json" "$work/extra.json" "$pool" "$redis_host" "$redis_url" <<'PYTHON'
import json, sys

inventory_file, extra_file, watched, redis_host, redis_url = sys.argv[1:]
pools = json.load(open(inventory_file))["_meta"]["hostvars"][redis_host].get("sidekiq_pools") or []
names = [pool["name"] for pool in pools]
if watched not in names:
    sys.exit(f"pool {watched!r} is not in sidekiq_pools {names}; set DEMO_AUTOSCALE_POOL")
for pool in pools:
    if pool["name"] == watched:
        pool["autoscale"] = {**(pool.get("autoscale") or {}), "scale_in_stabilization": 30, "scale_in_cooldown": 20}
with open(extra_file, "w") as handle:
    json.dump({"sidekiq_pools": pools, "autoscale_redis_url": redis_url}, handle)
PYTHON

processes() {
  fleet status | python -c '
import json, sys
status = json.load(sys.stdin)
print(sum(1 for process in status["processes"] if process["tag"] == sys.argv[1] and process["quiet"] == "false"))' "$pool"
}

waiting() {
  fleet status | python -c 'import json, sys; print(sum(json.load(sys.stdin)["queues"].values()))'
}

autoscale_run() {
  # Each decision is one line of the play output; print those lines with the time of the run.
  local status=0
  ansible-playbook -i "$inventory" playbooks/autoscale.yml -e "@$work/extra.json" > "$work/run.log" 2>&1 || status=$?
  grep -E '^\s+autoscale ' "$work/run.log" | sed -e 's/^\s*//' -e "s/^/[$(stamp)] /" || true
  if [ "$status" -ne 0 ]; then
    echo "[$(stamp)] the run failed (exit code $status); its output:"
    tail -n 30 "$work/run.log"
  fi
}

start_count="$(processes)"
step "Pool $pool runs $start_count processes. Enqueueing $jobs slow jobs of ${seconds} s (queue slow)"
fleet enqueue --slow "$jobs" --slow-seconds "$seconds" > "$work/jids.txt"

step "Running playbooks/autoscale.yml every ${interval} s (the schedule), until $pool is back to $start_count processes"
scaled_out=0
deadline=$(( $(date +%s) + timeout ))
while :; do
  autoscale_run
  count="$(processes)"
  backlog="$(waiting)"
  done_line="$(fleet wait "$work/jids.txt" --timeout 0 2>/dev/null | head -n 1 | sed 's/^\[[0-9:]*\] //' || true)"
  echo "[$(stamp)] $pool: $count processes; jobs waiting in all queues: $backlog; burst: $done_line"
  if [ "$count" -gt "$start_count" ]; then
    scaled_out=1
  fi
  if [ "$scaled_out" -eq 1 ] && [ "$backlog" -eq 0 ] && [ "$count" -le "$start_count" ]; then
    step "Done: $pool scaled out, drained the backlog and scaled back in to $count processes"
    break
  fi
  if [ "$(date +%s)" -ge "$deadline" ]; then
    step "Stopping after ${timeout} s (DEMO_AUTOSCALE_TIMEOUT); $pool runs $count processes"
    break
  fi
  sleep "$interval"
done

step "Every job of the burst, counted by job id"
fleet wait "$work/jids.txt" --timeout 120 | tail -n 2
