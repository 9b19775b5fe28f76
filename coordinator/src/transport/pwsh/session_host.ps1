#Requires -Version 7.0
# tollgate-session-host contract v1
#
# The Tollgate session host. The coordinator starts one per psremoting/local host:
#
#   pwsh -NoLogo -NoProfile -NonInteractive -File session_host.ps1 -Mode winrm|ssh|none ...
#
# It opens one PSSession to the target (WinRM: -ComputerName; SSH: -HostName; none: a runspace
# in this process) and serves JSON-line requests from stdin, answering JSON lines on stdout.
# Nothing else is ever written to stdout: any other line is a contract violation and the
# coordinator kills this process. The contract is documented in mod.rs beside this file.
#
# The credential is named by $env:TOLLGATE_CREDENTIAL_REF (env:NAME or file:PATH); its value is
# read once, removed from this process's environment, and never written anywhere.
#
# Code that runs on the target ($Target* below) must also run on Windows PowerShell 5.1, the
# default WinRM endpoint: no ternaries, no '??', no -AsHashtable there.

[CmdletBinding()]
param(
    [ValidateSet('none', 'winrm', 'ssh')]
    [string]$Mode = 'none',
    [string]$ComputerName,
    [string]$HostName,
    [int]$Port = 0,
    [switch]$UseSsl,
    [ValidateSet('Default', 'Basic', 'Negotiate', 'Kerberos', 'CredSSP')]
    [string]$Authentication = 'Default',
    [string]$ConfigurationName,
    [string]$UserName,
    [string]$KeyFilePath,
    [string]$KnownHostsFile,
    [string]$Subsystem,
    [string]$SshOptions,
    [int]$ConnectTimeoutSec = 0,
    [string]$StateDir
)

Set-StrictMode -Version 3.0
$ErrorActionPreference = 'Stop'
$ProgressPreference = 'SilentlyContinue'
$WarningPreference = 'SilentlyContinue'
$InformationPreference = 'SilentlyContinue'
$VerbosePreference = 'SilentlyContinue'

$ContractVersion = 1
$Software = 'tollgate-session-host/1'
$Instance = [guid]::NewGuid().ToString()
$Utf8 = [System.Text.UTF8Encoding]::new($false)
$StdOut = [System.IO.StreamWriter]::new([Console]::OpenStandardOutput(), $Utf8)
$StdOut.AutoFlush = $true
$StdIn = [System.IO.StreamReader]::new([Console]::OpenStandardInput(), $Utf8)
$script:PendingLine = $StdIn.ReadLineAsync()
$script:Session = $null
$script:Runspace = $null

# ---------------------------------------------------------------------------------------------
# Code that runs on the target, as scriptblock literals so that every grammar check parses it;
# only their text is sent. Each one dot-sources $TargetCommon, passed as -Common.
# ---------------------------------------------------------------------------------------------

$TargetCommon = {
    function Get-TgKeyDir([string]$Dir) {
        if (-not $Dir) {
            if ($env:OS -eq 'Windows_NT') {
                $Dir = Join-Path $env:ProgramData 'Tollgate'
            } elseif ($env:XDG_STATE_HOME) {
                $Dir = Join-Path $env:XDG_STATE_HOME 'tollgate'
            } else {
                $Dir = Join-Path $HOME '.local/state/tollgate'
            }
        }
        $keys = Join-Path $Dir 'keys'
        if (-not (Test-Path -LiteralPath $keys)) {
            $null = New-Item -ItemType Directory -Force -Path $keys
        }
        $keys
    }

    function Get-TgMarkerPath([string]$KeyDir, [string]$Key) {
        $sha = [System.Security.Cryptography.SHA256]::Create()
        try {
            $bytes = $sha.ComputeHash([System.Text.Encoding]::UTF8.GetBytes($Key))
        } finally {
            $sha.Dispose()
        }
        $hex = -join ($bytes | ForEach-Object { $_.ToString('x2') })
        Join-Path $KeyDir ($hex + '.json')
    }

    function Read-TgMarker([string]$Path) {
        if (-not (Test-Path -LiteralPath $Path)) { return $null }
        $text = [System.IO.File]::ReadAllText($Path)
        if (-not $text -or -not $text.Trim()) {
            # Created and not yet written: it was started.
            return [pscustomobject]@{ state = 'started'; owner = ''; request_sha = ''; result = $null }
        }
        $text | ConvertFrom-Json
    }

    function Write-TgMarker([string]$Path, $Marker) {
        $tmp = $Path + '.' + [guid]::NewGuid().ToString('n') + '.tmp'
        [System.IO.File]::WriteAllText($tmp, ($Marker | ConvertTo-Json -Compress -Depth 8))
        [System.IO.File]::Replace($tmp, $Path, [NullString]::Value)
    }

    function Invoke-TgScriptFile([string]$Shell, [string]$File) {
        # Runs the file; its output comes out as lines of text. Returns nothing else.
        if ($Shell -eq 'sh') {
            & sh $File | Out-String -Stream -Width 4096
        } else {
            & $File | Out-String -Stream -Width 4096
        }
    }

    function Invoke-TgStepFile {
        # Runs a step's file under its error semantics ('stop': $ErrorActionPreference = 'Stop';
        # 'continue': 'Continue') and tallies the error records it writes into $Tally (Count,
        # First). A native command's stderr comes as NativeCommandError records: passed on, not
        # tallied (its exit code speaks for it). Records pass on to the error stream, output comes
        # out as lines of text. Call it with -ErrorAction Continue: passing a record on never stops.
        [CmdletBinding()]
        param([string]$Shell, [string]$File, [string]$Errors, [hashtable]$Tally)
        if ($Errors -eq 'continue') { $ErrorActionPreference = 'Continue' } else { $ErrorActionPreference = 'Stop' }
        $run = { if ($Shell -eq 'sh') { & sh $File } else { & $File } }
        & $run 2>&1 | ForEach-Object {
            if ($_ -is [System.Management.Automation.ErrorRecord]) {
                if ([string]$_.FullyQualifiedErrorId -notlike 'NativeCommandError*') {
                    $Tally['Count'] += 1
                    if ($null -eq $Tally['First']) {
                        # Taken before WriteError, which adds this function to the record's id.
                        $Tally['First'] = [ordered]@{
                            message  = [string]$_.Exception.Message
                            category = $_.CategoryInfo.Category.ToString()
                            fqid     = [string]$_.FullyQualifiedErrorId
                        }
                    }
                }
                $PSCmdlet.WriteError($_)
            } else {
                $_
            }
        } | Out-String -Stream -Width 4096
    }
}

$TargetInvoke = {
    param([string]$Common, [string]$Key, [string]$RequestSha, [string]$Shell, [string]$Script, [hashtable]$Environment,
          [string]$WorkDir, [string]$StateDir, [string]$Instance, [string]$Errors)
    . ([scriptblock]::Create($Common))
    $PSDefaultParameterValues = @{ 'ConvertTo-Json:Depth' = 100 }
    $ErrorActionPreference = 'Stop'
    if ($Shell -eq 'sh' -and -not (Get-Command sh -CommandType Application -ErrorAction SilentlyContinue)) {
        [pscustomobject]@{ __tollgate = 'capability'; shell = 'sh'; detail = 'sh not found on the target' }
        return
    }
    $keyDir = Get-TgKeyDir $StateDir
    $marker = Get-TgMarkerPath $keyDir $Key
    $created = $false
    try {
        $fs = [System.IO.File]::Open($marker, [System.IO.FileMode]::CreateNew, [System.IO.FileAccess]::Write, [System.IO.FileShare]::None)
        $created = $true
    } catch {
        if (-not (Test-Path -LiteralPath $marker)) { throw }
    }
    if (-not $created) {
        $old = Read-TgMarker $marker
        if ($old.state -eq 'finished') {
            if ($old.request_sha -and $RequestSha -and $old.request_sha -ne $RequestSha) {
                [pscustomobject]@{ __tollgate = 'conflict'; detail = "key $Key was used before for a different request" }
                return
            }
            [pscustomobject]@{ __tollgate = 'replay'; result = ($old.result | ConvertTo-Json -Compress -Depth 6) }
            return
        }
        [pscustomobject]@{ __tollgate = 'uncertain'; detail = "key $Key was left started by session host $($old.owner) and has no result" }
        return
    }
    try {
        $startedMs = [DateTimeOffset]::UtcNow.ToUnixTimeMilliseconds()
        $first = [ordered]@{ v = 1; key = $Key; request_sha = $RequestSha; state = 'started'; owner = $Instance; started_ms = $startedMs }
        $bytes = [System.Text.Encoding]::UTF8.GetBytes(($first | ConvertTo-Json -Compress))
        $fs.Write($bytes, 0, $bytes.Length)
        $fs.Flush()
    } finally {
        $fs.Dispose()
    }

    $clock = [System.Diagnostics.Stopwatch]::StartNew()
    $ext = '.ps1'
    if ($Shell -eq 'sh') { $ext = '.sh' }
    $file = Join-Path $keyDir ('run-' + [guid]::NewGuid().ToString('n') + $ext)
    [System.IO.File]::WriteAllText($file, $Script, (New-Object System.Text.UTF8Encoding $false))
    $saved = @{}
    $pushed = $false
    $code = 0
    $failure = $null
    $tally = @{ Count = 0; First = $null }
    try {
        if ($Environment) {
            foreach ($name in @($Environment.Keys)) {
                $saved[$name] = [Environment]::GetEnvironmentVariable($name)
                [Environment]::SetEnvironmentVariable($name, [string]$Environment[$name])
            }
        }
        if ($WorkDir) {
            Push-Location -LiteralPath $WorkDir
            $pushed = $true
        }
        $PSNativeCommandUseErrorActionPreference = $false
        $global:LASTEXITCODE = 0
        Invoke-TgStepFile -Shell $Shell -File $file -Errors $Errors -Tally $tally -ErrorAction Continue
        $code = $global:LASTEXITCODE
        if ($null -eq $code) { $code = 0 }
        if ($Errors -ne 'continue' -and $tally['Count'] -gt 0) {
            # errors = 'stop': an error record fails the step even after `exit 0`.
            if ($code -eq 0) { $code = 1 }
            $failure = $tally['First']
            $failure['message'] = "the step wrote $($tally['Count']) error record(s) (errors = 'stop'); the first: $($failure['message'])"
        }
    } catch {
        $code = 1
        $failure = [ordered]@{
            message  = $_.Exception.Message
            category = $_.CategoryInfo.Category.ToString()
            fqid     = [string]$_.FullyQualifiedErrorId
        }
    } finally {
        $ErrorActionPreference = 'Stop'
        if ($pushed) { Pop-Location }
        foreach ($name in @($saved.Keys)) {
            $previous = $saved[$name]
            if ($null -eq $previous) { $previous = [NullString]::Value }
            [Environment]::SetEnvironmentVariable($name, $previous)
        }
        Remove-Item -LiteralPath $file -Force -ErrorAction SilentlyContinue
    }
    $result = [ordered]@{
        status      = [ordered]@{ kind = 'exited'; code = [int]$code }
        error       = $failure
        duration_ms = [long]$clock.ElapsedMilliseconds
    }
    Write-TgMarker $marker ([ordered]@{ v = 1; key = $Key; request_sha = $RequestSha; state = 'finished'; owner = $Instance; result = $result })
    [pscustomobject]@{ __tollgate = 'result'; result = ($result | ConvertTo-Json -Compress -Depth 6) }
}

# Ends a key that this session host stopped (timeout, cancel, wrapper failure): if it is still
# `started` by this instance, store the given result. Answers what the marker says now.
$TargetFinish = {
    param([string]$Common, [string]$Key, [string]$StateDir, [string]$Instance, [string]$ResultJson, [switch]$KeepStarted)
    . ([scriptblock]::Create($Common))
    $ErrorActionPreference = 'Stop'
    $marker = Get-TgMarkerPath (Get-TgKeyDir $StateDir) $Key
    $old = Read-TgMarker $marker
    if ($null -eq $old) {
        [pscustomobject]@{ __tollgate = 'finish'; state = 'not_found'; result = $null }
        return
    }
    if ($old.state -eq 'finished') {
        [pscustomobject]@{ __tollgate = 'finish'; state = 'finished'; result = ($old.result | ConvertTo-Json -Compress -Depth 6) }
        return
    }
    if ($old.owner -ne $Instance -or $KeepStarted) {
        [pscustomobject]@{ __tollgate = 'finish'; state = 'started'; result = $null }
        return
    }
    $result = $ResultJson | ConvertFrom-Json
    Write-TgMarker $marker ([ordered]@{ v = 1; key = $Key; request_sha = $old.request_sha; state = 'finished'; owner = $Instance; result = $result })
    [pscustomobject]@{ __tollgate = 'finish'; state = 'finished'; result = $ResultJson }
}

$TargetQuery = {
    param([string]$Common, [string]$Key, [string]$StateDir)
    . ([scriptblock]::Create($Common))
    $ErrorActionPreference = 'Stop'
    $old = Read-TgMarker (Get-TgMarkerPath (Get-TgKeyDir $StateDir) $Key)
    if ($null -eq $old) {
        [pscustomobject]@{ __tollgate = 'query'; state = 'not_found'; result = $null }
    } elseif ($old.state -eq 'finished') {
        [pscustomobject]@{ __tollgate = 'query'; state = 'finished'; result = ($old.result | ConvertTo-Json -Compress -Depth 6) }
    } else {
        # Nothing runs while a query is served, so a started key is one whose outcome is unknown.
        [pscustomobject]@{ __tollgate = 'query'; state = 'uncertain'; result = $null }
    }
}

$TargetProbe = {
    param([string]$Common, [string]$Shell, [string]$Script, [string]$StateDir)
    . ([scriptblock]::Create($Common))
    # ConvertTo-Json's default depth (2) turns deeper facts into type names without a word.
    $PSDefaultParameterValues = @{ 'ConvertTo-Json:Depth' = 100 }
    $ErrorActionPreference = 'Stop'
    $facts = [ordered]@{}
    $facts['host.name'] = [Environment]::MachineName
    $family = 'linux'
    if ($env:OS -eq 'Windows_NT') {
        $family = 'windows'
    } elseif (Test-Path -LiteralPath '/System/Library/CoreServices') {
        $family = 'macos'
    }
    $facts['os.family'] = $family
    $arch = ''
    try {
        $arch = [string][System.Runtime.InteropServices.RuntimeInformation]::OSArchitecture
    } catch {
        $arch = [string]$env:PROCESSOR_ARCHITECTURE
    }
    switch ($arch) {
        'X64' { $arch = 'x86_64' }
        'AMD64' { $arch = 'x86_64' }
        'Arm64' { $arch = 'aarch64' }
        'X86' { $arch = 'x86' }
        default { $arch = $arch.ToLowerInvariant() }
    }
    $facts['os.arch'] = $arch
    $facts['pwsh.present'] = 'true'
    $facts['pwsh.version'] = $PSVersionTable.PSVersion.ToString()
    $facts['pwsh.edition'] = [string]$PSVersionTable.PSEdition
    if (Test-Path -LiteralPath '/proc/sys/kernel/random/boot_id') {
        $facts['boot.id'] = ([System.IO.File]::ReadAllText('/proc/sys/kernel/random/boot_id')).Trim()
    } elseif ($family -eq 'windows') {
        try {
            $boot = (Get-CimInstance -ClassName Win32_OperatingSystem -ErrorAction Stop).LastBootUpTime
            $facts['boot.id'] = $boot.ToUniversalTime().ToString('yyyy-MM-ddTHH:mm:ssZ')
        } catch {
            $facts['boot.id'] = 'unknown'
        }
    }
    $volatile = [ordered]@{ 'time.unix_ms' = [string][DateTimeOffset]::UtcNow.ToUnixTimeMilliseconds() }
    $output = $null
    $code = 0
    $failure = $null
    if ($Script) {
        if ($Shell -eq 'sh' -and -not (Get-Command sh -CommandType Application -ErrorAction SilentlyContinue)) {
            [pscustomobject]@{ __tollgate = 'probe_failed'; detail = 'the probe shell sh was not found on the target' }
            return
        }
        $ext = '.ps1'
        if ($Shell -eq 'sh') { $ext = '.sh' }
        $file = Join-Path (Get-TgKeyDir $StateDir) ('probe-' + [guid]::NewGuid().ToString('n') + $ext)
        [System.IO.File]::WriteAllText($file, $Script, (New-Object System.Text.UTF8Encoding $false))
        try {
            $ErrorActionPreference = 'Continue'
            $global:LASTEXITCODE = 0
            $output = (Invoke-TgScriptFile $Shell $file) -join "`n"
            $code = $global:LASTEXITCODE
            if ($null -eq $code) { $code = 0 }
        } catch {
            $code = 1
            $failure = $_.Exception.Message
        } finally {
            $ErrorActionPreference = 'Stop'
            Remove-Item -LiteralPath $file -Force -ErrorAction SilentlyContinue
        }
    }
    if ($code -ne 0) {
        $detail = "probe script exited with code $code"
        if ($failure) { $detail = "$detail`: $failure" }
        [pscustomobject]@{ __tollgate = 'probe_failed'; detail = $detail }
        return
    }
    [pscustomobject]@{
        __tollgate    = 'probe'
        facts         = ($facts | ConvertTo-Json -Compress)
        volatile      = ($volatile | ConvertTo-Json -Compress)
        script_output = $output
    }
}

# ---------------------------------------------------------------------------------------------
# The contract's I/O.
# ---------------------------------------------------------------------------------------------

function Send-Line([System.Collections.IDictionary]$Message) {
    $StdOut.WriteLine(($Message | ConvertTo-Json -Compress -Depth 10))
}

function Send-Fail($Id, [string]$Code, [string]$Message) {
    Send-Line ([ordered]@{ id = $Id; type = 'fail'; code = $Code; message = $Message })
}

function Read-Request([int]$WaitMs) {
    # The next request, or $null when none came within $WaitMs (-1: wait for ever).
    # End of input means the coordinator is gone: close the session and leave.
    if (-not $script:PendingLine.Wait($WaitMs)) { return $null }
    $line = $script:PendingLine.Result
    if ($null -eq $line) {
        Close-Target
        exit 0
    }
    $script:PendingLine = $StdIn.ReadLineAsync()
    $request = $null
    try {
        $request = $line | ConvertFrom-Json -AsHashtable
    } catch {
        Send-Fail 0 'bad_request' ('request is not JSON: ' + $_.Exception.Message)
        return $null
    }
    if ($request -isnot [System.Collections.IDictionary] -or -not $request.Contains('id') -or -not $request.Contains('op')) {
        Send-Fail 0 'bad_request' 'a request is one JSON object with "id" and "op"'
        return $null
    }
    $request
}

# ---------------------------------------------------------------------------------------------
# The target: open, check, run, close.
# ---------------------------------------------------------------------------------------------

function Read-CredentialFile([string]$Path) {
    if (-not (Test-Path -LiteralPath $Path -PathType Leaf)) {
        throw "credential file $Path does not exist"
    }
    $text = [System.IO.File]::ReadAllText($Path)
    if ($text.TrimStart().StartsWith('<Objs')) {
        $credential = Import-Clixml -LiteralPath $Path
        if ($credential -isnot [pscredential]) { throw "credential file $Path does not hold a PSCredential" }
        return $credential
    }
    ConvertTo-TgCredential ($text.Split("`n")[0].TrimEnd("`r")) "credential file $Path"
}

function ConvertTo-TgCredential([string]$Pair, [string]$Source) {
    $colon = $Pair.IndexOf(':')
    if ($colon -lt 1) { throw "$Source holds neither user:password nor a credential file path" }
    $secure = ConvertTo-SecureString -String $Pair.Substring($colon + 1) -AsPlainText -Force
    [pscredential]::new($Pair.Substring(0, $colon), $secure)
}

function Get-TargetCredential {
    $ref = $env:TOLLGATE_CREDENTIAL_REF
    if (-not $ref) { return $null }
    [Environment]::SetEnvironmentVariable('TOLLGATE_CREDENTIAL_REF', [NullString]::Value)
    if ($ref.StartsWith('env:')) {
        $name = $ref.Substring(4)
        $value = [Environment]::GetEnvironmentVariable($name)
        # The secret leaves this process's environment: scripts run here never see it.
        [Environment]::SetEnvironmentVariable($name, [NullString]::Value)
        if (-not $value) { throw "environment variable $name named by credential_ref is not set" }
        $isFile = $false
        try { $isFile = Test-Path -LiteralPath $value -PathType Leaf } catch { $isFile = $false }
        if ($isFile) { return Read-CredentialFile $value }
        return ConvertTo-TgCredential $value "environment variable $name"
    }
    if ($ref.StartsWith('file:')) { return Read-CredentialFile $ref.Substring(5) }
    throw 'credential_ref must be env:NAME or file:PATH'
}

function Get-OpenFailureCode($Record) {
    $text = [string]$Record.Exception.Message + ' ' + [string]$Record.FullyQualifiedErrorId
    $code = 0
    if ($Record.Exception -is [System.Management.Automation.Remoting.PSRemotingTransportException]) {
        $code = $Record.Exception.ErrorCode
    }
    $denied = 'Access is denied|access denied|Permission denied|logon failure|user name or password|' +
        'password is incorrect|authentication fail|Authentication failure|credentials were rejected'
    if ($code -in 5, 1326, 1909 -or $text -match $denied) { return 'auth_failed' }
    'unreachable'
}

# An open failure that carries its own code, decided before or without reading any message.
class TgOpenFailure : System.Exception {
    [string]$Code
    TgOpenFailure([string]$Code, [string]$Message) : base($Message) { $this.Code = $Code }
}

function Get-SshHostSpec {
    # How known_hosts names the target: "name" on port 22, "[name]:port" otherwise.
    if ($Port -gt 0 -and $Port -ne 22) { return "[$HostName]:$Port" }
    $HostName
}

function Test-SshHostKeyKnown {
    # ssh-keygen -F answers by its exit code (0: an entry, 1: none), hashed entries included.
    $spec = Get-SshHostSpec
    $null = & ssh-keygen -F $spec -f $KnownHostsFile 2>&1
    $LASTEXITCODE -eq 0
}

function Test-SshHostKeyChanged([int]$SshPort) {
    # Only after a refused session: does any key the host offers now match a pinned one?
    # ssh-keyscan does not authenticate; its lines and ssh-keygen -F's share "type base64".
    $pinned = @(& ssh-keygen -F (Get-SshHostSpec) -f $KnownHostsFile 2>$null |
        Where-Object { $_ -and -not $_.StartsWith('#') } |
        ForEach-Object { ($_ -split '\s+')[1..2] -join ' ' })
    $offered = @(& ssh-keyscan -T 5 -p $SshPort $HostName 2>$null |
        Where-Object { $_ -and -not $_.StartsWith('#') } |
        ForEach-Object { ($_ -split '\s+')[1..2] -join ' ' })
    if ($offered.Count -eq 0) { return $false }
    foreach ($key in $offered) { if ($pinned -contains $key) { return $false } }
    $true
}

function Test-TcpReachable([string]$Name, [int]$PortNo, [int]$TimeoutMs) {
    $client = [System.Net.Sockets.TcpClient]::new()
    try {
        $task = $client.ConnectAsync($Name, $PortNo)
        if (-not $task.Wait($TimeoutMs)) { return $false }
        return $client.Connected
    } catch {
        return $false
    } finally {
        $client.Dispose()
    }
}

function Get-SshOptionTable {
    # Never prompt, check host keys strictly, offer only the named key; then the allowed extras.
    # LogLevel QUIET: PowerShell hands ssh's stderr to this process's stdout, the contract
    # channel; a single diagnostic line there would break the contract. Failures are told
    # apart by tests below, not by ssh's words.
    $ssh = [ordered]@{ BatchMode = 'yes'; StrictHostKeyChecking = 'yes'; LogLevel = 'QUIET' }
    if ($KeyFilePath) { $ssh['IdentitiesOnly'] = 'yes' }
    if ($KnownHostsFile) {
        $ssh['UserKnownHostsFile'] = $KnownHostsFile
        $ssh['GlobalKnownHostsFile'] = $KnownHostsFile
    }
    if ($ConnectTimeoutSec -gt 0) { $ssh['ConnectTimeout'] = [string]$ConnectTimeoutSec }
    if ($SshOptions) {
        foreach ($option in (ConvertFrom-Json $SshOptions).PSObject.Properties) {
            $ssh[$option.Name] = [string]$option.Value
        }
    }
    $ssh
}

function Open-SshTarget {
    $parameters = (Get-Command New-PSSession).Parameters
    if (-not $parameters.ContainsKey('Options')) {
        throw [TgOpenFailure]::new('pwsh_too_old',
            "PowerShell $($PSVersionTable.PSVersion) cannot pass ssh options (New-PSSession -Options needs 7.3 or later): without BatchMode ssh could prompt")
    }
    if ($KnownHostsFile -and -not (Test-Path -LiteralPath $KnownHostsFile -PathType Leaf)) {
        throw [TgOpenFailure]::new('host_key_unknown', "known_hosts file $KnownHostsFile does not exist")
    }
    if ($KnownHostsFile -and -not (Test-SshHostKeyKnown)) {
        throw [TgOpenFailure]::new('host_key_unknown',
            "the host key of $(Get-SshHostSpec) is not in $KnownHostsFile; add it (checked out of band), Tollgate never accepts a key on first use")
    }
    $ssh = Get-SshOptionTable
    $options = @{ ErrorAction = 'Stop'; HostName = $HostName; Options = $ssh }
    if ($Port -gt 0) { $options['Port'] = $Port }
    if ($UserName) { $options['UserName'] = $UserName }
    if ($KeyFilePath) { $options['KeyFilePath'] = $KeyFilePath }
    if ($Subsystem) { $options['Subsystem'] = $Subsystem }
    try {
        $script:Session = New-PSSession @options
    } catch {
        # ssh says why only on stderr; its exit tells nothing. Decide by what can be tested: a
        # target that takes no TCP connection is unreachable (transient); one that does and
        # still ends the session refused it (a key, a changed host key, no subsystem).
        if ($ssh.Contains('ProxyJump')) { $reached = $true } else {
            $sshPort = 22
            if ($Port -gt 0) { $sshPort = $Port }
            $waitMs = 5000
            if ($ConnectTimeoutSec -gt 0) { $waitMs = 1000 * $ConnectTimeoutSec }
            $reached = Test-TcpReachable $HostName $sshPort $waitMs
        }
        if (-not $reached) {
            throw [TgOpenFailure]::new('unreachable', "$HostName port $sshPort takes no connection: $($_.Exception.Message)")
        }
        if ($KnownHostsFile -and -not $ssh.Contains('ProxyJump') -and (Test-SshHostKeyChanged $sshPort)) {
            throw [TgOpenFailure]::new('host_key_changed',
                "the host key $(Get-SshHostSpec) offers is not the one pinned in ${KnownHostsFile}: the host was reinstalled or someone is in between; check it out of band before replacing the entry")
        }
        $subsystemName = 'powershell'
        if ($Subsystem) { $subsystemName = $Subsystem }
        throw [TgOpenFailure]::new('auth_failed',
            "ssh to $(Get-SshHostSpec) was refused after connecting: the key was refused, or the host has no '$subsystemName' subsystem")
    }
    $script:Runspace = $script:Session.Runspace
}

function Open-Target {
    if ($Mode -eq 'none') {
        $script:Runspace = [runspacefactory]::CreateRunspace()
        $script:Runspace.Open()
        return
    }
    if ($Mode -eq 'ssh') {
        Open-SshTarget
        return
    }
    $options = @{ ErrorAction = 'Stop'; ComputerName = $ComputerName }
    if ($Port -gt 0) { $options['Port'] = $Port }
    if ($UseSsl) { $options['UseSSL'] = $true }
    if ($Authentication -ne 'Default') { $options['Authentication'] = $Authentication }
    if ($ConfigurationName) { $options['ConfigurationName'] = $ConfigurationName }
    if ($script:Credential) { $options['Credential'] = $script:Credential }
    $script:Session = New-PSSession @options
    $script:Runspace = $script:Session.Runspace
}

function Close-Target {
    try {
        if ($script:Session) { Remove-PSSession -Session $script:Session -ErrorAction SilentlyContinue }
        elseif ($script:Runspace) { $script:Runspace.Dispose() }
    } catch {
        $null = $_
    }
}

function Test-TargetBroken {
    if ($null -eq $script:Runspace) { return $true }
    $state = $script:Runspace.RunspaceStateInfo.State
    return ($state -ne [System.Management.Automation.Runspaces.RunspaceState]::Opened)
}

function Stop-SessionLost($Id, [string]$Detail) {
    Send-Fail $Id 'session_lost' $Detail
    Close-Target
    exit 3
}

function Start-Target([scriptblock]$Target, [System.Collections.IDictionary]$Parameters) {
    $ps = [powershell]::Create()
    $ps.Runspace = $script:Runspace
    $null = $ps.AddScript($Target.ToString())
    $null = $ps.AddParameter('Common', $TargetCommon.ToString())
    foreach ($name in @($Parameters.Keys)) { $null = $ps.AddParameter($name, $Parameters[$name]) }
    $inputData = [System.Management.Automation.PSDataCollection[psobject]]::new()
    $inputData.Complete()
    $outputData = [System.Management.Automation.PSDataCollection[psobject]]::new()
    $handle = $ps.BeginInvoke($inputData, $outputData)
    @{ PS = $ps; Handle = $handle; Out = $outputData; Marker = $null; Failure = $null
       OutSeen = 0; ErrSeen = 0; WarnSeen = 0; InfoSeen = 0; ProgSeen = 0 }
}

function Receive-TargetEvents($Job) {
    # New items of every stream since the last call, as contract-shaped messages (no id).
    $events = [System.Collections.Generic.List[object]]::new()
    $out = $Job.Out
    while ($Job.OutSeen -lt $out.Count) {
        $item = $out[$Job.OutSeen]
        $Job.OutSeen += 1
        if ($null -eq $item) { continue }
        if ($item.PSObject.Properties['__tollgate']) {
            $Job.Marker = $item
        } else {
            $events.Add([ordered]@{ type = 'output'; stream = 'stdout'; data = ([string]$item + "`n") })
        }
    }
    $streams = $Job.PS.Streams
    while ($Job.ErrSeen -lt $streams.Error.Count) {
        $record = $streams.Error[$Job.ErrSeen]
        $Job.ErrSeen += 1
        $events.Add([ordered]@{ type = 'error'; data = ([string]$record + "`n"); category = [string]$record.CategoryInfo.Category })
    }
    while ($Job.WarnSeen -lt $streams.Warning.Count) {
        $warning = $streams.Warning[$Job.WarnSeen]
        $Job.WarnSeen += 1
        $events.Add([ordered]@{ type = 'output'; stream = 'stderr'; data = ('WARNING: ' + [string]$warning.Message + "`n") })
    }
    while ($Job.InfoSeen -lt $streams.Information.Count) {
        $info = $streams.Information[$Job.InfoSeen]
        $Job.InfoSeen += 1
        $events.Add([ordered]@{ type = 'output'; stream = 'stdout'; data = ([string]$info.MessageData + "`n") })
    }
    while ($Job.ProgSeen -lt $streams.Progress.Count) {
        $progress = $streams.Progress[$Job.ProgSeen]
        $Job.ProgSeen += 1
        $events.Add([ordered]@{ type = 'progress'; activity = [string]$progress.Activity; status = [string]$progress.StatusDescription; percent = [int]$progress.PercentComplete })
    }
    $events.ToArray()
}

function Complete-Target($Job) {
    # Collects what is left once the pipeline has ended; remembers a terminating failure.
    try {
        $null = $Job.PS.EndInvoke($Job.Handle)
    } catch {
        $Job.Failure = $_
    }
}

function Invoke-TargetSync([scriptblock]$Target, [System.Collections.IDictionary]$Parameters) {
    # Runs a short bookkeeping script on the target and returns its marker object.
    $job = Start-Target $Target $Parameters
    $null = $job.Handle.AsyncWaitHandle.WaitOne()
    $null = Receive-TargetEvents $job
    Complete-Target $job
    $job.PS.Dispose()
    if ($job.Failure) { throw $job.Failure }
    if ($null -eq $job.Marker) { throw 'the target script answered nothing' }
    $job.Marker
}

function Wait-Target($Job, $Id, [long]$TimeoutMs, [string]$Key, [switch]$Stream) {
    # Waits for the pipeline, streaming its output (with -Stream) and serving `cancel` for $Key.
    # Returns $null, 'timed_out' or 'cancelled'.
    $deadline = [DateTime]::UtcNow.AddMilliseconds([double]$TimeoutMs)
    $ending = $null
    while (-not $Job.Handle.IsCompleted) {
        foreach ($message in (Receive-TargetEvents $Job)) {
            if ($Stream) {
                $message['id'] = $Id
                Send-Line $message
            }
        }
        $next = Read-Request 50
        if ($null -ne $next) {
            if ($next['op'] -eq 'cancel') {
                $found = ($Key -and [string]$next['key'] -eq $Key)
                Send-Line ([ordered]@{ id = $next['id']; type = 'cancel'; found = $found })
                if ($found -and -not $ending) {
                    $ending = 'cancelled'
                    $null = $Job.PS.BeginStop($null, $null)
                }
            } else {
                Send-Fail $next['id'] 'busy' "request $Id is still running"
            }
        }
        if (-not $ending -and [DateTime]::UtcNow -ge $deadline) {
            $ending = 'timed_out'
            $null = $Job.PS.BeginStop($null, $null)
        }
    }
    foreach ($message in (Receive-TargetEvents $Job)) {
        if ($Stream) {
            $message['id'] = $Id
            Send-Line $message
        }
    }
    Complete-Target $Job
    $ending
}

# ---------------------------------------------------------------------------------------------
# Requests.
# ---------------------------------------------------------------------------------------------

function Send-Result($Id, [string]$Key, [string]$ResultJson, [bool]$Replayed) {
    $result = $ResultJson | ConvertFrom-Json -AsHashtable
    $scriptError = $null
    if ($result.Contains('error')) { $scriptError = $result['error'] }
    Send-Line ([ordered]@{
        id          = $Id
        type        = 'result'
        key         = $Key
        status      = $result['status']
        error       = $scriptError
        duration_ms = [long]$result['duration_ms']
        replayed    = $Replayed
    })
}

function Send-Status($Id, [string]$Key, [System.Collections.IDictionary]$Status, [long]$DurationMs) {
    Send-Line ([ordered]@{ id = $Id; type = 'result'; key = $Key; status = $Status; error = $null; duration_ms = $DurationMs; replayed = $false })
}

function Invoke-Step($Request) {
    $id = $Request['id']
    $key = [string]$Request['key']
    if (-not $key) {
        Send-Fail $id 'bad_request' 'invoke needs a key'
        return
    }
    $errors = [string]$Request['errors']
    if ($errors -ne 'stop' -and $errors -ne 'continue') {
        Send-Fail $id 'bad_request' "invoke needs errors = 'stop' or 'continue', got '$errors'"
        return
    }
    $environment = @{}
    if ($Request['env']) {
        foreach ($name in @($Request['env'].Keys)) { $environment[$name] = [string]$Request['env'][$name] }
    }
    $parameters = [ordered]@{
        Key         = $key
        RequestSha  = [string]$Request['request_sha']
        Shell       = [string]$Request['shell']
        Script      = [string]$Request['script']
        Environment = $environment
        WorkDir     = [string]$Request['working_dir']
        StateDir    = $StateDir
        Instance    = $Instance
        Errors      = $errors
    }
    $clock = [System.Diagnostics.Stopwatch]::StartNew()
    $job = Start-Target $TargetInvoke $parameters
    $ending = Wait-Target $job $id ([long]$Request['timeout_ms']) $key -Stream
    $job.PS.Dispose()
    if (Test-TargetBroken) { Stop-SessionLost $id "the session to the target broke while $key was running" }
    $marker = $job.Marker
    if ($null -ne $marker) {
        switch ([string]$marker.__tollgate) {
            'result' { Send-Result $id $key ([string]$marker.result) $false; return }
            'replay' { Send-Result $id $key ([string]$marker.result) $true; return }
            'conflict' { Send-Fail $id 'idempotency_conflict' ([string]$marker.detail); return }
            'uncertain' {
                Send-Status $id $key ([ordered]@{ kind = 'uncertain'; detail = [string]$marker.detail }) 0
                return
            }
            'capability' {
                Send-Status $id $key ([ordered]@{ kind = 'capability_mismatch'; shell = [string]$marker.shell; detail = [string]$marker.detail }) 0
                return
            }
        }
    }
    # The wrapper did not finish: stopped (timeout, cancel) or failed. Settle the marker.
    $elapsed = [long]$clock.ElapsedMilliseconds
    $status = [ordered]@{ kind = 'uncertain'; detail = 'the step wrapper failed' }
    if ($ending) {
        $status = [ordered]@{ kind = $ending }
    } elseif ($job.Failure) {
        $status = [ordered]@{ kind = 'uncertain'; detail = 'the step wrapper failed: ' + $job.Failure.Exception.Message }
    }
    $wanted = [ordered]@{ status = $status; error = $null; duration_ms = $elapsed }
    $finish = Invoke-TargetSync $TargetFinish ([ordered]@{
        Key         = $key
        StateDir    = $StateDir
        Instance    = $Instance
        ResultJson  = ($wanted | ConvertTo-Json -Compress -Depth 6)
        KeepStarted = ($null -eq $ending)
    })
    switch ([string]$finish.state) {
        'finished' { Send-Result $id $key ([string]$finish.result) $false }
        'not_found' {
            if ($ending) {
                Send-Status $id $key $status $elapsed
            } else {
                Send-Status $id $key ([ordered]@{ kind = 'spawn_failed'; detail = $status['detail'] }) $elapsed
            }
        }
        default { Send-Status $id $key $status $elapsed }
    }
}

function Invoke-Probe($Request) {
    $id = $Request['id']
    $shell = 'pwsh'
    if ($Request['shell']) { $shell = [string]$Request['shell'] }
    $parameters = [ordered]@{ Shell = $shell; Script = [string]$Request['script']; StateDir = $StateDir }
    $job = Start-Target $TargetProbe $parameters
    $ending = Wait-Target $job $id ([long]$Request['timeout_ms']) ''
    $job.PS.Dispose()
    if (Test-TargetBroken) { Stop-SessionLost $id 'the session to the target broke during the probe' }
    if ($ending) {
        Send-Fail $id 'timed_out' "the probe did not finish within $($Request['timeout_ms']) ms"
        return
    }
    $marker = $job.Marker
    if ($null -eq $marker) {
        $detail = 'the probe answered nothing'
        if ($job.Failure) { $detail = 'the probe failed: ' + $job.Failure.Exception.Message }
        Send-Fail $id 'probe_failed' $detail
        return
    }
    if ([string]$marker.__tollgate -ne 'probe') {
        Send-Fail $id 'probe_failed' ([string]$marker.detail)
        return
    }
    Send-Line ([ordered]@{
        id            = $id
        type          = 'probe'
        facts         = ([string]$marker.facts | ConvertFrom-Json -AsHashtable)
        volatile      = ([string]$marker.volatile | ConvertFrom-Json -AsHashtable)
        script_output = $marker.script_output
    })
}

function Invoke-Query($Request) {
    $id = $Request['id']
    $key = [string]$Request['key']
    $answer = Invoke-TargetSync $TargetQuery ([ordered]@{ Key = $key; StateDir = $StateDir })
    $result = $null
    if ($answer.result) { $result = ([string]$answer.result | ConvertFrom-Json -AsHashtable) }
    Send-Line ([ordered]@{ id = $id; type = 'query'; key = $key; state = [string]$answer.state; result = $result })
}

# ---------------------------------------------------------------------------------------------
# Hello, then serve until stdin closes.
# ---------------------------------------------------------------------------------------------

$hello = $null
while ($null -eq $hello) { $hello = Read-Request -1 }
if ($hello['op'] -ne 'hello') {
    Send-Fail $hello['id'] 'bad_request' 'the first request must be hello'
    exit 2
}
if ([int]$hello['v'] -ne $ContractVersion) {
    Send-Fail $hello['id'] 'unsupported_version' "this session host speaks contract v$ContractVersion, not v$($hello['v'])"
    exit 2
}
$script:Credential = $null
if ($Mode -eq 'winrm') {
    try {
        $script:Credential = Get-TargetCredential
    } catch {
        Send-Fail $hello['id'] 'credential_unavailable' $_.Exception.Message
        exit 2
    }
}
try {
    Open-Target
} catch {
    $failure = $_.Exception
    if ($failure -is [System.Management.Automation.MethodInvocationException] -and $failure.InnerException) {
        $failure = $failure.InnerException
    }
    if ($failure -is [TgOpenFailure]) {
        Send-Fail $hello['id'] $failure.Code $failure.Message
    } else {
        Send-Fail $hello['id'] (Get-OpenFailureCode $_) $failure.Message
    }
    exit 2
}
Send-Line ([ordered]@{
    id         = $hello['id']
    type       = 'hello'
    v          = $ContractVersion
    software   = $Software
    ps_version = $PSVersionTable.PSVersion.ToString()
    mode       = $Mode
    instance   = $Instance
})

while ($true) {
    $request = Read-Request -1
    if ($null -eq $request) { continue }
    $id = $request['id']
    try {
        if ($request['op'] -ne 'cancel' -and (Test-TargetBroken)) {
            Stop-SessionLost $id 'the session to the target is no longer open'
        }
        switch ([string]$request['op']) {
            'probe' { Invoke-Probe $request }
            'invoke' { Invoke-Step $request }
            'query' { Invoke-Query $request }
            'cancel' { Send-Line ([ordered]@{ id = $id; type = 'cancel'; found = $false }) }
            'hello' { Send-Fail $id 'bad_request' 'hello was already said' }
            default { Send-Fail $id 'bad_request' "unknown op $($request['op'])" }
        }
    } catch {
        if (Test-TargetBroken) { Stop-SessionLost $id ('the session to the target broke: ' + $_.Exception.Message) }
        Send-Fail $id 'internal' $_.Exception.Message
    }
}
