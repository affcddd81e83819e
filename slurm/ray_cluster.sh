#!/usr/bin/env bash
# Ray cluster on a Slurm allocation: head on the first node, one worker per other node, started with
# srun so each runs inside the job's cgroup. Source this file, then:
#
#   ray_cluster_start GPUS_PER_NODE LOG_DIR      # head + workers (background job steps)
#   ray_cluster_wait  EXPECTED_GPUS              # until Ray sees every GPU (or RAY_WAIT_TIMEOUT_S)
#   ray_cluster_stop                             # ray stop on every node, end the job steps
#
# Settings (environment): RAY_PORT (6379), RAY_HEAD_IP (default: the head node's address as
# `hostname --ip-address` reports it there), RAY_CPUS_PER_NODE (default: SLURM_CPUS_ON_NODE),
# RAY_WAIT_TIMEOUT_S (900), RAY_WAIT_POLL_S (5), PYTHON (python).
# srun options are written --name=value throughout (the tests' stand-in srun relies on it).

RAY_PORT="${RAY_PORT:-6379}"
RAY_WAIT_TIMEOUT_S="${RAY_WAIT_TIMEOUT_S:-900}"
RAY_WAIT_POLL_S="${RAY_WAIT_POLL_S:-5}"
PYTHON="${PYTHON:-python}"
RAY_NODES=()
RAY_STEP_PIDS=()

ray_cluster_nodes() {
    # Hostnames of the allocation, one per line, in Slurm's order (the first is the head).
    scontrol show hostnames "${SLURM_JOB_NODELIST:?not inside a Slurm allocation}"
}

ray_cluster_start() {
    local gpus_per_node="$1" log_dir="$2"
    local cpus="${RAY_CPUS_PER_NODE:-${SLURM_CPUS_ON_NODE:-}}"
    local cpu_args=()
    if [[ -n "$cpus" ]]; then
        cpu_args=(--num-cpus="$cpus")
    fi
    mapfile -t RAY_NODES < <(ray_cluster_nodes)
    if [[ ${#RAY_NODES[@]} -eq 0 ]]; then
        echo "ray_cluster: no nodes in SLURM_JOB_NODELIST=${SLURM_JOB_NODELIST}" >&2
        return 1
    fi
    local head="${RAY_NODES[0]}"
    if [[ -z "${RAY_HEAD_IP:-}" ]]; then
        RAY_HEAD_IP="$(srun --nodes=1 --ntasks=1 --nodelist="$head" hostname --ip-address | awk '{print $1}')"
    fi
    export RAY_ADDRESS="${RAY_HEAD_IP}:${RAY_PORT}"
    mkdir -p "$log_dir"
    echo "ray_cluster: head ${head} (${RAY_ADDRESS}), ${#RAY_NODES[@]} node(s) x ${gpus_per_node} GPU(s)"

    srun --nodes=1 --ntasks=1 --nodelist="$head" --overlap \
        ray start --head --node-ip-address="$RAY_HEAD_IP" --port="$RAY_PORT" \
        --num-gpus="$gpus_per_node" "${cpu_args[@]}" --dashboard-host=0.0.0.0 --block \
        >"$log_dir/ray_head_${head}.log" 2>&1 &
    RAY_STEP_PIDS+=("$!")
    sleep "${RAY_HEAD_SETTLE_S:-10}"  # workers that start before the head's GCS is up give up

    local node
    for node in "${RAY_NODES[@]:1}"; do
        srun --nodes=1 --ntasks=1 --nodelist="$node" --overlap \
            ray start --address="$RAY_ADDRESS" --num-gpus="$gpus_per_node" "${cpu_args[@]}" --block \
            >"$log_dir/ray_worker_${node}.log" 2>&1 &
        RAY_STEP_PIDS+=("$!")
    done
}

ray_cluster_gpus() {
    # GPUs the running cluster reports (0 while it is still forming).
    "$PYTHON" -c "import ray; ray.init(address='auto', logging_level='ERROR'); print(int(ray.cluster_resources().get('GPU', 0)))" \
        2>/dev/null | tail -n 1
}

ray_cluster_wait() {
    local expected="$1" seen
    local deadline=$((SECONDS + RAY_WAIT_TIMEOUT_S))
    while true; do
        seen="$(ray_cluster_gpus || true)"
        if [[ "$seen" =~ ^[0-9]+$ ]] && ((seen >= expected)); then
            echo "ray_cluster: ${seen} GPUs visible to Ray"
            return 0
        fi
        if ((SECONDS >= deadline)); then
            echo "ray_cluster: only ${seen:-0} of ${expected} GPUs visible after ${RAY_WAIT_TIMEOUT_S}s;" \
                "see the ray_*.log files" >&2
            return 1
        fi
        sleep "$RAY_WAIT_POLL_S"
    done
}

ray_cluster_stop() {
    local node pid
    for node in "${RAY_NODES[@]}"; do
        srun --nodes=1 --ntasks=1 --nodelist="$node" --overlap ray stop --force >/dev/null 2>&1 || true
    done
    for pid in "${RAY_STEP_PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    RAY_NODES=()
    RAY_STEP_PIDS=()
}
