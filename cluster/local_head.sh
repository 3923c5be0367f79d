#!/usr/bin/env bash
# Start (or stop) a single-machine Ray head for submitting nncift Ray jobs (`ray job submit`).
#
#   cluster/local_head.sh [start]     start the head, print the submit command
#   cluster/local_head.sh status      `ray status` of this head
#   cluster/local_head.sh stop        stop this head only (its process group), not other Ray instances
#   cluster/local_head.sh stop --all  `ray stop`: every Ray process of this user on the machine
#
# Environment knobs (defaults in brackets):
#   VENV [<repo>/.venv]          virtualenv holding ray 2.60 + nncift (installed editable)
#   NUM_CPUS [4]                 logical CPUs; >= 4 so Ray Data actors do not starve a 2-core box
#   NUM_GPUS [unset]             logical GPUs (Ray autodetects when unset)
#   DASHBOARD_HOST [127.0.0.1]   DASHBOARD_PORT [8265]   GCS_PORT [6379]   CLIENT_PORT [10001] (Ray Client)
#   AGENT_PORT [52366]           HTTP port of the head's dashboard agent, which runs the submitted jobs.
#                                Not Ray's default 52365: every private `ray.init()` (a concurrent
#                                `nncift run`, the tests) also starts an agent on 52365, and when that port
#                                is taken `ray job submit` fails with "No available agent to submit job".
#   HEAD_TEMP_DIR [/tmp/ray-nncift]  Ray temp/session dir of this head (kept apart from /tmp/ray, so a
#                                plain `ray.init()` of a test or `nncift run` never attaches to it by accident)
#
# Before starting, every port the head binds by number (GCS, dashboard, agent, client) is checked: a port
# already listened on is named, with the process that holds it, in one line, and nothing is started.
#
# Why the environment below matters (Ray 2.60):
#   * `ray start --head` turns on token authentication; a client without the token fails with
#     AuthenticationError. The head is started with RAY_AUTH_MODE=disabled (set it in clients too).
#   * A job entrypoint's bare `python` resolves through the PATH the head was started with (often the
#     system python). The venv goes first on PATH here; the printed command also uses the absolute path.
#   * HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE: the models ship as packages; never reach for the Hub.
#   * `ray stop` kills every Ray process of the user, including the private Ray of a concurrent
#     `nncift run` or test run; `stop` here only kills this head's process group.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$REPO/.venv}"
NUM_CPUS="${NUM_CPUS:-4}"
DASHBOARD_HOST="${DASHBOARD_HOST:-127.0.0.1}"
DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"
GCS_PORT="${GCS_PORT:-6379}"
AGENT_PORT="${AGENT_PORT:-52366}"
CLIENT_PORT="${CLIENT_PORT:-10001}"
HEAD_TEMP_DIR="${HEAD_TEMP_DIR:-/tmp/ray-nncift}"
PGID_FILE="$HEAD_TEMP_DIR/local_head.pgid"

RAY="$VENV/bin/ray"
PY="$VENV/bin/python"
[[ -x "$RAY" ]] || { echo "error: $RAY not found; create the venv first (make install)" >&2; exit 1; }

export RAY_AUTH_MODE=disabled
export PATH="$VENV/bin:$PATH"
export VIRTUAL_ENV="$VENV"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export RAY_TRAIN_V2_ENABLED=1

# live (non-zombie) members of a process group
_members() { ps -eo pgid=,stat=,pid= | awk -v g="$1" '$1 == g && $2 !~ /^Z/ {print $3}'; }

# check_ports KNOB=PORT...: one line on stderr per port that something already listens on, naming the process
# (and its Ray session, if it is one); exit status 1 if any. psutil comes with ray.
check_ports() {
  "$PY" - "$@" <<'PY'
import socket
import sys

import psutil

knob = {int(port): name for name, port in (a.split("=", 1) for a in sys.argv[1:])}
held = {}
try:
    for c in psutil.net_connections("tcp"):
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port in knob:
            held.setdefault(c.laddr.port, c.pid)
except psutil.AccessDenied:  # (macOS without root) fall back to binding each port
    pass
for port in set(knob) - set(held):
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            held[port] = None
for port, pid in sorted(held.items()):
    who = "a process this user cannot see"
    if pid:
        try:
            p = psutil.Process(pid)
            cmd = p.cmdline()
            flags = dict(a.lstrip("-").replace("_", "-").split("=", 1) for a in cmd if a.startswith("--") and "=" in a)
            ray = next((f"Ray session {flags[k]}" if "dir" in k else f"Ray at {flags[k]}"
                        for k in ("session-dir", "temp-dir", "gcs-address", "address") if k in flags), None)
            who = f"pid {pid} {p.name()} (user {p.username()}): " + (ray or " ".join(" ".join(cmd).split())[:100])
        except psutil.Error:
            who = f"pid {pid}"
    print(f"error: port {port} ({knob[port]}) is already held by {who}; set {knob[port]}=<a free port>", file=sys.stderr)
sys.exit(1 if held else 0)
PY
}

start() {
  if [[ -s "$PGID_FILE" ]] && [[ -n "$(_members "$(cat "$PGID_FILE")")" ]]; then
    echo "a head started by this script is already running (process group $(cat "$PGID_FILE")); '$0 stop' first" >&2
    exit 1
  fi
  check_ports "GCS_PORT=$GCS_PORT" "DASHBOARD_PORT=$DASHBOARD_PORT" "AGENT_PORT=$AGENT_PORT" \
    "CLIENT_PORT=$CLIENT_PORT" || exit 1
  mkdir -p "$HEAD_TEMP_DIR"
  local gpu_args=()
  [[ -n "${NUM_GPUS:-}" ]] && gpu_args=(--num-gpus "$NUM_GPUS")
  # setsid: the head's daemons (gcs, raylet, dashboard, workers) share one fresh process group that
  # `stop` can signal without touching any other Ray on the machine.
  setsid --wait bash -c 'echo $$ > "$0"; exec "$@"' "$PGID_FILE" \
    "$RAY" start --head \
      --port "$GCS_PORT" \
      --num-cpus "$NUM_CPUS" "${gpu_args[@]}" \
      --include-dashboard true \
      --dashboard-host "$DASHBOARD_HOST" \
      --dashboard-port "$DASHBOARD_PORT" \
      --dashboard-agent-listen-port "$AGENT_PORT" \
      --ray-client-server-port "$CLIENT_PORT" \
      --temp-dir "$HEAD_TEMP_DIR" \
      --disable-usage-stats
  local addr="http://$DASHBOARD_HOST:$DASHBOARD_PORT"
  cat <<MSG

nncift: Ray head is up (auth disabled, $NUM_CPUS logical CPUs, process group $(cat "$PGID_FILE")).
Dashboard / job API: $addr
Submit the demo pipeline:

  cd $REPO
  RAY_AUTH_MODE=disabled $RAY job submit --address $addr \\
    --runtime-env-json '{"working_dir": ".", "excludes": [".venv", "runs", ".git"]}' \\
    -- $PY -m jobs run --config jobs/configs/delift_se_2000.yaml --run-dir /tmp/nncift-job

  (give an absolute --run-dir: a relative one lands inside the job's unpacked working_dir copy)

Stop this head:  $0 stop
MSG
}

stop() {
  if [[ "${1:-}" == "--all" ]]; then
    "$RAY" stop
    return
  fi
  [[ -s "$PGID_FILE" ]] || { echo "no head recorded in $PGID_FILE (use '$0 stop --all' for ray stop)" >&2; exit 1; }
  local pgid
  pgid="$(cat "$PGID_FILE")"
  if [[ -z "$(_members "$pgid")" ]]; then
    echo "head (process group $pgid) is not running"
    rm -f "$PGID_FILE"
    return
  fi
  echo "stopping Ray head (process group $pgid)"
  kill -TERM -- "-$pgid" 2>/dev/null || true
  for _ in $(seq 1 "${GRACE_S:-15}"); do
    [[ -z "$(_members "$pgid")" ]] && break
    sleep 1
  done
  if [[ -n "$(_members "$pgid")" ]]; then
    echo "still alive after ${GRACE_S:-15}s, sending SIGKILL"
    kill -KILL -- "-$pgid" 2>/dev/null || true
    sleep 1
  fi
  # what `ray stop` would also reset: the "latest cluster" file that ray.init("auto") falls back on
  rm -f "$PGID_FILE" "$HEAD_TEMP_DIR/ray_current_cluster"
  echo "stopped"
}

case "${1:-start}" in
  start) start ;;
  stop) shift; stop "$@" ;;
  status) "$RAY" status --address "127.0.0.1:$GCS_PORT" ;;
  *) echo "usage: $0 [start|status|stop [--all]]" >&2; exit 2 ;;
esac
