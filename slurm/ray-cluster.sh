# shellcheck shell=bash
# Ray on the nodes of the current Slurm job, then one driver against it. Sourced by slurm/train.sh and
# slurm/prepare.sh: `vlmtune_config_args SCRIPT DEFAULT_CONFIG "$@"` resolves the job's config from the
# script's arguments, then `vlmtune_ray_job MODE jobs/<script>.py --config CONFIG [key=value ...]`:
#
#   1. one `ray start --head --block` step on the first node, one `ray start --address --block` step on
#      every other node (srun, one task per node, the job's CPUs/GPUs per node);
#   2. waits until Ray sees every node and GPU (VLMTUNE_RAY_WAIT_S, default 300 s), logs
#      "ray cluster ready: N nodes, C CPUs, G GPUs", and checks the config fits (train);
#   3. runs the driver on the head node with RAY_ADDRESS set and returns its exit code;
#   4. SIGTERM to this script while the driver runs (the time limit, --signal=B:TERM@120, or
#      `scancel --batch --signal=TERM JOB`) goes to the driver's step alone: Ray stays up while the workers
#      save a checkpoint, the driver exits 75, and the job requeues itself (VLMTUNE_REQUEUE=0: it does not);
#   5. on exit, failure, scancel or the time limit, stops exactly the steps it started (by PID: srun
#      forwards the signal to its Ray processes). Never `ray stop`: other Ray clusters may share a node.
#
# Environment knobs (all optional):
#   VLMTUNE_VENV              virtualenv with vlmtune installed (same path on every node)
#   VLMTUNE_CONTAINER_IMAGE   pyxis/enroot image (e.g. registry#org/vlmtune:0.1.0 or /shared/vlmtune.sqsh);
#                             VLMTUNE_CONTAINER_MOUNTS (src:dst[,...]) must include the shared storage
#   VLMTUNE_APPTAINER_IMAGE   apptainer/singularity .sif; VLMTUNE_APPTAINER_BINDS (src[:dst][,...])
#   VLMTUNE_WORKDIR           where the driver runs (default: the submit dir; /app inside the image)
#   VLMTUNE_IFACE             take node IPs from this interface (e.g. ib0) instead of `hostname --ip-address`
#   VLMTUNE_GPUS_PER_NODE     GPUs Ray advertises per node (default: --gpus-per-node, else the batch node's)
#   VLMTUNE_RAY_TMPDIR        base of the per-job Ray temp dirs (default /tmp; keep the path short)
#   VLMTUNE_RAY_WAIT_S        seconds to wait for all nodes to join (default 300)
#   VLMTUNE_RAY_HEAD_ARGS / VLMTUNE_RAY_WORKER_ARGS   extra `ray start` flags (word-split)
#   VLMTUNE_REQUEUE           1 (default): a run stopped by SIGTERM after its checkpoint (exit 75) requeues
#                             its job (`scontrol requeue`), which resumes from there; 0: the job just ends
#   RAY_PORT (6379), RAY_DASHBOARD_PORT (8265), RAY_CLIENT_SERVER_PORT (10001)   head ports
#   RAY_AUTH_MODE             token (default) or disabled; with token, a fresh RAY_AUTH_TOKEN is made per
#                             job unless one is set, and reaches every node and the driver through srun.

_vlmtune_log() { printf '[vlmtune %(%H:%M:%S)T] %s\n' -1 "$*"; }
_vlmtune_die() { printf '[vlmtune] error: %s\n' "$*" >&2; exit 1; }

_VLMTUNE_STEP_PIDS=()
_VLMTUNE_STEP_NAMES=()
_VLMTUNE_DRIVER_PID=""

# vlmtune_config_args SCRIPT DEFAULT_CONFIG [CONFIG] [section.key=value ...]
# The config and overrides of a job from its script's arguments: CONFIG is the first argument unless that
# one is an override (has a `=`); without it, DEFAULT_CONFIG. Sets VLMTUNE_CONFIG and VLMTUNE_OVERRIDES and
# logs the config it resolved; outside a container a missing config fails here, before Ray starts.
vlmtune_config_args() {
    local script=$1 default=$2; shift 2
    local usage="usage: sbatch [sbatch options] slurm/$script [CONFIG] [section.key=value ...]   (default CONFIG: $default)"
    case ${1:-} in
        -h | --help) echo "$usage"; exit 0 ;;
        -*) echo "$usage" >&2; exit 2 ;;
    esac
    local how="from the arguments"
    if [[ $# -gt 0 && $1 != *=* ]]; then
        VLMTUNE_CONFIG=$1
        shift
    else
        VLMTUNE_CONFIG=$default
        how="the default: no CONFIG argument"
    fi
    VLMTUNE_OVERRIDES=("$@")
    local shown=$VLMTUNE_CONFIG
    if [[ -n ${VLMTUNE_CONTAINER_IMAGE:-}${VLMTUNE_APPTAINER_IMAGE:-} ]]; then
        how+="; a path inside the container, from ${VLMTUNE_WORKDIR:-/app}"
    else
        local base=${VLMTUNE_WORKDIR:-$PWD}
        [[ $shown == /* ]] || shown=$base/$shown
        [[ -f $shown ]] || _vlmtune_die "config $VLMTUNE_CONFIG not found (relative paths start at $base)"
    fi
    _vlmtune_log "config: $shown ($how)"
    _vlmtune_log "overrides: ${VLMTUNE_OVERRIDES[*]:-none}"
}

# How commands run on the nodes: a venv on PATH, a pyxis container, or an apptainer image.
_vlmtune_setup_runtime() {
    _VLMTUNE_SRUN_CONTAINER=()
    _VLMTUNE_PREFIX=()
    if [[ -n ${VLMTUNE_CONTAINER_IMAGE:-} ]]; then
        _VLMTUNE_SRUN_CONTAINER=(--container-image="$VLMTUNE_CONTAINER_IMAGE"
                                 --container-workdir="${VLMTUNE_WORKDIR:-/app}")
        [[ -n ${VLMTUNE_CONTAINER_MOUNTS:-} ]] &&
            _VLMTUNE_SRUN_CONTAINER+=(--container-mounts="$VLMTUNE_CONTAINER_MOUNTS")
    elif [[ -n ${VLMTUNE_APPTAINER_IMAGE:-} ]]; then
        _VLMTUNE_PREFIX=(apptainer exec --nv --pwd "${VLMTUNE_WORKDIR:-/app}")
        [[ -n ${VLMTUNE_APPTAINER_BINDS:-} ]] && _VLMTUNE_PREFIX+=(--bind "$VLMTUNE_APPTAINER_BINDS")
        _VLMTUNE_PREFIX+=("$VLMTUNE_APPTAINER_IMAGE")
    elif [[ -n ${VLMTUNE_VENV:-} ]]; then
        [[ -x $VLMTUNE_VENV/bin/python ]] || _vlmtune_die "VLMTUNE_VENV=$VLMTUNE_VENV has no bin/python"
        export PATH="$VLMTUNE_VENV/bin:$PATH"
        export VIRTUAL_ENV="$VLMTUNE_VENV"
    fi
    if [[ -z ${VLMTUNE_CONTAINER_IMAGE:-}${VLMTUNE_APPTAINER_IMAGE:-} && -n ${VLMTUNE_WORKDIR:-} ]]; then
        cd "$VLMTUNE_WORKDIR" || _vlmtune_die "VLMTUNE_WORKDIR=$VLMTUNE_WORKDIR does not exist"
    fi
}

# srun one task on one node: _vlmtune_on NODE [srun flags...] -- command...
_vlmtune_on() {
    local node=$1; shift
    local flags=()
    while [[ $# -gt 0 && $1 != -- ]]; do flags+=("$1"); shift; done
    shift
    srun --nodes=1 --ntasks=1 -w "$node" "${flags[@]}" "${_VLMTUNE_SRUN_CONTAINER[@]}" \
        "${_VLMTUNE_PREFIX[@]}" "$@"
}

# "node ip" for every node of the job, from one srun step (one task per node), on the host, not in the
# container: only the address is wanted. First IPv4 of `hostname --ip-address`, or of VLMTUNE_IFACE.
_vlmtune_node_ips() {
    local cmd='hostname --ip-address'
    [[ -n ${VLMTUNE_IFACE:-} ]] && cmd="ip -4 -o addr show dev ${VLMTUNE_IFACE} | awk '{print \$4}' | cut -d/ -f1"
    # shellcheck disable=SC2016  # expanded by the task's shell
    srun --nodes="$1" --ntasks="$1" --ntasks-per-node=1 --overlap bash -c \
        'echo "$SLURMD_NODENAME $('"$cmd"' | tr " " "\n" | grep -m1 -E "^[0-9]+(\.[0-9]+){3}$")"'
}

# Wait for PID while every Ray step stays alive; fail fast (naming the node) if one dies.
_vlmtune_wait_alive() {
    local pid=$1 i
    while kill -0 "$pid" 2>/dev/null; do
        for i in "${!_VLMTUNE_STEP_PIDS[@]}"; do
            if ! kill -0 "${_VLMTUNE_STEP_PIDS[$i]}" 2>/dev/null; then
                kill -TERM "$pid" 2>/dev/null || true
                _vlmtune_die "Ray on ${_VLMTUNE_STEP_NAMES[$i]} exited before the cluster was ready (see its output above)"
            fi
        done
        sleep 1
    done
    wait "$pid"
}

_vlmtune_cleanup() {
    local rc=$? pid deadline
    trap - EXIT INT TERM
    local pids=()
    [[ -n $_VLMTUNE_DRIVER_PID ]] && pids+=("$_VLMTUNE_DRIVER_PID")
    # Workers first, head last.
    for ((i = ${#_VLMTUNE_STEP_PIDS[@]} - 1; i >= 0; i--)); do pids+=("${_VLMTUNE_STEP_PIDS[$i]}"); done
    if [[ ${#pids[@]} -gt 0 ]]; then
        _vlmtune_log "stopping the Ray steps this job started (exit code $rc)"
        for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
        deadline=$((SECONDS + 60))
        for pid in "${pids[@]}"; do
            while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.5; done
            kill -KILL "$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || true
        done
    fi
    if ((rc == 75)) && [[ ${VLMTUNE_REQUEUE:-1} == 1 ]]; then  # errors.Stopped: checkpoint saved on SIGTERM
        _vlmtune_log "requeueing job $SLURM_JOB_ID: its next run resumes from that checkpoint"
        scontrol requeue "$SLURM_JOB_ID" ||
            _vlmtune_log "could not requeue (is the job --requeue, JobRequeue=1?): submit again to resume"
    fi
    exit "$rc"
}

# TERM to this script while the driver runs: passed to the driver's step only, as SIGUSR1 (the driver's other
# stop signal: Slurm ends a step it sends TERM to, driver included). Ray's steps keep running while the
# workers checkpoint. A job being cancelled (its steps, Ray's included, get the TERM too) just ends.
_vlmtune_forward_term() {
    local state step
    state=$(squeue --jobs="$SLURM_JOB_ID" --noheader --format=%T 2>/dev/null || true)
    step=$(squeue --steps --jobs="$SLURM_JOB_ID" --noheader --format='%i %j' 2>/dev/null |
        awk '$2 == "vlmtune-driver" {print $1; exit}' || true)
    [[ $state == RUNNING && -n $step ]] || exit 143
    _vlmtune_log "SIGTERM: the driver (step $step) stops after the workers save a checkpoint"
    # on a multi-node job scancel also reports "Invalid job id" from the nodes the step does not run on
    scancel --signal=USR1 "$step" || true
}

# The readiness check and config pre-flight, run with the job's Python on the head node. Exit code 3: the
# cluster is up but the config was rejected (invalid, or too big for the allocation).
# shellcheck disable=SC2016
_VLMTUNE_READY_PY='
import os, sys, time
want_nodes, want_gpus, timeout, mode = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
job_args = sys.argv[5:]
import ray
ray.init(address=os.environ["RAY_ADDRESS"], logging_level="ERROR", log_to_driver=False)
deadline = time.monotonic() + timeout
while True:
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    res = ray.cluster_resources()
    cpus, gpus = res.get("CPU", 0.0), res.get("GPU", 0.0)
    if len(nodes) >= want_nodes and gpus >= want_gpus:
        break
    if time.monotonic() > deadline:
        sys.exit(f"error: after {timeout:.0f} s Ray has {len(nodes)}/{want_nodes} nodes and {gpus:g}/{want_gpus:g} GPUs")
    time.sleep(1)
print(f"ray cluster ready: {len(nodes)} nodes, {cpus:g} CPUs, {gpus:g} GPUs", flush=True)
ray.shutdown()
if mode == "train":
    from vlmtune.config import ConfigError, load_config
    path, overrides, i = None, [], 1
    while i < len(job_args):
        a = job_args[i]
        if a == "--config" and i + 1 < len(job_args):
            path, i = job_args[i + 1], i + 2
            continue
        if a.startswith("--config="):
            path = a.split("=", 1)[1]
        elif not a.startswith("-"):
            overrides.append(a)
        i += 1
    try:
        c = load_config(path, overrides).cluster
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    low, high = c.worker_range  # an elastic run needs its minimum to start
    need_cpus = low * c.cpus_per_worker
    need_gpus = low * c.gpus_per_worker if c.use_gpu else 0.0
    shown = f"{low}" if low == high else f"at least {low} (up to {high})"
    print(f"training needs {shown} workers: {need_cpus:g} CPUs, {need_gpus:g} GPUs", flush=True)
    if need_gpus > gpus or need_cpus > cpus:
        print(f"error: cluster.num_workers={c.num_workers} x (cpus_per_worker={c.cpus_per_worker:g}, "
              f"gpus_per_worker={c.gpus_per_worker:g}, use_gpu={c.use_gpu}) does not fit {cpus:g} CPUs / "
              f"{gpus:g} GPUs: change the config or the sbatch --nodes/--gpus-per-node/--cpus-per-task",
              file=sys.stderr)
        sys.exit(3)
    if c.use_gpu and high * c.gpus_per_worker < gpus:
        print(f"warning: {gpus - high * c.gpus_per_worker:g} of {gpus:g} GPUs stay idle "
              f"(cluster.num_workers={c.num_workers})", flush=True)
'

# vlmtune_ray_job MODE DRIVER_ARGS...   (MODE: train | prepare)
vlmtune_ray_job() {
    local mode=$1; shift
    : "${SLURM_JOB_ID:?run this script with sbatch (or inside an salloc allocation)}"
    _vlmtune_setup_runtime

    local nodes
    mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    [[ ${#nodes[@]} -gt 0 ]] || _vlmtune_die "no nodes in SLURM_JOB_NODELIST=${SLURM_JOB_NODELIST:-}"
    local n=${#nodes[@]} head=${nodes[0]}
    local cpus=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}
    local gpus=${VLMTUNE_GPUS_PER_NODE:-${SLURM_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}}
    gpus=${gpus##*:}  # --gpus-per-node=a100:8 -> 8
    local port=${RAY_PORT:-6379}
    local tmp_base=${VLMTUNE_RAY_TMPDIR:-/tmp}
    local wait_s=${VLMTUNE_RAY_WAIT_S:-300}

    export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
    if [[ $RAY_AUTH_MODE == token && -z ${RAY_AUTH_TOKEN:-} ]]; then
        RAY_AUTH_TOKEN=$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')
        export RAY_AUTH_TOKEN
    fi
    # Training has no use for Ray's 30 s drain on SIGTERM; tear down promptly.
    export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-0}
    export RAY_USAGE_STATS_ENABLED=${RAY_USAGE_STATS_ENABLED:-0}
    export PYTHONUNBUFFERED=1

    trap _vlmtune_cleanup EXIT
    trap 'exit 143' TERM
    trap 'exit 130' INT

    local -A ips=()
    local name addr
    while read -r name addr; do
        [[ -n $name ]] && ips[$name]=$addr
    done < <(_vlmtune_node_ips "$n" || true)
    for name in "${nodes[@]}"; do
        [[ -n ${ips[$name]:-} ]] || _vlmtune_die "could not find an IPv4 address of $name (set VLMTUNE_IFACE)"
    done
    local head_ip=${ips[$head]}
    export RAY_ADDRESS="$head_ip:$port"
    _vlmtune_log "job $SLURM_JOB_ID: $n node(s) [${nodes[*]}], $cpus CPUs + $gpus GPUs per node; head $head ($RAY_ADDRESS), auth $RAY_AUTH_MODE"

    # shellcheck disable=SC2086  # extra args are meant to be word-split
    _vlmtune_on "$head" -- ray start --head --node-ip-address="$head_ip" --port="$port" \
        --dashboard-host=0.0.0.0 --dashboard-port="${RAY_DASHBOARD_PORT:-8265}" \
        --ray-client-server-port="${RAY_CLIENT_SERVER_PORT:-10001}" \
        --num-cpus="$cpus" --num-gpus="$gpus" --temp-dir="$tmp_base/ray-$SLURM_JOB_ID-0" \
        ${VLMTUNE_RAY_HEAD_ARGS:-} --block &
    _VLMTUNE_STEP_PIDS+=($!); _VLMTUNE_STEP_NAMES+=("$head (head)")

    # Workers can only join once the head's GCS port accepts connections.
    local deadline=$((SECONDS + wait_s))
    until (exec 3<>"/dev/tcp/$head_ip/$port") 2>/dev/null; do
        kill -0 "${_VLMTUNE_STEP_PIDS[0]}" 2>/dev/null || _vlmtune_die "ray start --head on $head failed (see above)"
        ((SECONDS < deadline)) || _vlmtune_die "the Ray head did not open $RAY_ADDRESS within $wait_s s"
        sleep 1
    done

    local i node ip
    for ((i = 1; i < n; i++)); do
        node=${nodes[$i]}
        ip=${ips[$node]}
        # shellcheck disable=SC2086
        _vlmtune_on "$node" -- ray start --address="$RAY_ADDRESS" --node-ip-address="$ip" \
            --num-cpus="$cpus" --num-gpus="$gpus" --temp-dir="$tmp_base/ray-$SLURM_JOB_ID-$i" \
            ${VLMTUNE_RAY_WORKER_ARGS:-} --block &
        _VLMTUNE_STEP_PIDS+=($!); _VLMTUNE_STEP_NAMES+=("$node")
    done

    _vlmtune_on "$head" --overlap -- python -c "$_VLMTUNE_READY_PY" "$n" "$((n * gpus))" \
        "$((deadline > SECONDS ? deadline - SECONDS : 1))" "$mode" "$@" &
    local ready=0
    _vlmtune_wait_alive $! || ready=$?
    if ((ready == 3)); then
        _vlmtune_die "the config was rejected before training started (see above)"
    elif ((ready != 0)); then
        _vlmtune_die "the Ray cluster did not come up (see above)"
    fi

    _vlmtune_log "running: python $*"
    _vlmtune_on "$head" --overlap --job-name=vlmtune-driver -- python "$@" &
    _VLMTUNE_DRIVER_PID=$!
    trap _vlmtune_forward_term TERM
    local rc
    while :; do  # a trapped TERM ends `wait` early: wait on until the driver itself exits
        rc=0
        wait "$_VLMTUNE_DRIVER_PID" || rc=$?
        if ((rc <= 128)) || ! kill -0 "$_VLMTUNE_DRIVER_PID" 2>/dev/null; then break; fi
    done
    trap 'exit 143' TERM
    _VLMTUNE_DRIVER_PID=""
    _vlmtune_log "driver exited with code $rc"
    return "$rc"
}
