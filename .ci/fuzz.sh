#!/usr/bin/env bash
# Bounded fuzzing of every decoder: each cargo-fuzz target runs for FUZZ_SECONDS (default 30).
# Exits non-zero if a target crashes (libFuzzer writes the input to fuzz/artifacts/TARGET/).
# Needs cargo-fuzz (`cargo install cargo-fuzz`); RUSTC_BOOTSTRAP=1 lets a stable toolchain take
# the sanitizer flags it passes. Without cargo-fuzz it says so and exits 0 unless FUZZ_REQUIRED=1.
# Prints, per target, how long it ran and how many executions it made.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

seconds="${FUZZ_SECONDS:-30}"
targets="${FUZZ_TARGETS:-frame_decoder token_parser journal_line pwsh_contract}"
export PATH="$HOME/.cargo/bin:$PATH"

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== fuzz: cargo-fuzz is not installed; run: cargo install cargo-fuzz"
  [ "${FUZZ_REQUIRED:-0}" = 1 ] && exit 1
  exit 0
fi

export RUSTC_BOOTSTRAP=1
echo "== fuzz: building targets"
cargo fuzz build

summary=()
for t in $targets; do
  echo "== fuzz: $t for ${seconds}s"
  mkdir -p "corpus/$t"
  log="$(mktemp)"
  start=$(date +%s)
  # -max_total_time bounds the run; a crash ends it early with a non-zero status.
  if ! cargo fuzz run "$t" "corpus/$t" -- -max_total_time="$seconds" -print_final_stats=1 \
      >"$log" 2>&1; then
    tail -n 60 "$log"
    echo "== fuzz: $t FAILED (see fuzz/artifacts/$t/)"
    exit 1
  fi
  end=$(date +%s)
  execs=$(grep -E '^stat::number_of_executed_units' "$log" | awk '{print $2}' | tail -n 1)
  summary+=("$t: $((end - start)) s, ${execs:-?} executions, no crash")
  rm -f "$log"
done
echo "== fuzz summary"
printf '  %s\n' "${summary[@]}"

# FUZZ_README=1: also record the summary in tests/README.md (between the fuzz markers).
if [ "${FUZZ_README:-0}" = 1 ]; then
  readme=../tests/README.md
  table="$(mktemp)"
  {
    echo "Last bounded run (\`FUZZ_README=1 .ci/fuzz.sh\`, $(date -u +%Y-%m-%d), $(nproc) cores):"
    echo
    echo "| target | ran | executions | result |"
    echo "|---|---|---|---|"
    for line in "${summary[@]}"; do
      IFS=',' read -r head execs result <<<"$line"
      execs="${execs# }"
      echo "| \`${head%%:*}\` | ${head#*: } | ${execs% executions} | ${result# } |"
    done
  } > "$table"
  awk -v table="$table" '
    /<!-- fuzz:begin -->/ { print; while ((getline line < table) > 0) print line; skip = 1; next }
    /<!-- fuzz:end -->/ { skip = 0 }
    !skip { print }
  ' "$readme" > "$table.readme" && cp "$table.readme" "$readme"
  rm -f "$table" "$table.readme"
  echo "== fuzz: summary written to tests/README.md"
fi
