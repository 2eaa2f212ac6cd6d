#!/usr/bin/env bash
# The main job on the local test hosts: install what is needed, create the hosts (one Redis host, two worker
# hosts), deploy Redis and the worker pools with playbooks/site.yml, enqueue demo jobs and show the fleet
# processing them until every job has run, then show scheduled autoscaling runs scale the busy pool out and in.
#
#   scripts/demo.sh            deploy and run 1,000 jobs
#   DEMO_JOBS=5000 scripts/demo.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
"$ROOT/scripts/bootstrap.sh"
export PATH="$ROOT/.venv/bin:$PATH"
export CONTAINERS_CONF="$ROOT/tests/hosts/containers.conf"
export ANSIBLE_CONFIG="$ROOT/ansible.cfg"

jobs="${DEMO_JOBS:-1000}"
case "$jobs" in
  ''|*[!0-9]*) echo "DEMO_JOBS=$jobs is invalid; give a whole number of jobs such as 1000" >&2; exit 2 ;;
esac
slow=$(( jobs / 10 ))
fast=$(( jobs - slow ))

step() { printf '\n==> %s\n' "$*"; }

step "Creating the local test hosts (scripts/testhosts.sh up)"
scripts/testhosts.sh up

step "Deploying Redis and the Sidekiq pools: ansible-playbook -i inventories/local playbooks/site.yml"
ansible-playbook -i inventories/local playbooks/site.yml

step "Enqueueing $fast fast jobs (queues critical, default, low) and $slow slow jobs (queue slow, 2 s each)"
jids_file="$(mktemp)"
trap 'rm -f "$jids_file"' EXIT
python scripts/local_fleet.py enqueue --fast "$fast" --slow "$slow" --slow-seconds 2 > "$jids_file"

step "Watching the fleet work through them (counted by job id)"
python scripts/local_fleet.py wait "$jids_file" --timeout 600

step "Processes as Sidekiq reports them in Redis"
python scripts/local_fleet.py status

step "Autoscaling: a burst of slow jobs, with playbooks/autoscale.yml run on a schedule"
scripts/demo_autoscale.sh inventories/local

cat <<DONE

The hosts keep running. Look around with:
  podman exec -it sko-worker1 systemctl status 'sidekiq-*'
  podman exec -it sko-worker1 journalctl -u 'sidekiq-bulk@*' -n 20
Remove them with: scripts/testhosts.sh down
DONE
