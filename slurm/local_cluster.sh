#!/usr/bin/env bash
# A real three-node SLURM on this machine, for tests and for trying tools/submit.py before a cluster.
#
#   slurm/local_cluster.sh          install (apt) if needed, configure, start; wait until
#                                   `srun -n2 hostname` and `srun -N3 -n3 hostname` work
#   slurm/local_cluster.sh --stop   stop the daemons this script started
#
# Idempotent: when the cluster already answers it returns at once; a changed slurm.conf restarts
# the daemons. The daemons are started directly (no systemd: CI containers have none) and found
# again through their pid files.
#
# Three nodes, n1, n2 and n3, all on this host (three, so that a two-node job can hold a spare):
# Debian's slurm-wlm is built with MULTIPLE_SLURMD, so one slurmd per node runs here (`slurmd -N n1`
# ... `slurmd -N n3`), each on its own port with its own spool dir, pid and log (%n in the paths). Each node has CPUs=$(nproc), so a one-node job
# of two tasks still fits one node, and a two-node job (`--nodes 2 --gpus-per-node 1`) tests the
# multi-node paths: n1-n3 are not resolvable host names (NodeAddr=127.0.0.1 is what the job
# script's MASTER_ADDR uses), like clusters whose node names are not DNS names.
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
    exec sudo -E "$0" "$@"  # apt, /etc and the daemons need root
fi

HOST=$(hostname)
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
LOG_DIR=/var/log/slurm
CTLD_PID=/run/slurmctld.pid
NODES="n1 n2 n3"
SLURMD_PID=/run/slurmd-%n.pid  # %n: the node name (slurmd -N NAME)
OLD_SLURMD_PID=/run/slurmd.pid  # the single slurmd of an earlier one-node version of this script
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
pidfile() { echo "${SLURMD_PID//%n/$1}"; }
slurmds_running() { local n; for n in $NODES; do running "$(pidfile "$n")" || return 1; done; }
stop_slurmds() { local n; for n in $NODES; do stop "$(pidfile "$n")"; done; stop "$OLD_SLURMD_PID"; }
works() { timeout 20 srun -n2 hostname >/dev/null 2>&1 && timeout 20 srun -N3 -n3 hostname >/dev/null 2>&1; }

if [ "${1:-}" = "--stop" ]; then
    stop_slurmds; stop "$CTLD_PID"; stop "$MUNGE_PID"
    say "stopped"
    exit 0
fi

# The configuration this script wants: this host is the controller and runs every node.
# (An unquoted heredoc: no backticks or command substitutions in its comments.)
new_conf=$(cat <<EOF
# Written by gaperon-recipes slurm/local_cluster.sh: a three-node test cluster on one host.
ClusterName=gaperon-local
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job may start again only after the credential lifetime (default 120 s): keep tests fast.
AuthInfo=cred_expire=10
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd-%n.log
SchedulerType=sched/backfill
# A requeued job is held until the credential lifetime has passed (its BeginTime), and then only a
# scheduling pass starts it (every 30 s for backfill, 60 s for the main loop by default): every
# second here, so a restart follows about 11 s after the requeue.
SchedulerParameters=bf_interval=1,sched_interval=1
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
# Every node is this host (NodeHostname), reached at 127.0.0.1 (NodeAddr), one slurmd port each.
NodeName=n[1-3] NodeHostname=$HOST NodeAddr=127.0.0.1 Port=6921-6923 CPUs=$(nproc) State=UNKNOWN
PartitionName=debug Nodes=n[1-3] Default=YES MaxTime=7-00:00:00 State=UP
EOF
)

if [ -f "$CONF" ] && [ "$(cat "$CONF")" = "$new_conf" ] && running "$CTLD_PID" && slurmds_running && works; then
    say "already up (n1-n3 on $HOST): srun -n2 and srun -N3 -n3 work"
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
mkdir -p "$CONF_DIR" "$LOG_DIR" /var/spool/slurmctld
for n in $NODES; do mkdir -p "/var/spool/slurmd/$n"; done
if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$new_conf" ]; then
    say "writing $CONF"
    printf '%s\n' "$new_conf" > "$CONF"
    stop_slurmds; stop "$CTLD_PID"  # pick the new configuration up
fi
stop "$OLD_SLURMD_PID"  # a one-node slurmd left by an earlier version would hold no node now

# 4. Daemons (they fork into the background and write their pid files).
running "$CTLD_PID" || slurmctld
for n in $NODES; do
    running "$(pidfile "$n")" || slurmd -N "$n"
done

# 5. Ready when a two-task step runs on one node and a three-task step on all three. A restarted node may come back DOWN
#    (or drained, e.g. by a test that excluded it): resume it.
for _ in $(seq "$WAIT_S"); do
    if scontrol ping >/dev/null 2>&1; then
        ready=1
        for n in $NODES; do
            state=$(sinfo -h -n "$n" -o %T 2>/dev/null || true)
            case "$state" in
                down*|drain*|fail*) scontrol update NodeName="$n" State=RESUME >/dev/null 2>&1 || true; ready=0 ;;
                idle*|mix*|alloc*) ;;
                *) ready=0 ;;
            esac
        done
        if [ "$ready" = 1 ] && works; then
            say "up in $(( $(date +%s) - t0 )) s: srun -n2 and srun -N3 -n3 hostname work (n1-n3 on $HOST)"
            exit 0
        fi
    fi
    sleep 1
done
say "not ready after ${WAIT_S} s; see $LOG_DIR/slurmctld.log and $LOG_DIR/slurmd-n1.log ... slurmd-n3.log"
sinfo -N -l 2>&1 || true
exit 1
