# Shared environment for the project's scripts. Sourced, not executed.
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
if ! command -v cargo >/dev/null 2>&1; then
    if [ -f "$HOME/.cargo/env" ]; then
        # shellcheck disable=SC1091
        source "$HOME/.cargo/env"
    else
        echo "cargo not found: install Rust (https://rustup.rs) first" >&2
        exit 1
    fi
fi

# libtorch for the `tch` crate: the PyTorch wheel that scripts/setup installs.
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${LIBTORCH:-}" ]; then
    for t in "$root"/.venv-torch/lib/python3*/site-packages/torch; do
        if [ -d "$t/lib" ]; then
            export LIBTORCH="$t"
        fi
    done
fi
if [ -n "${LIBTORCH:-}" ]; then
    # tessera-client binaries carry an rpath to it; other binaries that link the client
    # library (the integration tests, the demo) find it here.
    export LD_LIBRARY_PATH="$LIBTORCH/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
export TESSERA_DATA="${TESSERA_DATA:-$root/.tessera-data}"
unset root
