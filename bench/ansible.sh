#!/usr/bin/env bash
# The Ansible side of the comparison: 5 hosts x 20 no-op tasks, as close as Ansible gets to what
# the pipeline bench runs (`sh true` per step per host).
#
#   bash bench/ansible.sh [--quick] [REPS]
#
# Installs ansible-core (pinned below) from PyPI into a throwaway virtualenv under
# ${CARGO_TARGET_DIR:-target}/bench-tools/ on first use, then runs the playbook REPS times
# (default 5): inventory of 5 hosts, all ansible_connection=local, forks 5, gather_facts off,
# 20 tasks `ansible.builtin.command: "true"`. Prints each wall time and the median; the line
# `RESULT ansible_ms=...` is for bench/run.sh. Exits non-zero if anything fails, with one
# exception: with --quick (bench/run.sh --quick, CI), if pip cannot reach the package index it
# prints `ansible: SKIPPED (...)` and exits 0.
set -euo pipefail

ANSIBLE_CORE_VERSION=2.19.14
QUICK=0
if [ "${1:-}" = --quick ]; then
    QUICK=1
    shift
fi
REPS=${1:-5}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
case $TARGET in /*) ;; *) TARGET=$ROOT/$TARGET ;; esac
VENV=$TARGET/bench-tools/ansible-$ANSIBLE_CORE_VERSION

if ! "$VENV/bin/ansible-playbook" --version 2>/dev/null | grep -q "core $ANSIBLE_CORE_VERSION"; then
    echo "ansible: installing ansible-core==$ANSIBLE_CORE_VERSION into $VENV" >&2
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    if ! "$VENV/bin/pip" install --quiet --disable-pip-version-check "ansible-core==$ANSIBLE_CORE_VERSION" > "$VENV.pip.log" 2>&1; then
        cat "$VENV.pip.log" >&2
        rm -rf "$VENV"
        # pip's own words when it never got an answer from the index (name resolution, refused,
        # no route, timeout, proxy); any other failure is a real one.
        unreachable=$( { grep -oE "Temporary failure in name resolution|Name or service not known|Connection refused|Network is unreachable|No route to host|timed out|ProxyError" "$VENV.pip.log" \
            || grep -oE "NewConnectionError|ConnectTimeoutError|ReadTimeoutError"  "$VENV.pip.log"; } | head -n 1 || true)
        if [ $QUICK = 1 ] && [ -n "$unreachable" ]; then
            echo "ansible: SKIPPED (could not install ansible-core from PyPI: $unreachable)"
            echo "RESULT ansible_skipped=could not install ansible-core from PyPI ($unreachable)"
            exit 0
        fi
        echo "ansible: pip install ansible-core==$ANSIBLE_CORE_VERSION failed" >&2
        exit 1
    fi
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/tollgate-bench-ansible.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

{
    echo "[web]"
    for i in 1 2 3 4 5; do echo "web$i ansible_connection=local"; done
    echo
    echo "[all:vars]"
    echo "ansible_python_interpreter=$VENV/bin/python"
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
    if ! "$VENV/bin/ansible-playbook" -i "$WORK/inventory.ini" "$WORK/playbook.yml" > "$WORK/run.log" 2>&1; then
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
