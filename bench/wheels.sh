# Sourced by the GPU scripts (machines without network): `install_missing PYTHON MODULE=GLOB ...`
# For each module that PYTHON cannot import, unpack the first wheel in .whl/ matching GLOB into
# /tmp/bench-site (a wheel is a zip laid out as site-packages wants it; no pip needed) and put
# that folder on PYTHONPATH. Fails with one line when a module is missing and has no wheel.
install_missing() {
    local python="$1" item module pattern wheel
    shift
    export PYTHONPATH="/tmp/bench-site${PYTHONPATH:+:$PYTHONPATH}"
    for item in "$@"; do
        module="${item%%=*}"
        pattern="${item#*=}"
        "$python" -c "import $module" 2>/dev/null && continue
        # shellcheck disable=SC2086  # the glob must expand
        wheel=$(ls $pattern 2>/dev/null | head -1 || true)
        if [ -z "$wheel" ]; then
            echo "error: Python module $module is missing and no wheel matches $pattern (see the top of $0)" >&2
            return 2
        fi
        echo "unpacking $wheel into /tmp/bench-site"
        mkdir -p /tmp/bench-site
        "$python" -m zipfile -e "$wheel" /tmp/bench-site
        "$python" -c "import $module" || { echo "error: $module still fails to import from $wheel" >&2; return 2; }
    done
}
