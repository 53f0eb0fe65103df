#!/usr/bin/env bash
# Remove what deploy/node-agent/install.sh installed: stop and disable the unit (the agent stops
# its workers and removes their network on a clean stop), remove the unit, the venv and the
# settings. Idempotent.
#   --prefix DIR        where the venv is (RP_PREFIX; default /opt/runplane)
#   --config-dir DIR    where the settings are (default /etc/runplane)
set -euo pipefail
prefix=${RP_PREFIX:-/opt/runplane}
config_dir=/etc/runplane
unit_name=runplane-node-agent
unit_path=/etc/systemd/system/$unit_name.service
while [[ $# -gt 0 ]]; do
  case "$1" in
    --prefix) prefix=$2; shift 2 ;;
    --config-dir) config_dir=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "uninstall: unknown option $1" >&2; exit 1 ;;
  esac
done
[[ $(id -u) -eq 0 ]] || { echo "uninstall: run this as root" >&2; exit 1; }

if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null; then
  # (grep without -q reads all of it: with pipefail an early exit could fail systemctl by SIGPIPE)
  if systemctl list-unit-files "$unit_name.service" 2>/dev/null | grep "^$unit_name.service" >/dev/null; then
    systemctl disable -q --now "$unit_name" || true
    echo "stopped and disabled $unit_name"
  fi
fi
if [[ -e "$unit_path" ]]; then
  rm -f "$unit_path"
  echo "removed $unit_path"
  if [[ -d /run/systemd/system ]]; then
    systemctl daemon-reload
    systemctl reset-failed "$unit_name" 2>/dev/null || true
  fi
fi
for path in "$prefix/venv" "$config_dir/node-agent.env" "$config_dir/nats-password"; do
  if [[ -e "$path" ]]; then
    rm -rf "$path"
    echo "removed $path"
  fi
done
# The folders too, when nothing else is in them.
rmdir "$config_dir" "$prefix" 2>/dev/null || true
echo "the Runplane node agent is uninstalled"
