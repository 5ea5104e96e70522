#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, from Debian's packages (slurm-wlm, munge):
# slurmctld and slurmd here, every core of this machine in one partition, no accounting,
# a job-completion log. For the Slurm tests (.ci/run) and for trying `--launcher slurm`.
# Idempotent: does nothing where the node already answers. Needs root.
# Run: sudo bash scripts/slurm-one-node.sh   (then: sinfo; make test-slow)
set -euo pipefail

if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
    echo "Slurm: already up ($(sinfo -h -o '%D node(s), %c CPUs, %T'))"
    exit 0
fi
for tool in munged slurmctld slurmd; do
    command -v "$tool" >/dev/null || {
        echo "Slurm: $tool not found; apt-get install slurm-wlm munge"; exit 2; }
done
start=$(date +%s.%N)

# munge: every Slurm message is signed with this machine's key.
test -s /etc/munge/munge.key || mungekey -c
chown munge:munge /etc/munge/munge.key 2>/dev/null || true
mkdir -p /run/munge && chown munge:munge /run/munge 2>/dev/null || true
pgrep -x munged >/dev/null || munged --force

host=$(hostname -s)
# The node as slurmd sees it (CPUs, sockets, cores, memory), less the boot time line.
node=$(slurmd -C | head -1)
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
cat > /etc/slurm/slurm.conf <<EOF
ClusterName=mnist-study
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
# Without cgroups (none in a container): processes tracked by their parents, no binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# Slurm's own record of every job that ended (sacct needs a database; this needs none).
JobCompType=jobcomp/filetxt
JobCompLoc=/var/log/slurm/jobcomp.log
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
# A cancelled job's processes get SIGTERM, then SIGKILL this many seconds later.
KillWait=10
$node
PartitionName=main Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF

pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd
for _ in $(seq 1 60); do
    if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
        echo "Slurm: up in $(awk "BEGIN { printf \"%.1f\", $(date +%s.%N) - $start }") s" \
            "($(sinfo -h -o '%D node(s), %c CPUs, partition %P'))"
        exit 0
    fi
    sleep 0.5
done
echo "Slurm: the node did not come up in 30 s; see /var/log/slurm/slurmctld.log and slurmd.log"
exit 1
