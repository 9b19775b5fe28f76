#!/usr/bin/env bash
# The Ansible side of the comparison: 5 hosts x 20 no-op tasks, as close as Ansible gets to what
# the pipeline bench runs (`sh true` per step per host).
#
#   bash bench/ansible.sh [--quick] [REPS]
#
# Uses the machine's ansible-core (Debian's `ansible-core` package; installed with apt-get when
# missing and this runs as root), then runs the playbook REPS times
# (default 5): inventory of 5 hosts, all ansible_connection=local, forks 5, gather_facts off,
# 20 tasks `ansible.builtin.command: "true"`. Prints each wall time and the median; the line
# `RESULT ansible_ms=...` is for bench/run.sh. Exits non-zero if anything fails, with one
# exception: with --quick (bench/run.sh --quick, CI), if ansible-core cannot be installed it
# prints `ansible: SKIPPED (...)` and exits 0.
set -euo pipefail

QUICK=0
if [ "${1:-}" = --quick ]; then
    QUICK=1
    shift
fi
REPS=${1:-5}

if ! command -v ansible-playbook >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "ansible: installing Debian's ansible-core" >&2
        export DEBIAN_FRONTEND=noninteractive
        { apt-get install -y -qq ansible-core || { apt-get update -qq && apt-get install -y -qq ansible-core; }; } >&2 || true
    fi
fi
if ! command -v ansible-playbook >/dev/null 2>&1; then
    if [ $QUICK = 1 ]; then
        echo "ansible: SKIPPED (ansible-playbook is not installed and could not be)"
        echo "RESULT ansible_skipped=ansible-core is not installed"
        exit 0
    fi
    echo "ansible: ansible-playbook not found; install ansible-core (apt-get install ansible-core)" >&2
    exit 1
fi
ANSIBLE_CORE_VERSION=$(ansible-playbook --version | sed -n 's/.*core \([0-9.]*\).*/\1/p' | head -n 1)
PYTHON=/usr/bin/python3
[ -x "$PYTHON" ] || PYTHON=$(command -v python3)

WORK=$(mktemp -d "${TMPDIR:-/tmp}/tollgate-bench-ansible.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

{
    echo "[web]"
    for i in 1 2 3 4 5; do echo "web$i ansible_connection=local"; done
    echo
    echo "[all:vars]"
    echo "ansible_python_interpreter=$PYTHON"
} > "$WORK/inventory.ini"

{
    echo "- hosts: web"
    echo "  gather_facts: false"
    echo "  tasks:"
    for i in $(seq 1 20); do
        echo "    - name: noop $i"
        echo "      ansible.builtin.command: \"true\""
    done
} > "$WORK/playbook.yml"

cat > "$WORK/ansible.cfg" <<CFG
[defaults]
forks = 5
host_key_checking = False
retry_files_enabled = False
local_tmp = $WORK/tmp
remote_tmp = $WORK/tmp
CFG

export ANSIBLE_CONFIG=$WORK/ansible.cfg ANSIBLE_NOCOLOR=1 ANSIBLE_HOME=$WORK/home
times=()
for ((r = 1; r <= REPS; r++)); do
    start=$(date +%s%N)
    if ! ansible-playbook -i "$WORK/inventory.ini" "$WORK/playbook.yml" > "$WORK/run.log" 2>&1; then
        cat "$WORK/run.log" >&2
        echo "ansible: run $r failed" >&2
        exit 1
    fi
    end=$(date +%s%N)
    ms=$(( (end - start) / 1000000 ))
    [ "$(grep -cE "^web[1-5] +: ok=20 +changed=20 +unreachable=0 +failed=0" "$WORK/run.log")" = 5 ] || { cat "$WORK/run.log" >&2; echo "ansible: unexpected recap" >&2; exit 1; }
    times+=("$ms")
    echo "ansible: run $r: $ms ms" >&2
done
median=$(printf '%s\n' "${times[@]}" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
echo "ansible: ansible-core $ANSIBLE_CORE_VERSION, 5 hosts x 20 tasks, forks 5, $REPS runs, median $median ms"
echo "RESULT ansible_version=$ANSIBLE_CORE_VERSION"
echo "RESULT ansible_reps=$REPS"
echo "RESULT ansible_ms=$median"
