"""openpi-rl robot client: talks to the policy server with numpy, pyzmq and msgpack only."""

__version__ = "0.1.0"
