# Shared by the container tests (sourced): the engine, and an image build with the optional proxy CA.
# Environment: CONTAINER_ENGINE (podman|docker, default podman), PIP_CA_FILE (a CA bundle handed to pip
# at build time only, for intercepting proxies; unset elsewhere), KEEP_IMAGE=1 to keep what was built.
ENGINE=${CONTAINER_ENGINE:-podman}

# build_image TAG LOG BUILD-ARGS...: build the context "." into TAG, print the time it took; on failure
# print the end of the log and exit. Podman uses local images only (--pull=never: no registry here).
build_image() {
  local tag=$1 log=$2
  shift 2
  local args=(-t "$tag" "$@")
  [ -n "${PIP_CA_FILE:-}" ] && args+=(-v "$PIP_CA_FILE:/run/host-ca.crt:ro" --build-arg PIP_CERT=/run/host-ca.crt)
  [ "$ENGINE" = podman ] && args+=(--pull=never)
  local began
  began=$(date +%s)
  echo "== build ($ENGINE)"
  $ENGINE build "${args[@]}" . >"$log" 2>&1 || { tail -40 "$log"; exit 1; }
  echo "   built in $(( $(date +%s) - began )) s"
}

# remove_image TAG: unless KEEP_IMAGE is set
remove_image() {
  [ -n "${KEEP_IMAGE:-}" ] || $ENGINE rmi -f "$1" >/dev/null 2>&1 || true
}

# image_size_mb TAG
image_size_mb() {
  echo $(( $($ENGINE image inspect "$1" --format '{{.Size}}') / 1000000 ))
}
