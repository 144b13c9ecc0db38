#!/usr/bin/env bash
# Sets up everything sixnet needs, then runs it:
#   ./dev.sh run    virtual environment, install, lab PKI in ./state, then every service in twistd
#   ./dev.sh test   virtual environment, install, then the test suite (extra arguments go to pytest)
set -euo pipefail
cd "$(dirname "$0")"

python=${PYTHON:-$(command -v python3.11 || command -v python3)}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "dev.sh: $python is older than Python 3.11" >&2
    exit 2
fi
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
# Reinstall when pyproject.toml changes (editable: the source tree is what runs).
if [ ! -f .venv/.installed ] || [ pyproject.toml -nt .venv/.installed ]; then
    .venv/bin/python -m pip install -q --disable-pip-version-check \
        -e '.[test]'
    touch .venv/.installed
fi

case "${1:-}" in
    run)
        shift
        .venv/bin/sixnet pki setup --config etc/sixnet.toml
        exec .venv/bin/twistd --nodaemon --pidfile= sixnet --config etc/sixnet.toml "$@"
        ;;
    test)
        shift
        exec .venv/bin/python -m pytest "$@"
        ;;
    *)
        echo "usage: ./dev.sh run | ./dev.sh test [pytest arguments]" >&2
        exit 2
        ;;
esac
