"""``tide calibrate``: measure the executor's ops on this machine and write a calibrated profile."""

from __future__ import annotations

import logging

from tide.cli.common import add_json_flag, emit, format_table
from tide.errors import InputError

logger = logging.getLogger(__name__)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "calibrate", help="measure the executor's ops here and write a calibrated hardware profile",
        description="Time every op kind of the offload engine on this machine at a range of sizes (tokens, "
                    "context, bytes), with warm-up runs apart and medians kept, then run the engine under every "
                    "policy to fit what those timings miss in a real pass. The profile's tables hold for the "
                    "model's shapes. On the CPU device the accelerator lane and the CPU lane share the cores: "
                    "the executor runs one op at a time there, and the profile says shared_cores, so the "
                    "simulator does the same.")
    parser.add_argument("--model", default=None, metavar="NAME|PATH",
                        help="checkpoint folder to calibrate for (default: the embedded 'tiny' model)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="accelerator (default: cuda when available, else cpu)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="PyTorch intra-op threads for the measurements, recorded in the profile and used by "
                             "'tide validate' (default: 1 on the CPU device, where one thread keeps timings "
                             "stable when other processes share the cores; PyTorch's default on CUDA)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer sizes, repeats and engine runs (under a minute on a 2-core machine)")
    parser.add_argument("--name", default=None, help="profile name (default: calibrated-DEVICE-MODEL)")
    parser.add_argument("--out", required=True, metavar="PROFILE.json", help="where to write the profile")
    add_json_flag(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    from tide.calibrate import calibrate
    from tide.hardware import save_profile

    if args.threads is not None and args.threads < 1:
        raise InputError("must be at least 1", field="--threads", value=args.threads)
    calibration = calibrate(model=args.model, device=args.device, threads=args.threads, quick=args.quick,
                            name=args.name, progress=True)
    save_profile(calibration.profile, args.out)
    logger.info("wrote %s", args.out)
    record = {"profile": args.out, "name": calibration.profile.name, **calibration.measurements}
    emit(record, _human(calibration, args.out), args.json)
    return 0


def _human(calibration, path: str) -> str:
    profile = calibration.profile
    measured = calibration.measurements
    link = profile.link
    lines = [
        f"wrote {path}: profile {profile.name}",
        f"device {measured['device']} ({profile.gpu.name}), {measured['threads']} intra-op thread(s), "
        f"shared cores {'yes' if profile.shared_cores else 'no'}, {measured['elapsed_s']:.1f} s "
        f"({measured['microbenchmark_s']:.1f} s of microbenchmarks)",
        f"copies: host to device {link.h2d_pinned_bytes_per_s / 1e9:.2f} GB/s pinned, "
        f"{link.h2d_pageable_bytes_per_s / 1e9:.2f} GB/s pageable; device to host "
        f"{link.d2h_pinned_bytes_per_s / 1e9:.2f} GB/s pinned, {link.d2h_pageable_bytes_per_s / 1e9:.2f} GB/s "
        f"pageable; latency {link.latency_s * 1e6:.1f} us",
        "fixed cost per op (us): " + ", ".join(f"{lane} {seconds * 1e6:.1f}"
                                               for lane, seconds in profile.op_overhead_s.items()),
        "",
    ]
    corrections = measured["engine_corrections"]
    rows = []
    for kind, table in profile.tables.items():
        correction = corrections.get(kind, {"scale": 1.0, "offset_s": 0.0})
        rows.append([kind, table.x_name, len(table.x), f"{table.x[0]:g} .. {table.x[-1]:g}",
                     f"{table.seconds[0] * 1e6:.1f} .. {table.seconds[-1] * 1e6:.1f}", correction["scale"],
                     correction["offset_s"] * 1e6])
    lines.append(format_table(rows, ["op kind", "x", "points", "x range", "us", "scale in place",
                                     "offset in place (us)"]))
    return "\n".join(lines)
