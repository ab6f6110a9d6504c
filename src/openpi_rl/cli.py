"""`openpi-rl` command line: one subcommand per role (`serve`, `bridge`, `learn`), the supervisor
of all three (`daemon`), `train` (gym tasks), `check`, `replay`, `admin`, `demo`, `keys`,
`export-openpi` (a version back to openpi's checkpoint layout), `eval` (episodes of a version)."""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import os
import signal
import sys

import structlog
import tyro

from openpi_rl.logs import configure_logging


def _seed_style_args(argv: list[str]) -> list[str]:
    """The seed writes `--model.pi0_fast`; tyro names that subcommand `model:pi0_fast`. With a
    single model registered there is no subcommand, and the flag only confirms the default."""
    from openpi_rl.models.choice import MODEL_NAMES

    out = []
    for a in argv:
        name = a.removeprefix("--model.")
        if a.startswith("--model.") and name in MODEL_NAMES:
            if len(MODEL_NAMES) > 1:
                out.append(f"model:{name}")
        else:
            out.append(a)
    return out


def _file_config(cls: type, argv: list[str], role: str) -> object:
    """The default `cls` for tyro: `--config FILE` (the role's own TOML), or `--config FILE
    --section ROLE` (openpi-rl.toml, shared settings filled in; what the daemon and the systemd
    units run). Both options are removed from argv. A wrong file exits with EX_CONFIG (78),
    which neither the daemon nor systemd restarts."""
    from openpi_rl import config_file
    from openpi_rl.service.config import EX_CONFIG, ServiceFile

    if "--config" not in argv:
        return cls()
    i = argv.index("--config")
    path = argv[i + 1]
    del argv[i : i + 2]
    try:
        if "--section" not in argv:
            return config_file.load(cls, path)
        j = argv.index("--section")
        section = argv[j + 1]
        del argv[j : j + 2]
        service = ServiceFile.load(path)
        if service.log_json is not None:
            os.environ.setdefault("OPENPI_RL_LOG_JSON", "1" if service.log_json else "0")
        return config_file.from_dict(cls, service.role_table(section), f"{section}.")
    except (OSError, ValueError) as e:
        from openpi_rl.sdnotify import notify

        print(f"openpi-rl {role}: {path}: {e}", file=sys.stderr)
        notify("STATUS=" + str(e).replace("\n", " "))  # why the daemon holds this role down
        raise SystemExit(EX_CONFIG) from None


def _role_env(argv: list[str]) -> None:
    """`--config FILE --section ROLE`: set the role's `[gpu]` environment (its memory share,
    preallocation, devices) now, before the role's modules import JAX. A file that does not
    load is left to `_file_config`, which names the problem."""
    if "--config" not in argv or "--section" not in argv:
        return
    from openpi_rl.service.config import ServiceFile

    try:
        path = argv[argv.index("--config") + 1]
        env = ServiceFile.load(path).role_env(argv[argv.index("--section") + 1])
    except (IndexError, OSError, ValueError):
        return
    os.environ.update(env)


def _parse(cls: type, argv: list[str], default: object = None, **kwargs: object) -> object:
    """tyro over `cls` with the secrets kept out of its sight: tyro prints defaults (the config
    file's values) in --help and in its errors, so it gets `masked(default)` (every field marked
    SECRET shows `***`), and what it returns gets the real secret back wherever the value is
    still the masked one (a flag given on the command line wins)."""
    from openpi_rl.secret import masked, unmask

    default = cls() if default is None else default
    parsed = tyro.cli(cls, args=argv, default=masked(default), **kwargs)
    return unmask(parsed, default)


def train_main(argv: list[str] | None = None) -> int:
    from openpi_rl.train.train_ppo import PPOTrainConfig, train

    config = _parse(
        PPOTrainConfig,
        _seed_style_args(sys.argv[1:] if argv is None else argv),
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
    argv = list(sys.argv[1:] if argv is None else argv)
    _role_env(argv)
    from openpi_rl.policy_server.serve import ServeConfig, serve

    default = _file_config(ServeConfig, argv, "serve")
    config = _parse(
        ServeConfig,
        _seed_style_args(argv),
        default,
        prog="openpi-rl serve",
        config=(tyro.conf.CascadeSubcommandArgs,),
    )
    configure_logging(json=not sys.stderr.isatty())
    return serve(config)


def bridge_main(argv: list[str] | None = None) -> int:
    """`openpi-rl bridge [--config FILE] [flags]`: the reward bridge and its pendant page."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _role_env(argv)
    from openpi_rl.reward_bridge import BridgeConfig, serve

    default = _file_config(BridgeConfig, argv, "bridge")
    config = _parse(BridgeConfig, argv, default, prog="openpi-rl bridge")
    configure_logging(json=not sys.stderr.isatty())
    return serve(config)


def learn_main(argv: list[str] | None = None) -> int:
    """`openpi-rl learn [--config FILE] [flags]`: the learner daemon (PPO on the replay,
    versioned checkpoints, ZMQ PUB notices)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _role_env(argv)
    from openpi_rl.daemon.learner import LearnerConfig, learn

    default = _file_config(LearnerConfig, argv, "learn")
    config = _parse(
        LearnerConfig,
        _seed_style_args(argv),
        default,
        prog="openpi-rl learn",
        config=(tyro.conf.CascadeSubcommandArgs,),
    )
    configure_logging(json=not sys.stderr.isatty())
    return learn(config)


def daemon_main(argv: list[str] | None = None) -> int:
    """`openpi-rl daemon --config openpi-rl.toml`: server, bridge and learner as supervised
    child processes (restarted when they crash; SIGTERM stops all cleanly)."""
    parser = argparse.ArgumentParser(
        prog="openpi-rl daemon",
        description="The policy server, reward bridge and learner as supervised child "
        "processes: one that crashes is restarted; SIGTERM stops all cleanly.",
    )
    parser.add_argument(
        "--config", required=True, metavar="FILE", help="the service file (openpi-rl.toml)"
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)  # --help: exit 0
    from openpi_rl.service.supervisor import daemon

    configure_logging(json=not sys.stderr.isatty())
    return daemon(args.config)


def check_main(argv: list[str] | None = None) -> int:
    """`openpi-rl check --config openpi-rl.toml`: every problem of the file and this machine."""
    from openpi_rl.service.check import check_main

    return check_main(list(sys.argv[1:] if argv is None else argv))


def admin_main(argv: list[str] | None = None) -> int:
    """`openpi-rl admin status|pin N|unpin|rollback|pause-learning|resume-learning`: the policy
    server's admin endpoint (token from --token or $OPENPI_RL_ADMIN_TOKEN)."""
    from openpi_rl.policy_server.admin import admin_main

    return admin_main(list(sys.argv[1:] if argv is None else argv))


def demo_main(argv: list[str] | None = None) -> int:
    """`openpi-rl demo [--minutes 5] [--robots 2] [--config FILE]`: the daemon, simulated
    MuJoCo robots and a simulated operator, with a live table of what the service learns."""
    from openpi_rl.demo import DemoConfig
    from openpi_rl.demo import demo_main as run

    config = _parse(
        DemoConfig,
        list(sys.argv[1:] if argv is None else argv),
        prog="openpi-rl demo",
        description="The service learning live: robots, operator, daemon.",
    )
    configure_logging()
    return run(config)


REPLAY_COMMANDS = {
    "stats": "stats_main",
    "migrate": "migrate_main",
    "export-lerobot": "export_lerobot_main",
    "import-lerobot": "import_lerobot_main",
}


def replay_main(argv: list[str] | None = None) -> int:
    """`openpi-rl replay stats DIR`, `migrate DIR`, `export-lerobot DIR OUT`,
    `import-lerobot DATASET DIR`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in REPLAY_COMMANDS:
        from openpi_rl.replay import cli as replay_cli

        return getattr(replay_cli, REPLAY_COMMANDS[argv[0]])(argv[1:])
    parser = argparse.ArgumentParser(
        prog="openpi-rl replay", description="The disk replay of served chunks and rewards."
    )
    parser.add_argument(
        "command",
        choices=tuple(REPLAY_COMMANDS),
        metavar="COMMAND",
        help="stats DIR: rows, episodes and bytes, per robot (JSON); migrate DIR: bring a "
        "directory an older openpi-rl wrote to the current format; export-lerobot DIR OUT: "
        "episodes as a LeRobot dataset; import-lerobot DATASET DIR: a LeRobot dataset as "
        "demonstrations. `openpi-rl replay COMMAND --help`: its options",
    )
    parser.parse_args(argv)  # --help: exit 0; no or another command: a usage error, exit 2
    return 2


def keys_main(argv: list[str] | None = None) -> int:
    """`openpi-rl keys generate DIR [NAME]`: a CURVE key pair, DIR/NAME.key (public: give it to
    the other side) and DIR/NAME.key_secret (keep it). NAME defaults to `server`."""
    import zmq.auth

    parser = argparse.ArgumentParser(
        prog="openpi-rl keys", description="CURVE key pairs for the ZMQ listeners."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    generate = commands.add_parser(
        "generate",
        help="write a key pair",
        description="Write a CURVE key pair: DIR/NAME.key (public: give it to the other side) "
        "and DIR/NAME.key_secret (keep it; mode 600).",
    )
    generate.add_argument("dir", metavar="DIR", help="where the pair goes (created if missing)")
    generate.add_argument(
        "name",
        nargs="?",
        default="server",
        metavar="NAME",
        help="the files' name (default: server)",
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)  # --help: exit 0
    os.makedirs(args.dir, exist_ok=True)
    public, secret = zmq.auth.create_certificates(args.dir, args.name)
    os.chmod(secret, 0o600)
    print(f"public: {public}\nsecret: {secret}")
    return 0


def export_openpi_main(argv: list[str] | None = None) -> int:
    """`openpi-rl export-openpi OUT --config FILE [--version N]`: a published version as an
    openpi checkpoint (service/export.py)."""
    from openpi_rl.service.export import export_main

    return export_main(sys.argv[1:] if argv is None else argv)


def eval_main(argv: list[str] | None = None) -> int:
    """`openpi-rl eval [--config openpi-rl.toml] [--checkpoint-dir DIR] [--version N]
    [--compare M] [--greedy|--sampled] [--video-dir OUT]`: episodes of a version on a gymnasium
    task, success rate and return with intervals, videos (eval/)."""
    from openpi_rl.eval import EvalConfig
    from openpi_rl.eval import eval_main as run

    argv = list(sys.argv[1:] if argv is None else argv)
    default = EvalConfig()
    if "--config" in argv:  # the service's model, value head and versions
        from openpi_rl.service.config import ServiceFile, connect_address

        i = argv.index("--config")
        path = argv[i + 1] if i + 1 < len(argv) else ""
        del argv[i : i + 2]
        try:
            service = ServiceFile.load(path)
            learn, serve = service.role_config("learn"), service.role_config("serve")
        except (OSError, ValueError) as e:
            print(f"openpi-rl eval: {path}: {e}", file=sys.stderr)
            return 2
        default = EvalConfig(
            checkpoint_dir=learn.checkpoint_dir, model=learn.model,
            value_hidden=learn.value_hidden, model_seed=learn.seed,
            admin_endpoint=connect_address(serve.swap.admin_endpoint),
            admin_token=serve.swap.admin_token, replay_dir=learn.replay_dir,
        )  # fmt: skip
    short = {"--greedy": ["--policy", "greedy"], "--sampled": ["--policy", "sampled"]}
    argv = [x for a in argv for x in short.get(a, [a])]
    config = _parse(
        EvalConfig,
        _seed_style_args(argv),
        default,
        prog="openpi-rl eval",
        description="Evaluate a published version on a gymnasium task: success rate and return "
        "with confidence intervals, episode videos, two versions side by side. --config "
        "openpi-rl.toml: the service's model and checkpoint_dir.",
        config=(tyro.conf.CascadeSubcommandArgs,),
    )
    configure_logging()
    return run(config)


COMMANDS = {
    "train": train_main,
    "serve": serve_main,
    "bridge": bridge_main,
    "learn": learn_main,
    "daemon": daemon_main,
    "check": check_main,
    "replay": replay_main,
    "admin": admin_main,
    "demo": demo_main,
    "keys": keys_main,
    "export-openpi": export_openpi_main,
    "eval": eval_main,
}


def _die_with_supervisor() -> None:
    """Under `openpi-rl daemon`: SIGTERM from the kernel when the daemon dies (Linux
    PR_SET_PDEATHSIG), so a role never serves on unsupervised after a `kill -9` of it; the
    role stops as on any SIGTERM (flushes, exits 0). If the daemon is already gone, stop now."""
    parent = os.environ.get("OPENPI_RL_SUPERVISOR_PID")  # supervisor.PARENT_ENV
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0) != 0:
        return
    if str(os.getppid()) != parent:  # it died before the request was in place
        os.kill(os.getpid(), signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(f"usage: openpi-rl {{{','.join(COMMANDS)}}} [--help]", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    # `kill -USR1 PID` writes every thread's stack to stderr (the service log): the daemon does
    # it before it kills a stuck child, so a hang leaves its cause behind.
    with contextlib.suppress(AttributeError, OSError, ValueError):  # no fd 2 (embedded)
        faulthandler.register(signal.SIGUSR1, file=sys.__stderr__, all_threads=True)
    _die_with_supervisor()
    try:
        return COMMANDS[argv[0]](argv[1:])
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
