#!/usr/bin/env bash
# One-shot job: least-privilege roles and users, so only Elasticsearch and this job know the
# elastic superuser password. Idempotent (PUT replaces). Passwords must not contain '"' or '\'.
set -euo pipefail
es=${ES_URL:-http://elasticsearch:9200}

put() {
  curl -fsS -u "elastic:${ELASTIC_PASSWORD}" -H 'Content-Type: application/json' -X PUT "$es$1" -d "$2" >/dev/null
  echo "PUT $1"
}

# The collector installs index templates and writes gateway-* indices.
put /_security/role/gateway_tap_writer '{
  "cluster": ["monitor", "manage_index_templates", "manage_ilm"],
  "indices": [{"names": ["gateway-*"],
               "privileges": ["create_index", "write", "read", "view_index_metadata", "manage", "manage_ilm"]}]
}'
put /_security/role/gateway_tap_reader '{
  "cluster": ["monitor"],
  "indices": [{"names": ["gateway-*"], "privileges": ["read", "view_index_metadata"]}]
}'
put /_security/user/gateway_tap_collector "{\"password\": \"${ES_COLLECTOR_PASSWORD}\", \"roles\": [\"gateway_tap_writer\"]}"
put /_security/user/grafana_reader "{\"password\": \"${ES_GRAFANA_PASSWORD}\", \"roles\": [\"gateway_tap_reader\"]}"
