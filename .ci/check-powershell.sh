#!/usr/bin/env bash
# Parses PowerShell scripts with PowerShell's own parser
# ([System.Management.Automation.Language.Parser]::ParseFile) and fails on any parse error,
# naming file, line, column and the parser's error id.
#
#   .ci/check-powershell.sh            checks every *.ps1/*.psm1/*.psd1 the project ships, and
#                                      proves the checker still rejects the broken fixture
#   .ci/check-powershell.sh FILE...    checks exactly those files
#
# Needs `pwsh` on PATH (.ci/run installs it; see README "Install").
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v pwsh >/dev/null 2>&1; then
  echo "error: pwsh is not on PATH; install PowerShell 7 (dotnet tool install --global PowerShell --version 7.6.9)" >&2
  exit 1
fi

check() {
  # The file list goes in through the environment, one path a line: no quoting games.
  TOLLGATE_PS_FILES="$(printf '%s\n' "$@")" pwsh -NoProfile -NonInteractive -Command '
    $bad = 0
    foreach ($path in ($env:TOLLGATE_PS_FILES -split "`n" | Where-Object { $_ })) {
      if (-not (Test-Path -LiteralPath $path -PathType Leaf)) {
        Write-Output "${path}: cannot read: no such file"; $bad++; continue
      }
      $tokens = $null; $errors = $null
      [void][System.Management.Automation.Language.Parser]::ParseFile(
        (Resolve-Path -LiteralPath $path).ProviderPath, [ref]$tokens, [ref]$errors)
      if ($errors.Count -gt 0) {
        foreach ($e in $errors) {
          $p = $e.Extent.StartScriptPosition
          Write-Output ("{0}:{1}:{2}: {3}: {4}" -f $path, $p.LineNumber, $p.ColumnNumber, $e.ErrorId, $e.Message)
        }
        $bad++
      } else {
        Write-Output "${path}: ok"
      }
    }
    exit $(if ($bad) { 1 } else { 0 })
  '
}

if [ "$#" -gt 0 ]; then
  check "$@"
  exit $?
fi

shipped=()
while IFS= read -r -d '' f; do shipped+=("$f"); done < <(
  find coordinator agent tests powershell -type f \( -name '*.ps1' -o -name '*.psm1' -o -name '*.psd1' \) \
    -not -path '*/testdata/*' -not -path '*/target/*' -print0 2>/dev/null | sort -z)
echo "== powershell parser ($(pwsh -NoProfile -Command '$PSVersionTable.PSVersion.ToString()')): ${#shipped[@]} shipped script(s)"
check "${shipped[@]}"

fixture="coordinator/src/transport/pwsh/testdata/broken.ps1"
echo "== powershell parser: the checker must reject ${fixture}"
if check "$fixture"; then
  echo "error: ${fixture} is deliberately broken, yet the checker accepted it" >&2
  exit 1
fi
echo "== powershell parser: ok (the broken fixture was rejected)"
