#!/usr/bin/env bash
# Tollgate benchmarks (SPEC §9), side by side with Ansible. Asserts nothing about timings.
#
#   bash bench/run.sh           # full: 5 repetitions each, fan-out over 1,000 simulated agents;
#                               # rewrites docs/performance.md
#   bash bench/run.sh --quick   # everything once, fan-out over 100 agents: proves the benches
#                               # still run (CI); prints the table, leaves docs/ alone. If ansible-core
#                               # cannot be installed, Ansible is SKIPPED (n/a), not a failure
#
# Builds the release binaries (`cargo build --release --bins`), then runs:
#   pipeline         5 hosts (then 1 host) x 20 no-op steps, full pipeline, with the bare
#                    process work as a baseline (tests/benches/pipeline.rs)
#   ansible          the same 5 x 20 in the machine's ansible-core (Debian package; bench/ansible.sh)
#   fanout           probe fan-out over N simulated agents (tests/benches/fanout.rs)
#   agent_footprint  stripped agent binary size and idle RSS (tests/benches/agent_footprint.rs)
#   pwsh_ssh         per-step cost over a real PSSession on a real sshd, beside a bare Invoke-Command
#                    on an open session and one Invoke-Command -HostName per step (needs pwsh, sshd)
# Honours CARGO_TARGET_DIR. The table is always written to $TARGET/bench-results/performance.md.
# Exits non-zero if any piece failed to run (the others still run).
#   scale            (full mode) the fan-out again at FANOUT_SCALE host counts, to find where the
#                    coordinator stops scaling; a count that fails is a finding, not a bench failure
# Knobs: BENCH_REPS, ANSIBLE_REPS, FANOUT_HOSTS, FANOUT_SCALE (default "2000 5000" in full mode,
# empty in --quick), FANOUT_COORDINATOR_EXTRA.
set -uo pipefail

QUICK=0
for arg in "$@"; do
    case $arg in
        --quick) QUICK=1 ;;
        -h | --help) sed -n '2,19p' "$0"; exit 0 ;;
        *) echo "bench/run.sh: unknown argument $arg (try --help)" >&2; exit 2 ;;
    esac
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
case $TARGET in /*) ;; *) TARGET=$ROOT/$TARGET ;; esac
OUT=$TARGET/bench-results
mkdir -p "$OUT"
if [ $QUICK = 1 ]; then
    : "${BENCH_REPS:=1}" "${ANSIBLE_REPS:=1}" "${FANOUT_HOSTS:=100}" "${FANOUT_SCALE=}"
else
    : "${BENCH_REPS:=5}" "${ANSIBLE_REPS:=5}" "${FANOUT_HOSTS:=1000}" "${FANOUT_SCALE=2000 5000}"
fi
export BENCH_REPS FANOUT_HOSTS
export FANOUT_COORDINATOR_EXTRA=${FANOUT_COORDINATOR_EXTRA:-}

started=$(date +%s)
load=$(cut -d" " -f1-3 /proc/loadavg)
failed=()
echo "== building release binaries" >&2
if ! cargo build --release --bins; then
    echo "bench/run.sh: the release build failed" >&2
    exit 1
fi

# run NAME COMMAND...: runs one piece, keeps its output in $OUT/NAME.log.
run() {
    local name=$1
    shift
    echo "== $name" >&2
    if "$@" 2>&1 | tee "$OUT/$name.log"; then
        :
    else
        failed+=("$name")
        echo "bench/run.sh: $name FAILED (log: $OUT/$name.log)" >&2
    fi
}
run pipeline cargo bench -p tollgate-tests --bench pipeline
if [ $QUICK = 1 ]; then
    run ansible bash bench/ansible.sh --quick "$ANSIBLE_REPS"
else
    run ansible bash bench/ansible.sh "$ANSIBLE_REPS"
fi
run fanout cargo bench -p tollgate-tests --bench fanout
for n in $FANOUT_SCALE; do
    # Keys renamed (fanout_* -> scale_N_*) so they do not mix with the main fan-out's.
    echo "== scale: fan-out over $n simulated agents" >&2
    FANOUT_HOSTS=$n cargo bench -p tollgate-tests --bench fanout 2>&1 \
        | sed "s/^RESULT fanout_/RESULT scale_${n}_/" | tee "$OUT/scale_$n.log" || true
done
run agent_footprint cargo bench -p tollgate-tests --bench agent_footprint
run pwsh_ssh cargo bench -p tollgate-tests --bench pwsh_ssh

# get KEY: the value of `RESULT KEY=VALUE` from any log, or "n/a".
get() {
    local v
    v=$(cat "$OUT"/*.log 2>/dev/null | sed -n "s/^RESULT $1=//p" | tail -n 1)
    echo "${v:-n/a}"
}
ratio() { # ratio A B: A / B with one decimal, or n/a
    awk -v a="$1" -v b="$2" 'BEGIN { if (a+0 > 0 && b+0 > 0) printf "%.0fx", a / b; else print "n/a" }'
}
verdict() { # verdict VALUE OP LIMIT: "met" / "missed" / "n/a"
    awk -v v="$1" -v op="$2" -v l="$3" 'BEGIN {
        if (v == "n/a" || v == "") { print "n/a"; exit }
        ok = (op == "<") ? (v + 0 < l + 0) : (v + 0 >= l + 0)
        print ok ? "met" : "missed" }'
}

deploy=$(get pipeline_deploy_ms)
teardown=$(get pipeline_teardown_ms)
ansible=$(get ansible_ms)
r_deploy=$(ratio "$ansible" "$deploy")
r_teardown=$(ratio "$ansible" "$teardown")
ansible_cell="$ansible ms"
[ "$ansible" = n/a ] && ansible_cell="n/a"
[ "$(get ansible_skipped)" != n/a ] && ansible_cell="n/a (SKIPPED: $(get ansible_skipped))"
agent_mb=$(get agent_binary_mb)
agent_rss=$(get agent_idle_rss_mb)
mem=$(free -g | awk '/^Mem:/ { print $2 }')
cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo 2>/dev/null | head -n 1)
cmd="bash bench/run.sh"
[ $QUICK = 1 ] && cmd="bash bench/run.sh --quick"
elapsed=$(($(date +%s) - started))

{
    echo "# Performance"
    echo
    echo "Measured by \`$cmd\` (regenerate with \`bash bench/run.sh\`; \`--quick\` only checks the"
    echo "benches still run). Benchmarks never assert timings; the targets are SPEC §9."
    echo
    echo "- date: $(date -u +%Y-%m-%d) ($(date -u +%H:%M) UTC), commit $(git rev-parse --short HEAD 2>/dev/null || echo n/a)"
    echo "- machine: $(nproc) cores${cpu:+ ($cpu)}, ${mem} GB memory (\`free -g\`), $(uname -sr); load average at start $load (the machine may be shared: figures are noisy)"
    echo "- repetitions: pipeline $BENCH_REPS (each followed by its baseline), Ansible $ANSIBLE_REPS (medians); fan-out two deploys back to back over $(get fanout_hosts) simulated agents"
    echo "- Ansible: ansible-core $(get ansible_version), \`connection: local\`, forks 5, 5 hosts, 20 tasks \`ansible.builtin.command: \"true\"\`, gather_facts off"
    echo
    echo "| figure | measured | SPEC §9 target | |"
    echo "|---|---|---|---|"
    for a in deploy teardown; do
        if [ $a = deploy ]; then what="quick deploy (probe, plan, journal fsync)"; else what="full teardown execute (token, 2 barriers with re-probes, journal fsync)"; fi
        over=$(get pipeline_${a}_overhead_ms_per_step_host)
        echo "| 5 hosts x 20 no-op steps, $what: end to end incl. step work, median | $(get pipeline_${a}_ms) ms ($(get pipeline_${a}_per_step_ms) ms per step per host) | | |"
        echo "| ... baseline: the same process executions without Tollgate ($(get pipeline_${a}_execs_per_host) per host, hosts at once) and one CLI start, median | $(get pipeline_baseline_${a}_ms) ms | | |"
        echo "| ... orchestration overhead (end to end minus baseline), per step per host | $over ms (per step round, 5 hosts at once: $(get pipeline_${a}_overhead_ms_per_step_round) ms; in all: $(get pipeline_${a}_overhead_ms) ms) | < 2 ms per step per host | $(verdict "$over" "<" 2) |"
    done
    for a in deploy teardown; do
        if [ $a = deploy ]; then what="quick deploy"; else what="full teardown execute"; fi
        over=$(get pipeline_1host_${a}_overhead_ms_per_step)
        echo "| 1 host x 20 no-op steps, $what: end to end; baseline ($(get pipeline_1host_${a}_execs) executions); orchestration overhead per step | $(get pipeline_1host_${a}_ms) ms; $(get pipeline_1host_baseline_${a}_ms) ms; $over ms | < 2 ms per step per host | $(verdict "$over" "<" 2) |"
    done
    echo "| same 5 x 20 in Ansible, median | $ansible_cell | | |"
    echo "| Ansible / Tollgate end to end, teardown execute (barriers and re-probe on) | $r_teardown | >= 50x (aim 100x) | $(verdict "${r_teardown%x}" ">=" 50) |"
    echo "| Ansible / Tollgate end to end, quick deploy | $r_deploy | >= 50x (aim 100x) | $(verdict "${r_deploy%x}" ">=" 50) |"
    for t in cold warm; do
        if [ $t = cold ]; then what="first deploy (cold: a QUIC + mTLS handshake per agent)"; else what="second deploy (warm: links kept from the first)"; fi
        echo "| probe fan-out over $(get fanout_hosts) simulated agents, $what: outcome | $(get fanout_${t}_outcome), $(get fanout_${t}_reported) probes ok, failed: $(get fanout_${t}_probe_failures), in $(get fanout_${t}_deploy_s) s | every host probed | $( [ "$(get fanout_${t}_outcome)" = Completed ] && echo met || echo missed ) |"
        echo "| ... p50 per host probe (until journaled; on the wire) | $(get fanout_${t}_p50_ms) ms; $(get fanout_${t}_wire_p50_ms) ms | | |"
        echo "| ... p99 per host probe (until journaled; on the wire) | $(get fanout_${t}_p99_ms) ms; $(get fanout_${t}_wire_p99_ms) ms | < 1 s | $(verdict "$(get fanout_${t}_p99_ms)" "<" 1000) |"
        echo "| ... coordinator peak RSS (VmHWM) | $(get fanout_${t}_rss_peak_mb) MB | < 100 MB | $(verdict "$(get fanout_${t}_rss_peak_mb)" "<" 100) |"
    done
    if [ "$(get pwsh_ssh_skipped)" != n/a ]; then
        echo "| PowerShell over SSH, per step | n/a (SKIPPED: $(get pwsh_ssh_skipped)) | | |"
    else
        echo "| PowerShell over SSH ($(get pwsh_ssh_steps) no-op steps on one real PSSession): Tollgate per step, median | $(get pwsh_ssh_tollgate_ms) ms (session opened in $(get pwsh_ssh_open_ms) ms) | | |"
        echo "| ... floor: bare \`Invoke-Command -Session\` on an open PSSession, median; Tollgate / floor | $(get pwsh_ssh_floor_ms) ms; $(get pwsh_ssh_tollgate_over_floor)x (overhead $(get pwsh_ssh_overhead_ms) ms per step) | | |"
        echo "| ... one \`Invoke-Command -HostName\` per step, median; per-step connection / Tollgate | $(get pwsh_ssh_per_connection_ms) ms; $(get pwsh_ssh_per_connection_over_tollgate)x | | |"
    fi
    echo "| agent stripped binary | $agent_mb MB | < 15 MB | $(verdict "$agent_mb" "<" 15) |"
    echo "| agent idle RSS | $agent_rss MB | < 15 MB | $(verdict "$agent_rss" "<" 15) |"
    if [ -n "${FANOUT_SCALE// /}" ]; then
        echo
        echo "Where the coordinator stops scaling (same fan-out, more simulated agents; the simulator shares the machine's cores with the coordinator):"
        echo
        echo "| agents | first deploy (cold): outcome, failed probes, in | cold p50 / p99 | second deploy (warm): outcome, in | warm p50 / p99 | coordinator CPU cold / warm | coordinator peak RSS |"
        echo "|---|---|---|---|---|---|---|"
        for n in $(get fanout_hosts) $FANOUT_SCALE; do
            if [ "$n" = "$(get fanout_hosts)" ]; then p=fanout; else p=scale_${n}; fi
            echo "| $n | $(get ${p}_cold_outcome), failed: $(get ${p}_cold_probe_failures), $(get ${p}_cold_deploy_s) s | $(get ${p}_cold_p50_ms) / $(get ${p}_cold_p99_ms) ms | $(get ${p}_warm_outcome), $(get ${p}_warm_deploy_s) s | $(get ${p}_warm_p50_ms) / $(get ${p}_warm_p99_ms) ms | $(get ${p}_cold_serve_cpu_ms) / $(get ${p}_warm_serve_cpu_ms) ms | $(get ${p}_warm_rss_peak_mb) MB |"
        done
    fi
    echo
    echo "Per step per host divides the overhead by hosts x steps; the 5 hosts run each step at the same time, so a round of steps takes the \"per step round\" figure of wall time. The 1-host rows involve no such division."
    echo
    echo "Coordinator RSS before the fan-out: $(get fanout_rss_idle_mb) MB. UDP datagrams dropped for a full socket receive buffer (\`RcvbufErrors\`, whole network namespace) during the cold / warm deploy: $(get fanout_cold_udp_drops) / $(get fanout_warm_udp_drops)."
    echo
    echo "How each figure is measured:"
    echo
    echo "- Pipeline: \`cargo bench -p tollgate-tests --bench pipeline\`: real \`tollgate-agent\` processes on 127.0.0.x (5 hosts, then 1 host in a second lab), a real \`tollgate serve\`, mutual TLS over QUIC, every timeline event fsynced. *End to end* is the wall time of one \`tollgate deploy\` / \`tollgate execute\` CLI invocation: it includes starting the CLI process and the work the agents do, since each step (the script \`true\`) and each probe (a script that prints the host's facts) is a process the agent starts, about 2 ms each on this machine. *Baseline* is that work without Tollgate, timed right after each end-to-end run so both see the same machine load: one \`tollgate --version\` process, then one worker per host, all at once (as the agents run at once), each starting one after another as many processes as that host's agent ran in the run (counted in its \`timeline.jsonl\`: \`probe_reported\` + \`check_reported\` + \`step_reported\`), the way \`agent/src/exec.rs\` starts a script (script file, \`sh FILE\` in its own process group, stdout and stderr piped and read to the end, wait). *Orchestration overhead* is the median over the repetitions of (end to end - baseline): the CLI's connection, the coordinator, QUIC + mTLS, the fsynced journal, the agents' idempotency store. Per step per host divides it by hosts x steps (5 x 20); per step round divides it by steps (20)."
    echo "- Ansible: \`bench/ansible.sh\`, wall time of one \`ansible-playbook\` run."
    echo "- Fan-out: \`cargo bench -p tollgate-tests --bench fanout\`: \`tollgate-sim-agents\` serves N agents in one process (own certificate \`spiffe://test/agent/simNNNN\` and own QUIC endpoint on 127.0.0.1 each; canned probe and execute answers), a real \`tollgate serve\` has them all in its inventory; quick \`tollgate deploy\` with one no-op step per host. Latency per host = \`probe_reported\` (that host) minus \`probe_requested\` \`at_ms\` in \`timeline.jsonl\`, i.e. until the answer is journaled and fsynced; \"on the wire\" is when the simulator wrote the answer. RSS is \`VmHWM\` of the serve process after the deploy. Two deploys run back to back: the first dials every agent (at most 64 handshakes at once, each with a 5 s connect timeout that starts when it gets its slot), the second reuses the links. Coordinator CPU is user + system time of the serve process during the deploy (\`/proc/PID/stat\`)."
    echo "- PowerShell over SSH: \`cargo bench -p tollgate-tests --bench pwsh_ssh\`: one real \`sshd\` on 127.0.0.60 whose \`powershell\` subsystem is the real \`pwsh -sshs\`; *Tollgate* is \`PwshSession::execute\` of \`Write-Output x\` through the supervised session host (contract round trip, idempotency marker written and finished on the target, output streamed), after a first step that opened the session; *floor* is \`Invoke-Command -Session \$s { Write-Output x }\` timed inside one pwsh on an already-open PSSession to the same target; *per step connection* is \`Invoke-Command -HostName ...\` per step (ssh connection, authentication and a remote pwsh each time)."
    echo "- Agent: \`cargo bench -p tollgate-tests --bench agent_footprint\`: \`strip\` on a copy of \`target/release/tollgate-agent\`; \`VmRSS\` of an agent started with a config, after its \"listening\" line and 1 s idle."
} > "$OUT/performance.md"

echo
cat "$OUT/performance.md"
if [ $QUICK = 0 ] && [ ${#failed[@]} = 0 ]; then
    cp "$OUT/performance.md" docs/performance.md
    echo >&2
    echo "bench/run.sh: wrote docs/performance.md" >&2
fi
echo "bench/run.sh: finished in ${elapsed}s" >&2
if [ ${#failed[@]} != 0 ]; then
    echo "bench/run.sh: FAILED: ${failed[*]}" >&2
    exit 1
fi
