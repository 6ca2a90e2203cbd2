#!/usr/bin/env bash
# Submit a text-only job with redis-cli alone and print the generated text as it arrives.
#   examples/redis_cli_submit.sh REDIS_URL MODEL PROMPT [JOB_ID]
# REDIS_URL may be redis://, rediss:// or a cluster's redis+cluster://host:port[,host:port...] (redis-cli -c).
# It reads the job's replay stream with XREAD (no pub/sub), so it works the same on one Redis and on a cluster.
# Exit status: 0 done, 1 failed (the reason goes to stderr), 2 cancelled, 3 timed out.
# Environment: MAX_NEW_TOKENS (default 64), TIMEOUT_S (default 300).
set -euo pipefail
if [ $# -lt 3 ]; then echo "usage: $0 REDIS_URL MODEL PROMPT [JOB_ID]" >&2; exit 64; fi
url=$1 model=$2 prompt=$3
job_id=${4:-cli-$(date +%s%N)-$$}
max_new_tokens=${MAX_NEW_TOKENS:-64}
timeout_s=${TIMEOUT_S:-300}
cli() { redis-cli --no-auth-warning -u "$url" "$@"; }
case $url in
  redis+cluster://* | rediss+cluster://*)
    # A Redis Cluster: redis-cli -c follows MOVED replies from the first listed node to the one serving each key.
    rest=${url#*://}; rest=${rest%%[/?]*}
    creds=""; [[ $rest == *@* ]] && { creds=${rest%@*}; rest=${rest##*@}; }
    first=${rest%%,*}; host=${first%:*}; port=${first##*:}
    cluster_args=(-c -h "$host" -p "$port")
    [[ $url == rediss+* ]] && cluster_args+=(--tls)
    if [ -n "$creds" ]; then
      if [[ $creds == *:* ]]; then cluster_args+=(--user "${creds%%:*}" --pass "${creds#*:}"); else cluster_args+=(--pass "$creds"); fi
    fi
    cli() { redis-cli --no-auth-warning "${cluster_args[@]}" "$@"; } ;;
esac

json_escape() {  # enough JSON escaping for a prompt typed on a command line
  local s=${1//\\/\\\\}
  s=${s//\"/\\\"}
  s=${s//$'\n'/\\n}
  s=${s//$'\t'/\\t}
  s=${s//$'\r'/\\r}
  printf '%s' "$s"
}

job="{\"id\":\"$job_id\",\"model\":\"$(json_escape "$model")\",\"max_new_tokens\":$max_new_tokens,"
job+="\"prompt\":[{\"role\":\"user\",\"content\":\"$(json_escape "$prompt")\"}]}"
cli XADD "ivl:jobs:$model" '*' job "$job" >/dev/null
echo "submitted job $job_id to ivl:jobs:$model" >&2

events="ivl:job:{$job_id}:events"
last_id=0-0
deadline=$(( $(date +%s) + timeout_s ))
while [ "$(date +%s)" -lt "$deadline" ]; do
  # Raw reply, one element per line: stream name, then (entry id, field "e", event JSON) per entry.
  while IFS= read -r line; do
    case $line in
      [0-9]*-[0-9]*) last_id=$line ;;
      '{"seq":'*)
        case $line in
          *'"type":"delta"'*)
            text=${line#*\"text\":\"}; text=${text%\"\}}
            text=${text//\\\"/\"}
            printf '%b' "$text" ;;
          *'"type":"done"'*) echo; echo "done: $line" >&2; exit 0 ;;
          *'"type":"failed"'*) echo; echo "failed: $line" >&2; exit 1 ;;
          *'"type":"cancelled"'*) echo; echo "cancelled" >&2; exit 2 ;;
        esac ;;
    esac
  done < <(cli XREAD COUNT 100 BLOCK 2000 STREAMS "$events" "$last_id")
done
echo "timed out after ${timeout_s}s waiting for job $job_id" >&2
exit 3
