"""Full-parameter SFT launcher: Hydra config -> plan -> local or Slurm ranks -> DeepSpeed ZeRO-3."""
