"""`cmboost train-jcd`: adversarial training of the joint classifier-discriminator.

A thin layer over cmboost.train_jcd.train_jcd; defaults are the released hyperparameters.
Works under torchrun (DDP; gloo on CPU, nccl on GPU). Rerunning the same command resumes.
"""

from __future__ import annotations

import argparse

from cmboost.cli.common import add_runtime_flags


def run(args: argparse.Namespace) -> int:
    from cmboost.train_jcd import TrainConfig, train_jcd

    config = TrainConfig(
        data=args.data, run_dir=args.run_dir, iters=args.iters, generated=list(args.generated or []),
        arch=args.arch, width=args.width, objective=args.objective, init=args.init, data_dir=args.data_dir,
        image_size=args.image_size, real_limit=args.real_limit, batch_size=args.batch_size,
        gen_batch_size=args.gen_batch_size, lr=args.lr, betas=tuple(args.betas),
        weight_decay=args.weight_decay, milestones=tuple(args.milestones), gamma=args.gamma,
        grad_clip=args.grad_clip, attack_norm=args.attack_norm,
        real_eps=args.real_eps, real_steps=args.real_steps, real_step_size=args.real_step_size,
        real_random_start=not args.no_real_random_start,
        gen_eps=args.gen_eps, gen_steps=args.gen_steps, gen_step_size=args.gen_step_size,
        gen_random_start=args.gen_random_start, gen_steps_every=args.gen_steps_every,
        gen_max_steps=args.gen_max_steps, attack_mode=args.attack_mode, seed=args.seed,
        device=args.device, precision=args.precision,
        channels_last={"auto": None, "on": True, "off": False}[args.channels_last],
        log_every=args.log_every, ckpt_every=args.ckpt_every)
    train_jcd(config)
    return 0


def add_parser(verbs) -> None:
    from cmboost.jcd import ARCHS
    from cmboost.losses import OBJECTIVES

    p = verbs.add_parser(
        "train-jcd", help="adversarially train the joint classifier-discriminator",
        description="Adversarial training of the joint classifier-discriminator on real data against "
                    "generated samples (docs/method.md §3). Defaults are the released hyperparameters. "
                    "Rerunning the same command resumes from the run directory's latest checkpoint.")
    p.add_argument("--data", required=True, help="real data: fmnist, imagenet64:PATH or folder:PATH")
    p.add_argument("--data-dir", help="folder with the Fashion-MNIST files (default: the system copy)")
    p.add_argument("--generated", nargs="+", metavar="NPZ",
                   help="generated samples (.npz with arr_1 = the labels they were generated for)")
    p.add_argument("--arch", choices=ARCHS, help="backbone (default: that of --init)")
    p.add_argument("--width", type=int, default=None, help="resnet_small: first-stage width (default 16)")
    p.add_argument("--objective", default="joint", choices=list(OBJECTIVES), help="training objective (default joint)")
    p.add_argument("--init", metavar="PATH", help="initial weights: ours, released, robustness-library or torchvision")
    p.add_argument("--iters", type=int, required=True, help="training iterations")
    p.add_argument("--run-dir", required=True, help="run directory (checkpoints, log.jsonl, model.safetensors)")
    p.add_argument("--image-size", type=int, help="resize/pad real images to this size (default: the generated size)")
    p.add_argument("--real-limit", type=int, help="use only the first N real images")
    p.add_argument("--gen-batch-size", type=int, help="global generated batch (default: --batch-size)")
    p.add_argument("--lr", type=float, default=1e-5, help="Adam learning rate (default 1e-5)")
    p.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.999), metavar=("B1", "B2"))
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--milestones", type=int, nargs="*", default=[4000], help="iterations where lr *= gamma")
    p.add_argument("--gamma", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clip (0 disables)")
    p.add_argument("--attack-norm", default="l2", choices=["l2", "linf"])
    p.add_argument("--real-eps", type=float, default=1.0)
    p.add_argument("--real-steps", type=int, default=2)
    p.add_argument("--real-step-size", type=float, default=0.5)
    p.add_argument("--no-real-random-start", action="store_true", help="start the real attack at x")
    p.add_argument("--gen-eps", type=float, default=100.0)
    p.add_argument("--gen-steps", type=int, default=5)
    p.add_argument("--gen-step-size", type=float, default=0.1)
    p.add_argument("--gen-random-start", action="store_true")
    p.add_argument("--gen-steps-every", type=int, default=1000,
                   help="one more generated-attack step every N iterations (0: never)")
    p.add_argument("--gen-max-steps", type=int, help="cap on the generated-attack steps")
    p.add_argument("--attack-mode", default="eval", choices=["eval", "train"],
                   help="model mode during the attacks (matters for BatchNorm backbones)")
    p.add_argument("--channels-last", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--ckpt-every", type=int, default=500)
    add_runtime_flags(p)
    # --batch-size here is the global real batch (split across processes), 128 as released.
    p.set_defaults(batch_size=128, run=run)
