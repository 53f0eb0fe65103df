#!/usr/bin/env bash
# Install the Runplane node agent on this machine (a GPU node, or a CPU one), as root:
#   deploy/node-agent/install.sh --nats-url nats://nats.example:4222 --password-file ./node-agent.password
# It checks Docker, the NVIDIA driver (NVML) and the NVIDIA container toolkit and says what is
# missing (missing GPU parts are warnings: the node then reports no GPUs), installs the agent
# into its own venv (PREFIX/venv), writes its settings (CONFIG_DIR/node-agent.env and the NATS
# password), and installs, enables and starts the systemd unit runplane-node-agent (restarted
# whenever it stops). Running it again with the same inputs changes nothing; with other
# settings it rewrites them and restarts the agent. deploy/node-agent/uninstall.sh undoes it.
#
# Options (or the environment variable in brackets):
#   --nats-url URL         NATS server(s), comma-separated (RP_NATS_URL; required)
#   --user NAME            NATS user (RP_NATS_USER; default node-agent)
#   --password-file FILE   file holding that user's password (or RP_NATS_PASSWORD)
#   --node-id ID           this node's id (RP_NODE_ID; default: from the hostname)
#   --runtime R            docker | process | auto (RP_RUNTIME; default auto: Docker when it answers)
#   --agent-port PORT      the worker API port (RP_AGENT_PORT; default 8100)
#   --env KEY=VALUE        any other RP_* setting for the agent (repeatable)
#   --wheels DIR           install offline from these wheels (pip --no-index); a runplane-*.whl
#                          there is used as is, else the package is built from --source
#   --source DIR           the Runplane checkout to install (default: the one holding this script)
#   --prefix DIR           where the venv goes (RP_PREFIX; default /opt/runplane)
#   --config-dir DIR       where the settings go (default /etc/runplane)
#   --no-start             install and enable, do not start
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=../lib/venv.sh
source "$here/../lib/venv.sh"
source_dir=$(cd "$here/../.." && pwd)
prefix=${RP_PREFIX:-/opt/runplane}
config_dir=/etc/runplane
unit_name=runplane-node-agent
unit_path=/etc/systemd/system/$unit_name.service
nats_url=${RP_NATS_URL:-}
nats_user=${RP_NATS_USER:-node-agent}
password=${RP_NATS_PASSWORD:-}
node_id=${RP_NODE_ID:-}
runtime=${RP_RUNTIME:-auto}
agent_port=${RP_AGENT_PORT:-8100}
wheels=""
start=1
extra_env=()

die() { echo "install: $*" >&2; exit 1; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nats-url) nats_url=$2; shift 2 ;;
    --user) nats_user=$2; shift 2 ;;
    --password-file) [[ -r "$2" ]] || die "cannot read $2"; password=$(tr -d '\n' < "$2"); shift 2 ;;
    --node-id) node_id=$2; shift 2 ;;
    --runtime) runtime=$2; shift 2 ;;
    --agent-port) agent_port=$2; shift 2 ;;
    --env) [[ "$2" == RP_*=* ]] || die "--env takes RP_NAME=value, got $2"; extra_env+=("$2"); shift 2 ;;
    --wheels) wheels=$(cd "$2" && pwd); shift 2 ;;
    --source) source_dir=$(cd "$2" && pwd); shift 2 ;;
    --prefix) prefix=$2; shift 2 ;;
    --config-dir) config_dir=$2; shift 2 ;;
    --no-start) start=0; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

# -- checks: say what is there and what is missing ---------------------------------------------
problems=0
ok() { printf '  %-8s %s\n' ok "$*"; }
warn() { printf '  %-8s %s\n' warning "$*"; }
fail() { printf '  %-8s %s\n' missing "$*"; problems=$((problems + 1)); }

echo "Runplane node agent: checking this machine"
[[ $(id -u) -eq 0 ]] && ok "running as root" || fail "root: run this as root (sudo)"
[[ -n "$nats_url" ]] && ok "NATS: $nats_url (user $nats_user)" || fail "NATS URL: give --nats-url (or RP_NATS_URL)"
[[ -n "$password" ]] || warn "no NATS password given (--password-file): the agent connects without one"
case "$runtime" in docker|process|auto) ;; *) fail "runtime: --runtime must be docker, process or auto" ;; esac

python=$(command -v python3 || true)
if [[ -n "$python" ]] && "$python" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  ok "Python $("$python" -c 'import platform; print(platform.python_version())') with venv"
else
  fail "Python 3.11 or newer with venv (Debian/Ubuntu: apt-get install python3 python3-venv)"
fi

docker_ok=0
if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
  docker_ok=1
  ok "Docker $(docker version -f '{{.Server.Version}}' 2>/dev/null): workers can run as containers"
elif [[ "$runtime" == docker ]]; then
  fail "Docker: --runtime docker needs a running Docker Engine (https://docs.docker.com/engine/install/)"
else
  warn "no Docker Engine answers: workers run as processes of this machine (RP_RUNTIME=process)"
fi
[[ "$runtime" == auto ]] && { [[ $docker_ok -eq 1 ]] && runtime=docker || runtime=process; }

gpu=0
if ldconfig -p 2>/dev/null | grep 'libnvidia-ml\.so\.1' >/dev/null; then
  gpu=1
  if command -v nvidia-smi >/dev/null; then
    ok "NVIDIA driver: $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | sort | uniq -c \
      | sed 's/^ *//' | paste -sd, - || echo "NVML present")"
  else
    ok "NVIDIA driver: NVML (libnvidia-ml.so.1) present"
  fi
else
  warn "NVIDIA driver: NVML (libnvidia-ml.so.1) not found: this node reports no GPUs (a CPU node)"
fi
if command -v nvidia-ctk >/dev/null || command -v nvidia-container-runtime-hook >/dev/null \
   || { [[ $docker_ok -eq 1 ]] && docker info -f '{{json .Runtimes}}' 2>/dev/null | grep nvidia >/dev/null; }; then
  ok "NVIDIA container toolkit: containers can be given GPUs"
elif [[ $gpu -eq 1 && "$runtime" == docker ]]; then
  warn "NVIDIA container toolkit not found: GPU workers in containers will fail" \
    "(https://docs.nvidia.com/datacenter/cloud-native/container-toolkit/latest/install-guide.html)"
else
  warn "NVIDIA container toolkit not found (needed for GPU workers in containers)"
fi

systemd=0
if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null; then
  systemd=1
  ok "systemd: the agent runs as the unit $unit_name"
else
  warn "systemd is not running: the unit is installed but not started (start it under systemd)"
fi
[[ $problems -eq 0 ]] || die "$problems problem(s) above; nothing was installed"

# -- the venv (deploy/lib/venv.sh, shared with deploy/control-plane/install.sh) ------------------
install_venv "$prefix" "$python" "$source_dir" "$wheels" runplane-node-agent runplane_node_agent
changed=$venv_changed

# -- settings and unit, written only when they differ --------------------------------------------
put() {  # put PATH MODE: stdin becomes PATH when it differs from it
  local tmp
  tmp=$(mktemp)
  cat > "$tmp"
  if [[ -f "$1" ]] && cmp -s "$tmp" "$1"; then
    rm -f "$tmp"
    return
  fi
  install -D -m "$2" "$tmp" "$1"
  rm -f "$tmp"
  echo "wrote $1"
  changed=1
}

mkdir -p "$config_dir"
chmod 0755 "$config_dir"
{
  echo "# Settings of the Runplane node agent (written by deploy/node-agent/install.sh)."
  echo "RP_NATS_URL=$nats_url"
  echo "RP_NATS_USER=$nats_user"
  [[ -n "$password" ]] && echo "RP_NATS_PASSWORD_FILE=$config_dir/nats-password"
  [[ -n "$node_id" ]] && echo "RP_NODE_ID=$node_id"
  echo "RP_RUNTIME=$runtime"
  echo "RP_AGENT_PORT=$agent_port"
  echo "RP_LOG_FORMAT=json"
  for item in "${extra_env[@]}"; do echo "$item"; done
} | put "$config_dir/node-agent.env" 0600
if [[ -n "$password" ]]; then
  printf '%s\n' "$password" | put "$config_dir/nats-password" 0600
fi
unit_changed=$changed
sed -e "s|@PREFIX@|$prefix|g" -e "s|@CONFIG_DIR@|$config_dir|g" "$here/$unit_name.service" | put "$unit_path" 0644
[[ $changed -ne $unit_changed ]] && [[ $systemd -eq 1 ]] && systemctl daemon-reload

if [[ $systemd -eq 1 ]]; then
  systemctl is-enabled -q "$unit_name" 2>/dev/null || systemctl enable -q "$unit_name"
  if [[ $start -eq 1 ]]; then
    if ! systemctl is-active -q "$unit_name"; then
      systemctl start "$unit_name"
    elif [[ $changed -eq 1 ]]; then
      systemctl restart "$unit_name"
    fi
    echo "service: $unit_name $(systemctl is-enabled "$unit_name"), $(systemctl is-active "$unit_name")" \
      "(logs: journalctl -u $unit_name -f)"
  fi
else
  echo "service: $unit_path installed; start it with systemd (systemctl enable --now $unit_name)"
fi
[[ $changed -eq 1 ]] && echo "installed" || echo "nothing to change"
