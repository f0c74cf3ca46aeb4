#!/bin/bash
# Train across several nodes with SLURM: one torchrun per node, c10d rendezvous on the
# first node. Submit with:  sbatch examples/slurm.sh
#SBATCH --job-name=baobab
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=04:00:00

set -euo pipefail
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export OMP_NUM_THREADS=8

# Every node runs the same command; torchrun's agents meet at head_node:29500. After a
# failure they restart the workers (up to 3 times), which resume from the last checkpoint.
srun baobab train \
    --nnodes "$SLURM_JOB_NUM_NODES" \
    --nproc-per-node 8 \
    --max-restarts 3 \
    --rdzv-id "$SLURM_JOB_ID" \
    --rdzv-backend c10d \
    --rdzv-endpoint "$head_node:29500" \
    --recipe quickstart \
    --model.name llama-1b \
    --parallel.dp_shard 8 --parallel.dp_replicate 2 \
    --train.run_dir "runs/$SLURM_JOB_ID"
