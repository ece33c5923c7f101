#!/usr/bin/env bash
# Machine services the test suite needs that are not Python packages:
# PostgreSQL (started when down), and Debian packages (prometheus, docker-compose, wrk, redis-server: the tests
# start their own redis-server on free ports, never the service the package would start).
set -euo pipefail

if ! (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null; then
  if [ -d /etc/postgresql ]; then
    for v in $(ls /etc/postgresql); do
      pg_ctlcluster --skip-systemctl-redirect "$v" main start || true
    done
  fi
  for _ in $(seq 1 60); do
    (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null && break
    sleep 0.5
  done
fi

need=()
for pkg_bin in "prometheus:prometheus" "promtool:prometheus" "docker-compose:docker-compose" "wrk:wrk" \
               "redis-server:redis-server"; do
  bin=${pkg_bin%%:*}; pkg=${pkg_bin##*:}
  command -v "$bin" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  mapfile -t uniq < <(printf '%s\n' "${need[@]}" | sort -u)
  echo "installing Debian packages: ${uniq[*]}"
  # The prometheus package would start a system Prometheus on :9090, redis-server one on :6379; the tests run
  # their own on free ports.
  # So this install starts no service at all: a policy-rc.d that refuses every start (Debian's mechanism,
  # honoured by invoke-rc.d and deb-systemd-invoke), only when the machine has none, removed afterwards.
  # Nothing already running on the machine is touched.
  policy=${GATEWAY_TAP_POLICY_RC_D:-/usr/sbin/policy-rc.d}  # overridable for its test
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# written by gateway-tap scripts/ensure-services.sh for one apt-get install\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    trap 'rm -f "$policy"' EXIT
  fi
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${uniq[@]}" >/dev/null
fi
