# shellcheck shell=bash
# Make this machine ready to run spoolmq, then set REPO_ROOT and VENV.
#
# Sourced by scripts/test and scripts/demo (under set -euo pipefail). On a
# fresh Debian 12 or Raspberry Pi OS it installs what is missing: Python 3.11
# or newer with its venv module, Mosquitto and its command-line clients. As
# root it runs apt-get; otherwise it prints the one command to run and exits
# 69 (EX_UNAVAILABLE). Then it makes .venv in the repo root and installs the
# project into it, again only when pyproject.toml changed since last time.

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="$REPO_ROOT/.venv"

# The venv remembers which pyproject.toml it was installed from.
BOOTSTRAP_STAMP="$VENV/.spoolmq-installed"
BOOTSTRAP_APT_UPDATED=0

bootstrap_fail() {
    printf 'spoolmq bootstrap: %s\n' "$1" >&2
    exit "${2:-69}"
}

# Debian installs the broker in /usr/sbin, which is not on a normal user's
# PATH: look there too.
bootstrap_have() {
    PATH="$PATH:/usr/sbin:/sbin" command -v "$1" >/dev/null 2>&1
}

bootstrap_python_is_recent() {
    "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1
}

bootstrap_venv_is_healthy() {
    [ -x "$VENV/bin/python" ] && bootstrap_python_is_recent "$VENV/bin/python"
}

# Debian splits the venv module into python3-venv; only making a venv shows
# whether it is there.
bootstrap_can_make_venv() {
    local scratch status=0
    scratch="$(mktemp -d)"
    python3 -m venv "$scratch/venv" >/dev/null 2>&1 || status=$?
    rm -rf "$scratch"
    return "$status"
}

# Print the Debian packages this machine lacks, space separated.
bootstrap_missing_packages() {
    local missing=()
    if ! bootstrap_have python3; then
        missing+=(python3 python3-venv)
    elif ! bootstrap_python_is_recent python3; then
        bootstrap_fail "$(python3 -V 2>&1) is too old: spoolmq needs Python 3.11 or newer (Debian 12 or later)"
    elif ! bootstrap_venv_is_healthy && ! bootstrap_can_make_venv; then
        missing+=(python3-venv)
    fi
    bootstrap_have mosquitto || missing+=(mosquitto)
    if ! bootstrap_have mosquitto_pub || ! bootstrap_have mosquitto_sub; then
        missing+=(mosquitto-clients)
    fi
    echo "${missing[*]}"
}

bootstrap_apt_install() {
    if [ "$BOOTSTRAP_APT_UPDATED" -eq 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get update -q
        BOOTSTRAP_APT_UPDATED=1
    fi
    # shellcheck disable=SC2086  # one word per package
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q $1
}

bootstrap_system_packages() {
    local missing
    missing="$(bootstrap_missing_packages)" || exit $?
    [ -z "$missing" ] && return 0

    if [ "$(id -u)" -ne 0 ]; then
        bootstrap_fail "missing system packages; run: sudo apt-get install -y $missing"
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        bootstrap_fail "missing $missing, and no apt-get to install them: install them, then rerun"
    fi
    echo "spoolmq bootstrap: installing $missing" >&2
    bootstrap_apt_install "$missing" || bootstrap_fail "apt-get install -y $missing failed (see above)"

    missing="$(bootstrap_missing_packages)" || exit $?
    [ -z "$missing" ] || bootstrap_fail "still missing after apt-get: $missing"
}

bootstrap_venv() {
    bootstrap_venv_is_healthy && return 0
    # A venv whose interpreter is gone or too old cannot be repaired in place.
    rm -rf "$VENV"
    echo "spoolmq bootstrap: creating $VENV" >&2
    python3 -m venv "$VENV" || bootstrap_fail "python3 -m venv $VENV failed (see above)"
}

bootstrap_project() {
    local wanted
    [ -f "$REPO_ROOT/pyproject.toml" ] ||
        bootstrap_fail "no pyproject.toml in $REPO_ROOT: run from a spoolmq checkout" 78
    wanted="$(sha256sum "$REPO_ROOT/pyproject.toml" | cut -d' ' -f1)"
    [ "$(cat "$BOOTSTRAP_STAMP" 2>/dev/null)" = "$wanted" ] && return 0

    echo "spoolmq bootstrap: installing the project into $VENV" >&2
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        -e "${REPO_ROOT}[test]" ||
        bootstrap_fail "pip install -e '.[test]' failed (see above)"
    echo "$wanted" >"$BOOTSTRAP_STAMP"
}

bootstrap_system_packages
bootstrap_venv
bootstrap_project
