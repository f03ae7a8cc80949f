#!/bin/bash
# Fine-tune on a Slurm allocation of one node or more: a Ray cluster across them, then jobs/train.py on it.
#
#   sbatch slurm/train.sh                          # the default recipe, configs/phi3v-burberry-lora.yaml
#   sbatch slurm/train.sh [CONFIG] [section.key=value ...]
#   sbatch --nodes=4 slurm/train.sh configs/phi3v-burberry-lora.yaml cluster.num_workers=32
#
# The job log starts with the config it resolved (`config: <path>`) and the overrides. Without a CONFIG
# (no argument, or overrides only) it is configs/phi3v-burberry-lora.yaml: 8 GPU workers, which is what the
# #SBATCH defaults below allocate (1 node, 8 GPUs, 64 CPUs). Submit from the repository root (the job runs
# there; relative paths resolve against it). Every #SBATCH line is a default: options on the sbatch command
# line win. Ray Train needs one GPU per worker: keep cluster.num_workers x cluster.gpus_per_worker <=
# nodes x gpus-per-node (checked before training, as are the CPUs).
# cluster.storage_path must be on storage every node sees (NFS/Lustre/GPFS or s3://): checkpoints,
# the resolved config and the export land in <storage_path>/<run_name>/. Submitting again with the same
# run_name and storage_path resumes from the latest checkpoint.
#
# Preemption, node failures, time limits: the job is requeueable (--requeue; the log keeps every attempt,
# --open-mode=append). SIGTERM to this script (120 s before the time limit, --signal=B:TERM@120, or
# `scancel --batch --signal=TERM JOBID`) reaches the driver alone: the workers save a checkpoint after their
# step, the driver exits 75 and the job requeues itself to resume there (VLMTUNE_REQUEUE=0: it just ends).
# A job that Slurm requeues (PreemptMode=REQUEUE, a failed node) resumes from the latest complete
# checkpoint, losing at most the steps since it (train.checkpoint_every).
#
# Software on the nodes (see slurm/ray-cluster.sh for every knob):
#   venv:      VLMTUNE_VENV=/shared/venvs/vlmtune sbatch slurm/train.sh ...
#   pyxis:     VLMTUNE_CONTAINER_IMAGE=/shared/images/vlmtune.sqsh \
#              VLMTUNE_CONTAINER_MOUNTS=/shared/vlmtune:/shared/vlmtune sbatch slurm/train.sh /app/configs/...
#              (import once with `enroot import -o /shared/images/vlmtune.sqsh docker://REGISTRY/vlmtune:TAG`)
#   apptainer: VLMTUNE_APPTAINER_IMAGE=/shared/images/vlmtune.sif \
#              VLMTUNE_APPTAINER_BINDS=/shared/vlmtune sbatch slurm/train.sh /app/configs/...
#              (build once with `apptainer build vlmtune.sif docker://REGISTRY/vlmtune:TAG`)
#   In a container the driver runs in /app (the image's copy of the repository); give configs and
#   storage paths that exist inside it (image paths or mounted shared storage).
#
#SBATCH --job-name=vlmtune-train
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%x-%j.out
#SBATCH --signal=B:TERM@120
#SBATCH --requeue
#SBATCH --open-mode=append

set -euo pipefail

# --- Interconnect (uncomment what fits your fabric; exported variables reach every Ray worker) ------
# export NCCL_DEBUG=WARN                     # INFO to see which transport/NIC NCCL picked
# export NCCL_SOCKET_IFNAME=ib0              # or eth0/ens*: the interface for NCCL's bootstrap/socket traffic
# export GLOO_SOCKET_IFNAME=ib0              # same for gloo (used by Ray Train's process group setup)
# export NCCL_IB_HCA=mlx5                    # restrict to these InfiniBand HCAs (mlx5_0,mlx5_1,...)
# export NCCL_IB_DISABLE=1                   # no InfiniBand: TCP sockets only (slow, but a sanity check)
# export NCCL_NET_GDR_LEVEL=PHB              # GPUDirect RDMA distance; leave unset unless tuning
# export TORCH_NCCL_ASYNC_ERROR_HANDLING=1   # fail fast on a dead peer instead of hanging
# export VLMTUNE_IFACE=ib0                   # Ray node IPs from this interface (when hostnames resolve to 127.0.1.1)
# export HF_HOME=/shared/cache/huggingface   # one model download for all nodes

cd "${SLURM_SUBMIT_DIR:-$PWD}"
# shellcheck source=slurm/ray-cluster.sh
source "${VLMTUNE_SLURM_DIR:-${SLURM_SUBMIT_DIR:-$PWD}/slurm}/ray-cluster.sh"

vlmtune_config_args train.sh configs/phi3v-burberry-lora.yaml "$@"
vlmtune_ray_job train jobs/train.py --config "$VLMTUNE_CONFIG" "${VLMTUNE_OVERRIDES[@]}"
