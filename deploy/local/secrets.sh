#!/usr/bin/env bash
# The stack's secrets, each made once and kept in FILE (mode 600), so usage links, page cursors and encrypted rows
# stay valid across restarts, as the demo's key does: the usage-link secret, the page-cursor secret and the
# secrets-encryption key (a Fernet key: 32 random bytes, URL-safe base64). A secret already in FILE is kept.
# Used by apps.sh and by docker-compose.yml's init service. Usage: secrets.sh FILE
set -euo pipefail
FILE=$1

remember() {
  local name=$1 code=$2
  grep -q "^$name=" "$FILE" 2>/dev/null && return
  (umask 077; echo "$name=$(python3 -c "$code")" >> "$FILE")
  echo "generated $name once (kept in $FILE)"
}

remember TALLY_USAGE_LINK_SECRET 'import secrets; print(secrets.token_urlsafe(32))'
remember TALLY_QUERY_CURSOR_SECRET 'import secrets; print(secrets.token_urlsafe(32))'
remember TALLY_SECRETS_KEY 'import base64, os; print(base64.urlsafe_b64encode(os.urandom(32)).decode())'
