#!/bin/bash
# Catalog -> WebDataset shards on a multi-node Slurm allocation: every node fetches and resizes images
# (Ray Data tasks), the driver on the first node writes shards + manifest.json to data.shards.dir.
#
#   sbatch slurm/prepare.sh                        # the default recipe, configs/phi3v-burberry-lora.yaml
#   sbatch slurm/prepare.sh [CONFIG] [section.key=value ...]
#   sbatch --nodes=4 slurm/prepare.sh configs/phi3v-burberry-lora.yaml data.shards.dir=/shared/vlmtune/shards
#
# Like slurm/train.sh, the job log starts with the config it resolved (`config: <path>`); without a CONFIG
# (no argument, or overrides only) it is the same default recipe as for training.
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

cd "${SLURM_SUBMIT_DIR:-$PWD}"
# shellcheck source=slurm/ray-cluster.sh
source "${VLMTUNE_SLURM_DIR:-${SLURM_SUBMIT_DIR:-$PWD}/slurm}/ray-cluster.sh"

vlmtune_config_args prepare.sh configs/phi3v-burberry-lora.yaml "$@"
vlmtune_ray_job prepare jobs/prepare_data.py --config "$VLMTUNE_CONFIG" "${VLMTUNE_OVERRIDES[@]}"
