#!/usr/bin/env bash
# A real one-node SLURM on this machine, for tests and for trying tools/submit.py before a cluster.
#
#   slurm/local_cluster.sh          install (apt) if needed, configure, start; wait for `srun -n2 hostname`
#   slurm/local_cluster.sh --stop   stop the daemons this script started
#
# Idempotent: when the cluster already answers it returns at once; a changed slurm.conf restarts
# the daemons. The daemons are started directly (no systemd: CI containers have none) and found
# again through their pid files. The node is this host, `hostname`, with CPUs=$(nproc), so jobs
# asking for more tasks than cores stay pending rather than failing.
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
    exec sudo -E "$0" "$@"  # apt, /etc and the daemons need root
fi

HOST=$(hostname)
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
LOG_DIR=/var/log/slurm
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_PID=/run/munge/munged.pid
WAIT_S=${LOCAL_CLUSTER_WAIT_S:-120}
t0=$(date +%s)

say() { echo "local_cluster: $*"; }
running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
stop() {  # stop one daemon by its pid file, never by name
    if running "$1"; then
        local pid; pid=$(cat "$1")
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    fi
    rm -f "$1"
}
works() { timeout 20 srun -n2 hostname >/dev/null 2>&1; }

if [ "${1:-}" = "--stop" ]; then
    stop "$SLURMD_PID"; stop "$CTLD_PID"; stop "$MUNGE_PID"
    say "stopped"
    exit 0
fi

# The configuration this script wants: this host is the controller and the only node.
# (An unquoted heredoc: no backticks or command substitutions in its comments.)
new_conf=$(cat <<EOF
# Written by gaperon-recipes slurm/local_cluster.sh: a one-node test cluster.
ClusterName=gaperon-local
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job may start again only after the credential lifetime (default 120 s): keep tests fast.
AuthInfo=cred_expire=10
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# No accounting daemon, so no sacct: finished jobs stay visible to scontrol show job for an hour.
MinJobAge=3600
KillWait=30
InactiveLimit=0
NodeName=$HOST CPUs=$(nproc) State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=7-00:00:00 State=UP
EOF
)

if [ -f "$CONF" ] && [ "$(cat "$CONF")" = "$new_conf" ] && running "$CTLD_PID" && running "$SLURMD_PID" && works; then
    say "already up ($HOST): srun -n2 hostname works"
    exit 0
fi

# 1. Packages.
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    say "installing slurm-wlm munge (apt)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi

# 2. Munge: one key, readable by the munge user only; created once, never rotated here.
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
    say "creating /etc/munge/munge.key"
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
if ! running "$MUNGE_PID"; then
    runuser -u munge -- /usr/sbin/munged  # pid file: /run/munge/munged.pid
fi

# 3. slurm.conf.
mkdir -p "$CONF_DIR" "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd
if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$new_conf" ]; then
    say "writing $CONF"
    printf '%s\n' "$new_conf" > "$CONF"
    stop "$SLURMD_PID"; stop "$CTLD_PID"  # pick the new configuration up
fi

# 4. Daemons (they fork into the background and write their pid files).
running "$CTLD_PID" || slurmctld
running "$SLURMD_PID" || slurmd

# 5. Ready when a two-task step runs. A restarted node may come back DOWN: resume it.
for _ in $(seq "$WAIT_S"); do
    if scontrol ping >/dev/null 2>&1; then
        state=$(sinfo -h -n "$HOST" -o %T 2>/dev/null || true)
        case "$state" in
            down*|drain*) scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true ;;
            idle*|mix*|alloc*) works && { say "up in $(( $(date +%s) - t0 )) s: srun -n2 hostname works on $HOST"; exit 0; } ;;
        esac
    fi
    sleep 1
done
say "not ready after ${WAIT_S} s; see $LOG_DIR/slurmctld.log and $LOG_DIR/slurmd.log"
sinfo -N -l 2>&1 || true
exit 1
