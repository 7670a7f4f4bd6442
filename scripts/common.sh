# Shared by scripts/test and scripts/run (sourced, not run): Debian packages, the venv.
# Callers set ROOT (the checkout) and NAME (for messages) before sourcing.
PYTHON=${PYTHON:-python3}
VENV=$ROOT/.venv

say() { echo "$NAME: $*" >&2; }

python_is_new_enough() {
    "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null
}

# apt_install PKG...: install the missing ones (as root, or with password-less sudo).
apt_install() {
    local missing=() pkg
    for pkg in "$@"; do
        if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
            missing+=("$pkg")
        fi
    done
    ((${#missing[@]})) || return 0
    local sudo=()
    if ! command -v apt-get >/dev/null; then
        say "no apt-get here; install these yourself: ${missing[*]}"
        return 0
    elif [[ $(id -u) -ne 0 ]]; then
        if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
            sudo=(sudo -n)
        else
            say "not root and no password-less sudo: skipping apt; install these yourself: ${missing[*]}"
            return 0
        fi
    fi
    say "installing Debian packages: ${missing[*]}"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null
}

# ensure_venv: $VENV exists and runs Python >= 3.11.
ensure_venv() {
    if [[ -x $VENV/bin/python ]] && python_is_new_enough "$VENV/bin/python"; then
        return 0
    fi
    if ! command -v "$PYTHON" >/dev/null || ! python_is_new_enough "$PYTHON"; then
        say "needs Python >= 3.11 ($PYTHON is $("$PYTHON" -V 2>&1 || echo missing)); set PYTHON=/path/to/python3.11"
        exit 1
    fi
    # Debian's own python3 leaves venv support (ensurepip) to the python3-venv package.
    if ! "$PYTHON" -c 'import ensurepip' 2>/dev/null; then
        apt_install python3-venv
    fi
    say "creating $VENV with $("$PYTHON" -V 2>&1)"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
}

# ensure_installed EXTRA STAMP: pip install -e ".[EXTRA]" when pyproject.toml changed.
ensure_installed() {
    local spec=$ROOT stamp=$VENV/.installed-$2 want
    [[ -n $1 ]] && spec="$ROOT[$1]"
    want=$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)
    if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
        return 0
    fi
    say "installing the package${1:+ with its $1 dependencies} into $VENV"
    PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/pip" install -q -e "$spec" </dev/null
    echo "$want" >"$stamp"
}
