"""What runs the three roles together: the supervisor (`openpi-rl daemon`), the one config file
they share (`openpi-rl.toml`) and `openpi-rl check`."""
