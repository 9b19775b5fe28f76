#!/usr/bin/env bash
# Parses PowerShell scripts with the tree-sitter PowerShell grammar (PyPI: tree-sitter,
# tree-sitter-powershell) and fails on a parse error, an ERROR node or a MISSING node.
#
#   .ci/check-powershell.sh            checks every *.ps1 the binary ships, and proves the
#                                      checker still rejects the deliberately broken fixture
#   .ci/check-powershell.sh FILE...    checks exactly those files
#
# The grammar is installed into a throwaway venv under target/ (idempotent: reused when the
# pinned versions are already there). Set TOLLGATE_PS_VENV to put it elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."

TS_VERSION="0.26.1"
TS_PS_VERSION="0.26.4"
venv="${TOLLGATE_PS_VENV:-target/ci-tools/ps-grammar-venv}"
pkgs=("tree-sitter==${TS_VERSION}" "tree-sitter-powershell==${TS_PS_VERSION}")

# A venv when Python has the module; otherwise a plain `pip install --target` directory.
if [ -x "$venv/bin/python" ]; then
  py="$venv/bin/python"
else
  py=python3
  export PYTHONPATH="$venv/site${PYTHONPATH:+:$PYTHONPATH}"
fi

have_grammar() {
  "$py" - "$TS_VERSION" "$TS_PS_VERSION" <<'PY' >/dev/null 2>&1
import sys
from importlib.metadata import version
sys.exit(0 if (version("tree-sitter"), version("tree-sitter-powershell")) == (sys.argv[1], sys.argv[2]) else 1)
PY
}

if ! have_grammar; then
  echo "== installing ${pkgs[*]} into ${venv}"
  rm -rf "$venv"
  if python3 -m venv "$venv" >/dev/null 2>&1; then
    py="$venv/bin/python"
    "$py" -m pip install --quiet --disable-pip-version-check "${pkgs[@]}"
  else
    py=python3
    python3 -m pip install --quiet --disable-pip-version-check --target "$venv/site" "${pkgs[@]}"
  fi
  have_grammar || { echo "error: the PowerShell grammar did not install" >&2; exit 1; }
fi

check() {
  "$py" - "$@" <<'PY'
import sys
import tree_sitter_powershell
from tree_sitter import Language, Parser

parser = Parser(Language(tree_sitter_powershell.language()))
bad = 0
for path in sys.argv[1:]:
    try:
        source = open(path, "rb").read()
    except OSError as e:
        print(f"{path}: cannot read: {e}")
        bad += 1
        continue
    tree = parser.parse(source)
    problems = []
    stack = [tree.root_node]
    while stack:
        node = stack.pop()
        if node.is_error or node.is_missing:
            line, col = node.start_point
            kind = "MISSING " + node.type if node.is_missing else "ERROR"
            text = source[node.start_byte:node.end_byte].decode("utf-8", "replace")
            text = text.splitlines()[0][:80] if text else ""
            problems.append((line + 1, col + 1, kind, text))
            continue
        if node.has_error:
            stack.extend(reversed(node.children))
    if tree.root_node.has_error and not problems:
        problems.append((1, 1, "ERROR", "the parser reports an error it did not locate"))
    for line, col, kind, text in sorted(problems):
        print(f"{path}:{line}:{col}: {kind}: {text}")
    if problems:
        bad += 1
    else:
        print(f"{path}: ok")
sys.exit(1 if bad else 0)
PY
}

if [ "$#" -gt 0 ]; then
  check "$@"
  exit $?
fi

shipped=()
while IFS= read -r -d '' f; do shipped+=("$f"); done < <(find coordinator/src -name '*.ps1' -not -path '*/testdata/*' -print0 | sort -z)
echo "== powershell grammar: ${#shipped[@]} shipped script(s)"
check "${shipped[@]}"

fixture="coordinator/src/transport/pwsh/testdata/broken.ps1"
echo "== powershell grammar: the checker must reject ${fixture}"
if check "$fixture"; then
  echo "error: ${fixture} is deliberately broken, yet the checker accepted it" >&2
  exit 1
fi
echo "== powershell grammar: ok (the broken fixture was rejected)"
