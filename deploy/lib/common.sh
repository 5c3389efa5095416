# Shared by deploy/check and deploy/autoscale-test. Sourced, not run; the
# working directory is the repository root.

# The Python venv with lib/requirements.txt, made once and reused while the
# requirements are unchanged ($KILN_DEPLOY_VENV, default /tmp/kiln-deploy-venv).
VENV=${KILN_DEPLOY_VENV:-/tmp/kiln-deploy-venv}
PY=$VENV/bin/python
export PYTHONDONTWRITEBYTECODE=1

die() { echo "FAIL: $*" >&2; exit 1; }

ensure_venv() {
  local stamp=$VENV/.kiln-requirements
  if [ -x "$PY" ] && cmp -s deploy/lib/requirements.txt "$stamp"; then return 0; fi
  echo "installing deploy/lib/requirements.txt into $VENV (once)"
  python3 -m venv "$VENV" || die "python3 -m venv $VENV"
  "$VENV/bin/pip" install -q -r deploy/lib/requirements.txt || die "pip install -r deploy/lib/requirements.txt"
  cp deploy/lib/requirements.txt "$stamp"
}

# The binaries: $KILN_BIN_DIR, else target/release when it has all three, else
# target/debug, built when missing.
find_bins() {
  local dir=${KILN_BIN_DIR:-}
  if [ -z "$dir" ]; then
    if [ -x target/release/kiln-coordinator ] && [ -x target/release/kiln-worker ] && [ -x target/release/kiln ]; then
      dir=target/release
    else
      dir=target/debug
      if ! [ -x $dir/kiln-coordinator ] || ! [ -x $dir/kiln-worker ] || ! [ -x $dir/kiln ]; then
        echo "building the debug binaries"
        cargo build -q -p kiln-coordinator -p kiln-worker -p kiln-cli --bins || die "cargo build"
      fi
    fi
  fi
  COORD=$dir/kiln-coordinator WORKER=$dir/kiln-worker KILN=$dir/kiln
  for b in "$COORD" "$WORKER" "$KILN"; do [ -x "$b" ] || die "no binary $b"; done
  "$COORD" --help | grep -q -- '--http' || die "$COORD has no --http side door (needs the coordinator's HTTP API, issue #8)"
}

free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }

# wait_http URL SECONDS: until URL answers 200.
wait_http() {
  local i
  for ((i = 0; i < $2 * 10; i++)); do
    python3 -c "import sys,urllib.request;urllib.request.urlopen(sys.argv[1],timeout=2)" "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}
