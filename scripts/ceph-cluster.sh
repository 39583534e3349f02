#!/usr/bin/env bash
# A throwaway one-node Ceph cluster for the rbd tests, from Debian's
# packages (ceph-mon, ceph-mgr, ceph-osd, ceph-common: see setup-host.sh):
# one monitor, one manager and one bluestore OSD on a sparse file, on
# 127.0.0.1, no authentication, pools of size 1, no systemd.  Everything
# (config, data, logs, sockets, pid files) lives under one directory,
# $VMSNAP_CEPH_DIR (default $VMSNAP_CACHE/ceph-run).
#
#   scripts/ceph-cluster.sh start   # (re)create and start it; prints env
#   scripts/ceph-cluster.sh env     # CEPH_CONF=... VMSNAP_CEPH_POOL=...
#   scripts/ceph-cluster.sh stop    # kill the daemons, remove the directory
#
# "start" on a running cluster only prints its env; on anything else it
# stops first and starts afresh.  "stop" does nothing if there is nothing.
# "start" and "env" print lines to eval: CEPH_CONF (the ceph.conf, which
# the ceph, rbd and rados commands read), VMSNAP_CEPH_CONF (the same, for
# tests/rbd/, which never use a CEPH_CONF of their environment) and
# VMSNAP_CEPH_POOL (the pool, size 1, initialised for rbd).
#
# Measured on the development machine (Debian 12, 2 shared cores, ext4,
# Ceph 16.2.15 from bookworm): "start" takes 20 to 32 s (mostly the OSD's
# bluestore mkfs and boot, and the pool's PGs peering), "stop" 0.5 to 7 s
# (the OSD takes a few seconds to exit on SIGTERM).  Resident memory: 35
# MiB monitor, 300 MiB manager, 45 MiB OSD, 85 MiB after 128 MiB written
# with "rbd bench" (write 416 MiB/s, read 615 MiB/s, 1 MiB requests); idle
# the three use under 1 % of a core.  On disk: 42 MiB after start (40 MiB
# the monitor's store), 171 MiB after that bench; the OSD's block file is
# sparse (10 GiB apparent).  Installed, the packages take 231 MiB (97
# Debian packages with their dependencies, 52 MB downloaded).  Bluestore
# runs on a plain file here (no loop device, device-mapper or LVM).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
. "$here/scripts/pins.sh"

dir=${VMSNAP_CEPH_DIR:-$VMSNAP_CACHE/ceph-run}
conf=$dir/ceph.conf
pool=${VMSNAP_CEPH_POOL:-vmsnap}

ceph() { timeout 60 env ceph -c "$conf" "$@"; }

print_env() {
  echo "CEPH_CONF=$conf"
  echo "VMSNAP_CEPH_CONF=$conf"
  echo "VMSNAP_CEPH_POOL=$pool"
}

# The pids of the daemons that run with our ceph.conf: from their pid
# files, and any other process whose command line names this ceph.conf
# (a daemon that died before writing its pid file is not left behind).
our_pids() {
  local f p
  for f in "$dir"/run/*.pid; do
    p=$(cat "$f" 2>/dev/null) || continue
    if [ -n "$p" ] && [ -d "/proc/$p" ]; then echo "$p"; fi
  done
  for p in /proc/[0-9]*; do
    if { tr '\0' '\n' < "$p/cmdline"; } 2>/dev/null | grep -qxF "$conf"; then
      echo "${p#/proc/}"
    fi
  done
}

alive() {  # the pids given that still run
  local p
  for p in "$@"; do
    if [ -d "/proc/$p" ]; then echo "$p"; fi
  done
}

kill_daemons() {
  local pids i
  pids=$(our_pids | sort -u)
  if [ -n "$pids" ]; then
    # shellcheck disable=SC2086
    kill -TERM $pids 2>/dev/null || true
    for i in $(seq 50); do
      # shellcheck disable=SC2086
      pids=$(alive $pids)
      [ -n "$pids" ] || break
      sleep 0.2
    done
    # shellcheck disable=SC2086
    [ -z "$pids" ] || kill -KILL $pids 2>/dev/null || true
  fi
}

stop() {
  # remove only what start made (VMSNAP_CEPH_DIR may name something else)
  if [ -d "$dir" ] && [ -n "$(ls -A "$dir")" ] &&
       ! grep -qs '^# Made by scripts/ceph-cluster.sh' "$conf"; then
    die "ceph: $dir is not a cluster of ceph-cluster.sh; not touching it"
  fi
  kill_daemons
  rm -rf "$dir"
}

# A start that fails leaves no daemon running, but its logs for a look.
start_failed() {
  [ -f "$dir/.ready" ] && return
  kill_daemons
  echo "ceph: start failed; logs in $dir/log (\"$0 stop\" removes them)" >&2
}

running() {
  [ -f "$conf" ] && [ -f "$dir/.ready" ] || return 1
  local d
  for d in mon.a mgr.x osd.0; do
    [ -f "$dir/run/$d.pid" ] && [ -d "/proc/$(cat "$dir/run/$d.pid")" ] ||
      return 1
  done
  ceph -s > /dev/null 2>&1
}

# A command whose output goes to the log, shown if it fails.
run() {
  "$@" >> "$dir/log/start.log" 2>&1 ||
    die "ceph: $* failed:
$(tail -n 15 "$dir/log/start.log")"
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_for() {  # SECONDS WHAT COMMAND...
  local secs=$1 what=$2 t0=$SECONDS
  shift 2
  until "$@" > /dev/null 2>&1; do
    [ $((SECONDS - t0)) -lt "$secs" ] ||
      die "ceph: no $what after $secs s; logs in $dir/log"
    sleep 0.5
  done
}

osd_up() { ceph osd dump 2>/dev/null | grep -q '^osd\.0 up  *in'; }
pgs_active() {
  local s
  s=$(ceph pg stat 2>/dev/null) || return 1
  echo "$s" | grep -q ' pgs: ' && ! echo "$s" | grep -qE 'unknown|creating|peering|activating|undersized|inactive'
}

start() {
  if running; then
    print_env
    return
  fi
  for c in ceph-mon ceph-mgr ceph-osd ceph monmaptool rbd uuidgen; do
    command -v "$c" > /dev/null ||
      die "no $c: install ceph-mon ceph-mgr ceph-osd ceph-common (scripts/setup-host.sh)"
  done
  # the daemons' admin sockets, $dir/run/mon.a.asok and so on, must fit
  # a unix socket path (107 bytes)
  [ ${#dir} -le 90 ] || die "ceph: $dir is too long for the daemons' sockets"
  stop
  trap start_failed EXIT
  mkdir -p "$dir"/{run,log,crash,mon.a,mgr.x,osd.0}
  local fsid port t0=$SECONDS
  fsid=$(uuidgen)
  port=$(free_port)
  cat > "$conf" <<EOF
# Made by scripts/ceph-cluster.sh: a throwaway one-node cluster.
[global]
fsid = $fsid
mon host = [v2:127.0.0.1:$port]
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind msgr1 = false
ms bind ipv6 = false
auth cluster required = none
auth service required = none
auth client required = none
auth allow insecure global id reclaim = false
run dir = $dir/run
admin socket = $dir/run/\$name.asok
pid file = $dir/run/\$name.pid
log file = $dir/log/\$name.log
crash dir = $dir/crash
keyring = $dir/keyring
mon data = $dir/\$name
mgr data = $dir/\$name
osd data = $dir/\$name
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
# The monitor shuts itself down when its file system is nearly full
# (5 % by default); this cluster's data is throwaway.
mon data avail warn = 2
mon data avail crit = 1
[osd]
osd objectstore = bluestore
bluestore block create = true
bluestore block size = 10737418240
osd memory target = 939524096
osd op num shards = 1
osd op num threads per shard = 2
EOF
  : > "$dir/keyring"

  monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:$port]" \
    "$dir/monmap" > /dev/null
  run ceph-mon -c "$conf" -i a --mkfs --monmap "$dir/monmap"
  run ceph-mon -c "$conf" -i a
  wait_for 30 monitor ceph mon stat
  run ceph-mgr -c "$conf" -i x
  local uuid
  uuid=$(uuidgen)
  [ "$(ceph osd new "$uuid")" = 0 ] || die "ceph: osd new did not give osd.0"
  run ceph-osd -c "$conf" -i 0 --mkfs --osd-uuid "$uuid"
  run ceph-osd -c "$conf" -i 0
  wait_for 60 "OSD up" osd_up
  run ceph osd pool create "$pool" 8 8
  run ceph osd pool set "$pool" size 1 --yes-i-really-mean-it
  wait_for 60 "active PGs" pgs_active
  run timeout 60 rbd -c "$conf" pool init "$pool"
  touch "$dir/.ready"
  note "ceph: one-node cluster up in $((SECONDS - t0)) s under $dir"
  print_env
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  env) running || die "ceph: no cluster running under $dir"; print_env ;;
  *) echo "usage: $0 start|stop|env" >&2; exit 2 ;;
esac
