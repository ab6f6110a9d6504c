"""`openpi-rl check`'s `[gpu]` findings: one device shared by the policy server and the
learner. The roles' shares of a device add up to at most 1, and each role's need (serving,
one PPO update: `models/paligemma/memory.py`'s estimate) fits its share of `memory_gib`.
"""

from __future__ import annotations

from openpi_rl.service.config import JAX_MEM_FRACTION, GpuConfig

NAMES = {"serve": "the policy server", "learn": "the learner", "bridge": "the reward bridge"}


def _gib(b: float) -> str:
    return f"{b / 2**30:.1f} GiB"


def gpu_memory(
    gpu: GpuConfig, needs: dict[str, tuple[int, str, str]], roles: list[str]
) -> list[tuple[str, str, str]]:
    """`[gpu]` against what the `roles` need (`needs`: bytes, what for, how to need less).
    The shares of the roles on one device (`visible_devices`) add up to at most 1 (without
    preallocation too: a share is the most a role takes, and the other may hold the rest).
    Each role's need fits its share, `memory_fraction` x `memory_gib` (the estimate is a lower
    bound: within 10% of the share is a warning). With
    the "platform" allocator there are no shares: the needs together fit the device.
    Returns `openpi-rl check`'s findings: (key, message, severity)."""
    findings = []
    devices: dict[str, list[str]] = {}
    for role in roles:
        devices.setdefault(gpu.visible_devices.get(role, "default"), []).append(role)

    def fraction(role: str) -> float:
        return gpu.memory_fraction.get(role, JAX_MEM_FRACTION)

    for device, on_it in devices.items():
        shown = "one device" if device == "default" else f"device {device!r}"
        if gpu.allocator == "platform":
            total = sum(needs[r][0] for r in on_it if r in needs)
            if gpu.memory_gib is not None and total > gpu.memory_gib * 2**30:
                message = (
                    f"{' + '.join(on_it)} on {shown} need {_gib(total)}, more than its "
                    f"{gpu.memory_gib:g} GiB: lower serve.serve.max_batch or "
                    "learn.ppo.minibatch_size, or give each its own (gpu.visible_devices)"
                )
                findings.append(("gpu.memory_gib", message, "problem"))
            continue
        total = sum(fraction(r) for r in on_it)
        if len(on_it) > 1 and total > 1 + 1e-9:
            shares = " + ".join(
                f"{r} {fraction(r):g}" + ("" if r in gpu.memory_fraction else " (JAX's default)")
                for r in on_it
            )
            message = (
                f"{shares} = {total:g} of {shown}: more than all of it; give each role a "
                "share so that they add up to at most 1 (memory_fraction = { serve = 0.3, "
                "learn = 0.65 })"
            )
            findings.append(("gpu.memory_fraction", message, "problem"))
        if gpu.memory_gib is None:
            continue
        for role in (r for r in on_it if r in needs):
            need, what, less = needs[role]
            share = fraction(role) * gpu.memory_gib * 2**30
            has = f"{fraction(role):g} x {gpu.memory_gib:g} GiB = {_gib(share)}"
            key = f"gpu.memory_fraction.{role}"
            if need > share:
                message = (
                    f"{NAMES[role]} needs {_gib(need)} for {what} but has {has}: raise {key}, "
                    f"or {less}"
                )
                findings.append((key, message, "problem"))
            elif need > 0.9 * share:
                message = (
                    f"{NAMES[role]} needs {_gib(need)} for {what} of its {has}: little "
                    "headroom (the estimate leaves out XLA's temporaries)"
                )
                findings.append((key, message, "warning"))
            else:
                message = f"{NAMES[role]} needs {_gib(need)} for {what} of its {has}"
                findings.append((key, message, "info"))
    return findings
