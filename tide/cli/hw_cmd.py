"""``tide hw``: list and show hardware profiles."""

from __future__ import annotations

import argparse
import textwrap
from typing import Any

from tide.cli.common import add_json_flag, emit, format_table
from tide.hardware import HardwareProfile, list_profiles, load_profile


def register(subparsers) -> None:
    parser = subparsers.add_parser("hw", help="list and show hardware profiles",
                                   description="List the shipped hardware profiles or show one of them.")
    hw_subparsers = parser.add_subparsers(dest="hw_command", metavar="SUBCOMMAND", required=True)

    list_parser = hw_subparsers.add_parser("list", help="list the shipped hardware profiles")
    add_json_flag(list_parser)
    list_parser.set_defaults(func=run_list)

    show_parser = hw_subparsers.add_parser("show", help="show one hardware profile")
    show_parser.add_argument("profile", metavar="NAME|PATH",
                             help="a shipped profile name (see 'tide hw list') or the path of a profile JSON file")
    add_json_flag(show_parser)
    show_parser.set_defaults(func=run_show)


def _summary(profile: HardwareProfile) -> dict[str, Any]:
    return {
        "name": profile.name,
        "gpu": profile.gpu.name,
        "memory_gb": profile.gpu.memory_bytes / 1e9,
        "bf16_tflops": profile.gpu.bf16_dense_flops / 1e12,
        "hbm_gb_per_s": profile.gpu.hbm_bytes_per_s / 1e9,
        "link": profile.link.name,
        "h2d_pinned_gb_per_s": profile.link.h2d_pinned_bytes_per_s / 1e9,
        "host_cpu": profile.cpu.name,
        "kind": profile.provenance.kind,
    }


def run_list(args: argparse.Namespace) -> int:
    summaries = [_summary(load_profile(name)) for name in list_profiles()]
    header = ["name", "GPU", "memory GB", "bf16 TFLOPS", "HBM GB/s", "link", "pinned h2d GB/s", "host CPU"]
    rows = [[s["name"], s["gpu"], s["memory_gb"], s["bf16_tflops"], s["hbm_gb_per_s"], s["link"],
             s["h2d_pinned_gb_per_s"], s["host_cpu"]] for s in summaries]
    emit({"profiles": summaries}, format_table(rows, header), args.json)
    return 0


def _format_profile(profile: HardwareProfile) -> str:
    gpu, link, cpu, provenance = profile.gpu, profile.link, profile.cpu, profile.provenance
    lines = [
        f"profile      {profile.name} ({provenance.kind})",
        f"GPU          {gpu.name}: {gpu.memory_bytes / 1e9:.4g} GB, {gpu.bf16_dense_flops / 1e12:.4g} TFLOP/s "
        f"dense bf16 ({gpu.bf16_accumulate} accumulate), {gpu.hbm_bytes_per_s / 1e9:.4g} GB/s memory",
        f"link         {link.name}: pinned h2d {link.h2d_pinned_bytes_per_s / 1e9:.4g} GB/s, "
        f"d2h {link.d2h_pinned_bytes_per_s / 1e9:.4g} GB/s; pageable h2d "
        f"{link.h2d_pageable_bytes_per_s / 1e9:.4g} GB/s, d2h {link.d2h_pageable_bytes_per_s / 1e9:.4g} GB/s; "
        f"datasheet {link.datasheet_bytes_per_s / 1e9:.4g} GB/s per direction; latency {link.latency_s * 1e6:.4g} us",
        f"host CPU     {cpu.name}: {cpu.cores} cores, {cpu.expert_flops / 1e12:.4g} TFLOP/s sustained for "
        f"expert MLPs, {cpu.memory_bytes_per_s / 1e9:.4g} GB/s memory, {cpu.memory_bytes / 2**30:.4g} GiB",
        "efficiency   " + ", ".join(f"{key} {value:g}" for key, value in profile.efficiency.items()),
        "op overhead  " + ", ".join(f"{lane} {seconds * 1e6:g} us" for lane, seconds in profile.op_overhead_s.items()),
        f"shared cores {'yes' if profile.shared_cores else 'no'}",
    ]
    if profile.tables:
        for kind, table in profile.tables.items():
            lines.append(f"table        {kind}: {len(table.x)} points over {table.x_name} "
                         f"{table.x[0]:g} to {table.x[-1]:g}")
    else:
        lines.append("tables       none (roofline from the figures above)")
    if provenance.kind == "calibrated":
        lines.append(f"calibrated   {provenance.calibrated_at} on {provenance.host or 'an unnamed host'}"
                     + (f", devices {', '.join(provenance.device_names)}" if provenance.device_names else "")
                     + (f", {provenance.threads} threads" if provenance.threads else ""))
    lines.append(textwrap.fill(provenance.source, width=100, initial_indent="source       ",
                               subsequent_indent=" " * 13, break_on_hyphens=False))
    return "\n".join(lines)


def run_show(args: argparse.Namespace) -> int:
    profile = load_profile(args.profile)
    emit(profile.to_json(), _format_profile(profile), args.json)
    return 0
