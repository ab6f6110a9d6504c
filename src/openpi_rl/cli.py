"""`openpi-rl` command line: one subcommand per role (`train` now; the service roles later)."""

from __future__ import annotations

import logging
import sys

import structlog
import tyro


def _seed_style_args(argv: list[str]) -> list[str]:
    """The seed writes `--model.pi0_fast`; tyro names that subcommand `model:pi0_fast`. With a
    single model registered there is no subcommand, and the flag only confirms the default."""
    from openpi_rl.train.train_ppo import MODEL_NAMES

    out = []
    for a in argv:
        name = a.removeprefix("--model.")
        if a.startswith("--model.") and name in MODEL_NAMES:
            if len(MODEL_NAMES) > 1:
                out.append(f"model:{name}")
        else:
            out.append(a)
    return out


def configure_logging(json: bool = False, level: int = logging.INFO) -> None:
    """structlog: readable console lines for CLIs, JSON lines for services."""
    renderer = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
    )


def train_main(argv: list[str] | None = None) -> int:
    from openpi_rl.train.train_ppo import PPOTrainConfig, train

    config = tyro.cli(
        PPOTrainConfig,
        args=_seed_style_args(sys.argv[1:] if argv is None else argv),
        prog="openpi-rl train",
        description="Train a policy with PPO on a gymnasium task or a reward provider.",
        config=(tyro.conf.CascadeSubcommandArgs,),
    )
    configure_logging()
    log = structlog.get_logger("openpi_rl.train")
    result = train(config)
    log.info(
        "done",
        updates=result.updates,
        env_steps=result.env_steps,
        mean_return_last_20=round(result.mean_return(), 2),
        steps_to_target=result.steps_to_target,
        wall_s=round(result.wall_s, 2),
    )
    return 0


def serve_main(argv: list[str] | None = None) -> int:
    """`openpi-rl serve [--config FILE] [flags]`: the policy server."""
    from openpi_rl import config_file
    from openpi_rl.policy_server.serve import ServeConfig, serve

    argv = list(sys.argv[1:] if argv is None else argv)
    default = ServeConfig()
    if "--config" in argv:
        i = argv.index("--config")
        default = config_file.load(ServeConfig, argv[i + 1])
        del argv[i : i + 2]
    config = tyro.cli(
        ServeConfig,
        args=_seed_style_args(argv),
        default=default,
        prog="openpi-rl serve",
        config=(tyro.conf.CascadeSubcommandArgs,),
    )
    configure_logging(json=not sys.stderr.isatty())
    return serve(config)


def bridge_main(argv: list[str] | None = None) -> int:
    """`openpi-rl bridge [--config FILE] [flags]`: the reward bridge and its pendant page."""
    from openpi_rl import config_file
    from openpi_rl.reward_bridge import BridgeConfig, serve

    argv = list(sys.argv[1:] if argv is None else argv)
    default = BridgeConfig()
    if "--config" in argv:
        i = argv.index("--config")
        default = config_file.load(BridgeConfig, argv[i + 1])
        del argv[i : i + 2]
    config = tyro.cli(BridgeConfig, args=argv, default=default, prog="openpi-rl bridge")
    configure_logging(json=not sys.stderr.isatty())
    return serve(config)


def learn_main(argv: list[str] | None = None) -> int:
    """`openpi-rl learn [--config FILE] [flags]`: the learner daemon (PPO on the replay,
    versioned checkpoints, ZMQ PUB notices)."""
    from openpi_rl import config_file
    from openpi_rl.daemon.learner import LearnerConfig, learn

    argv = list(sys.argv[1:] if argv is None else argv)
    default = LearnerConfig()
    if "--config" in argv:
        i = argv.index("--config")
        default = config_file.load(LearnerConfig, argv[i + 1])
        del argv[i : i + 2]
    config = tyro.cli(
        LearnerConfig,
        args=_seed_style_args(argv),
        default=default,
        prog="openpi-rl learn",
        config=(tyro.conf.CascadeSubcommandArgs,),
    )
    configure_logging(json=not sys.stderr.isatty())
    return learn(config)


def replay_main(argv: list[str] | None = None) -> int:
    """`openpi-rl replay stats DIR`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "stats":
        print("usage: openpi-rl replay stats DIR", file=sys.stderr)
        return 2
    from openpi_rl.replay import stats_main

    return stats_main(argv[1:])


COMMANDS = {
    "train": train_main,
    "serve": serve_main,
    "bridge": bridge_main,
    "learn": learn_main,
    "replay": replay_main,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(f"usage: openpi-rl {{{','.join(COMMANDS)}}} [--help]", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        return COMMANDS[argv[0]](argv[1:])
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
