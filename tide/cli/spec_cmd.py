"""``tide spec show NAME|PATH``: a model's shape and derived figures."""

from __future__ import annotations

from tide.cli.common import add_json_flag, emit
from tide.spec import DTYPE_BYTES, list_specs, load_spec


def register(subparsers) -> None:
    parser = subparsers.add_parser("spec", help="show model specs")
    commands = parser.add_subparsers(dest="spec_command", metavar="SUBCOMMAND", required=True)
    show = commands.add_parser("show", help="show a spec's shape, parameter counts, expert bytes and FLOPs per token")
    show.add_argument("model", help=f"shipped name ({', '.join(list_specs())}), config.json path or checkpoint folder")
    show.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default=None,
                      help="dtype for byte figures (default: the config's torch_dtype)")
    add_json_flag(show)
    show.set_defaults(func=run_show)
    listing = commands.add_parser("list", help="list the shipped specs")
    listing.set_defaults(func=lambda args: print("\n".join(list_specs())) or 0)


def run_show(args) -> int:
    spec = load_spec(args.model)
    figures = spec.summary(args.dtype)
    flops = figures["flops_per_token"]
    human = "\n".join([
        f"{spec.name} ({spec.model_type}, config {spec.config_hash})",
        f"  layers            {spec.num_layers} ({spec.first_k_dense_replace} dense, {spec.num_moe_layers} MoE)",
        f"  hidden / heads    {spec.hidden_size} / {spec.num_attention_heads} q, {spec.num_key_value_heads} kv, "
        f"head_dim {spec.head_dim}",
        f"  experts           {spec.num_experts} routed (top-{spec.top_k}, {spec.n_group} groups, top "
        f"{spec.topk_group}), {spec.num_shared_experts} shared, width {spec.moe_intermediate_size}",
        f"  parameters        total {spec.total_params / 1e9:.3f}B, active {spec.active_params / 1e9:.3f}B, "
        f"embedding {spec.embedding_params / 1e9:.3f}B",
        f"  bytes ({figures['dtype']})   one expert {figures['expert_bytes'] / 2**20:.2f} MiB, non-expert "
        f"{figures['non_expert_bytes'] / 2**30:.2f} GiB, all experts {figures['all_experts_bytes'] / 2**30:.2f} GiB",
        f"  FLOPs per token   attention@1024 {flops['attention_at_context_1024']:.3g}, dense MLP "
        f"{flops['dense_mlp']:.3g}, shared expert {flops['shared_expert']:.3g}, routed expert "
        f"{flops['routed_expert']:.3g}",
    ])
    emit(figures, human, args.json)
    return 0
