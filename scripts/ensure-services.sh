#!/usr/bin/env bash
# Machine services the test suite needs that are not Python packages:
# PostgreSQL (started when down), and Debian packages (prometheus, docker-compose, wrk).
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
for pkg_bin in "prometheus:prometheus" "promtool:prometheus" "docker-compose:docker-compose" "wrk:wrk"; do
  bin=${pkg_bin%%:*}; pkg=${pkg_bin##*:}
  command -v "$bin" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  mapfile -t uniq < <(printf '%s\n' "${need[@]}" | sort -u)
  echo "installing Debian packages: ${uniq[*]}"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${uniq[@]}" >/dev/null
  # The Debian package starts a system Prometheus on :9090; tests run their own on free ports.
  (command -v systemctl >/dev/null && systemctl stop prometheus 2>/dev/null) || pkill -x prometheus || true
fi
