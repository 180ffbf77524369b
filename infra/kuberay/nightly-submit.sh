#!/bin/sh
# Submit tonight's render as a RayJob named for its date, from the RayJob in rayjob.yaml.
# The name makes a second submission of the same night fail with AlreadyExists instead of
# starting a second job; the output path templates the same date, so a re-run resumes it.
#   RUN_DATE   the night to render (YYYY-MM-DD); default: today in UTC
#   RAYJOB     the RayJob template (default: rayjob.yaml beside this script)
#   RENDER_ONLY=1  print the RayJob and exit (no kubectl)
# A night whose RayJob failed or was suspended is deleted and submitted again: it resumes.
set -eu
RUN_DATE="${RUN_DATE:-$(date -u +%Y-%m-%d)}"
RAYJOB="${RAYJOB:-$(dirname "$0")/rayjob.yaml}"
case "$RUN_DATE" in
  [0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]) ;;
  *) echo "RUN_DATE=$RUN_DATE: expected YYYY-MM-DD" >&2; exit 2 ;;
esac
NAME="ifrender-nightly-$(echo "$RUN_DATE" | tr -d -)"

render() {
  # The template's own name and entrypoint lines, rewritten; the rest is used as it is.
  sed -e "s|^  name: ifrender-render\$|  name: $NAME|" \
      -e "s|^  entrypoint: ifrender run \(.*\) --quiet\$|  entrypoint: ifrender run \1 --run-date $RUN_DATE --quiet|" \
      "$RAYJOB"
}

if [ "${RENDER_ONLY:-0}" = 1 ]; then render; exit 0; fi

if kubectl get rayjob "$NAME" >/dev/null 2>&1; then
  status="$(kubectl get rayjob "$NAME" -o jsonpath='{.status.jobDeploymentStatus}')"
  case "$status" in
    Failed|ValidationFailed|Suspended)
      echo "$NAME ended $status: submitting it again; it resumes from its committed shards"
      kubectl delete rayjob "$NAME" --wait=true ;;
    *)
      echo "$NAME exists ($status): nothing to do"; exit 0 ;;
  esac
fi
render | kubectl create -f -
echo "submitted $NAME; watch: kubectl get rayjob $NAME -w"
