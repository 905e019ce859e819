"""Train, sample or evaluate a diffusion model: the command line (diffusion_jax/experiment/cli.py).

  python main.py --config=shapes                      # train (resumes from --workdir)
  python main.py --config=shapes --mode=sample        # samples from the latest checkpoint
  python main.py --workdir=runs/shapes --mode=sample  # the same, from the run's config.json
  python main.py --config=cifar10 --config.train.batch_size=64 --workdir=runs/c10

`--config=NAME` reads configs/NAME.py (a path to a .py file also works); `--config.a.b=value`
overrides any field. The default workdir is runs/NAME. Installed with pip, the same command is
`diffusion-jax`.

Several processes (a TPU pod, a GPU cluster) each run the same command; runs started by srun,
mpirun or with JAX_COORDINATOR_ADDRESS connect by themselves, Cloud TPU VM pod slices with
--distributed (see the README, "Many devices and TPU pods").
"""

from diffusion_jax.experiment import cli

if __name__ == "__main__":
  cli.run()
