"""`cmboost train-cm`: train an EDM teacher, or a consistency model by distillation (cd) or training (ct)."""

from __future__ import annotations

import argparse


def settings_from_args(args: argparse.Namespace, image_size: int, in_channels: int, num_classes: int):
    from cmboost.cm.sample import _parse_int_list
    from cmboost.cm.training import TrainSettings, small_unet_config

    unet = small_unet_config(image_size=image_size, in_channels=in_channels, num_classes=num_classes,
                             model_channels=args.model_channels,
                             channel_mult=_parse_int_list(args.channel_mult, "--channel-mult"),
                             num_res_blocks=args.num_res_blocks,
                             attention_resolutions=_parse_int_list(args.attention_resolutions, "--attention-resolutions"),
                             dropout=args.dropout, num_head_channels=args.num_head_channels)
    lr = args.lr if args.lr is not None else {"edm": 2e-4, "cd": 4e-5, "ct": 2e-4}[args.mode]
    dist = args.distance or ("pseudo-huber" if args.mode == "ct" else "l2")
    return TrainSettings(mode=args.mode, iters=args.iters, unet=unet, batch_size=args.batch_size, lr=lr,
                         warmup=args.warmup, grad_clip=args.grad_clip, ema_rate=args.ema_rate, seed=args.seed,
                         teacher=args.teacher, num_scales=args.num_scales, target_ema=args.target_ema,
                         start_scales=args.start_scales, end_scales=args.end_scales, distance=dist, data=args.data)


def run(args: argparse.Namespace) -> int:
    from cmboost.cm.training import train
    from cmboost.data import load_dataset
    from cmboost.errors import UserInputError
    from cmboost.runtime import init_distributed, resolve_device, resolve_precision

    if args.mode == "cd" and not args.teacher:
        raise UserInputError("--mode cd needs --teacher (the model.safetensors of a 'train-cm --mode edm' run)")
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    images, labels, num_classes = load_dataset(args.data, "train", data_dir=args.data_dir,
                                               image_size=32 if args.data.startswith(("fmnist", "fashion-mnist")) else None)
    if images.shape[2] != images.shape[3] or images.shape[2] % 2 ** (len(args.channel_mult.split(",")) - 1):
        raise UserInputError(f"--data {args.data}: images are {images.shape[2]}x{images.shape[3]}; need square sizes "
                             f"divisible by 2^(levels-1)")
    settings = settings_from_args(args, images.shape[2], images.shape[1], num_classes)
    init_distributed(device)
    train(settings, args.run_dir, images, labels, device, precision, save_every=args.save_every,
          log_every=args.log_every, progress=not args.no_progress)
    return 0


def add_parser(verbs) -> None:
    from cmboost.cli.common import add_runtime_flags

    p = verbs.add_parser(
        "train-cm", help="train an EDM teacher (edm), or a consistency model by distillation (cd) or training (ct)",
        description="Class-conditional training on small data (Fashion-MNIST padded to 32x32 by default). "
                    "Keeps an EMA, saves run-dir/state.safetensors every --save-every iterations and exports "
                    "run-dir/model.safetensors (what 'cmboost sample --model' takes). Rerun the same command to "
                    "resume. Works under torchrun (DDP).")
    p.add_argument("--mode", required=True, choices=["edm", "cd", "ct"])
    p.add_argument("--data", default="fmnist", help="fmnist (default), imagenet64:PATH or folder:PATH")
    p.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST idx .gz files")
    p.add_argument("--run-dir", required=True, help="folder for state, exported model and log.jsonl")
    p.add_argument("--iters", type=int, required=True, help="total training iterations")
    p.add_argument("--teacher", default=None, help="cd: the EDM teacher's model.safetensors")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default edm 2e-4, cd 4e-5, ct 2e-4)")
    p.add_argument("--warmup", type=int, default=100, help="linear learning-rate warm-up iterations")
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clip (0: off)")
    p.add_argument("--ema-rate", type=float, default=0.999, help="EMA of the exported weights")
    p.add_argument("--num-scales", type=int, default=18, help="cd: Karras levels N")
    p.add_argument("--target-ema", type=float, default=0.95, help="cd: EMA rate of the target network")
    p.add_argument("--start-scales", type=int, default=10, help="ct: initial N-1 (doubles in stages)")
    p.add_argument("--end-scales", type=int, default=160, help="ct: final N-1")
    p.add_argument("--distance", choices=["l2", "pseudo-huber"], default=None,
                   help="cd/ct distance (default: l2 for cd, pseudo-huber for ct)")
    p.add_argument("--model-channels", type=int, default=32)
    p.add_argument("--channel-mult", default="1,2,2")
    p.add_argument("--num-res-blocks", type=int, default=1)
    p.add_argument("--attention-resolutions", default="8", help="resolutions (pixels) with attention")
    p.add_argument("--num-head-channels", type=int, default=32)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--save-every", type=int, default=250, help="iterations between saved states / exports")
    p.add_argument("--log-every", type=int, default=25, help="iterations between log.jsonl records")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_runtime_flags(p)
    p.set_defaults(run=run, batch_size=64)
