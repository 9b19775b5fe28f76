#!/usr/bin/env bash
# Prepares the machine for the fault scenarios (tests/tests/faults_netns.rs): iproute2 (`ip`, `tc`)
# and the right to make network namespaces. The scenarios themselves run in `cargo test
# --workspace`; they fail loudly when namespaces cannot be made, so this script checks first and
# says why, instead of leaving it to a test's panic message.
set -euo pipefail

if ! command -v ip >/dev/null 2>&1 || ! command -v tc >/dev/null 2>&1; then
  echo "== faults: installing iproute2"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq iproute2
fi

if [ "${TOLLGATE_SKIP_NETNS:-}" = 1 ]; then
  echo "== faults: TOLLGATE_SKIP_NETNS=1: the namespace scenarios will be skipped"
  exit 0
fi

probe="tgfci$$"
if ! ip netns add "$probe" 2>/tmp/faults-netns.err; then
  echo "== faults: cannot create network namespaces: $(cat /tmp/faults-netns.err)" >&2
  echo "   The fault scenarios need root (CAP_SYS_ADMIN, CAP_NET_ADMIN). Run CI as root, or set" >&2
  echo "   TOLLGATE_SKIP_NETNS=1 to skip them explicitly." >&2
  exit 1
fi
if ip netns exec "$probe" tc qdisc add dev lo root netem delay 1ms 2>/dev/null; then
  echo "== faults: network namespaces OK; delays use tc netem"
else
  echo "== faults: network namespaces OK; this kernel has no sch_netem: delays use the userspace relay"
fi
ip netns delete "$probe"
