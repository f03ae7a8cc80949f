#!/bin/bash
# Catalog -> WebDataset shards on a multi-node Slurm allocation: every node fetches and resizes images
# (Ray Data tasks), the driver on the first node writes shards + manifest.json to data.shards.dir.
#
#   sbatch slurm/prepare.sh CONFIG [section.key=value ...]
#   sbatch --nodes=4 slurm/prepare.sh configs/phi3v-burberry-lora.yaml data.shards.dir=/shared/vlmtune/shards
#
# Submit from the repository root. data.shards.dir must be on storage the training nodes see later.
# Re-running with the same settings resumes: finished shards are kept. Venv/container knobs are the same
# as for slurm/train.sh (see slurm/ray-cluster.sh).
#
#SBATCH --job-name=vlmtune-prepare
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=16
#SBATCH --time=04:00:00
#SBATCH --output=slurm-%x-%j.out
#SBATCH --signal=B:TERM@60

set -euo pipefail

if [[ $# -lt 1 || $1 == -* ]]; then
    echo "usage: sbatch [sbatch options] slurm/prepare.sh CONFIG [section.key=value ...]" >&2
    exit 2
fi
config=$1; shift

cd "${SLURM_SUBMIT_DIR:-$PWD}"
# shellcheck source=slurm/ray-cluster.sh
source "${VLMTUNE_SLURM_DIR:-${SLURM_SUBMIT_DIR:-$PWD}/slurm}/ray-cluster.sh"

vlmtune_ray_job prepare jobs/prepare_data.py --config "$config" "$@"
