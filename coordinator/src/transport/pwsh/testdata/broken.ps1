# Deliberately broken: .ci/check-powershell.sh must reject this file. Do not fix it.
function Send-Line([System.Collections.IDictionary]$Message) {
    $StdOut.WriteLine(($Message | ConvertTo-Json -Compress -Depth 10)
}

if ($Mode -eq 'none' {
    $script:Runspace = [runspacefactory]::CreateRunspace()
